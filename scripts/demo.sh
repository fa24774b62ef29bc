#!/usr/bin/env bash
# Sets up, then runs the main job on the embedded default: embedded:shapes (the small text-to-image model the
# project trained, shipped in the package), its shipped predictor picking 1 of 16 candidate seeds per prompt, the
# programmatic `shapes` rater, local Ray, local output. The 100 prompts are held out from the model's and the
# predictor's training. Open OUT/report.html for the images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/seedsift generate --prompts examples/shapes-held-out.txt --out "${1:-out/demo}" \
  --model embedded:shapes --policy predictor --candidates 16 --keep 1 --batch-size 8 "${@:2}"
