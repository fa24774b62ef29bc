#!/usr/bin/env bash
# Sets up, then runs the main job on the embedded default: tiny pipeline built offline, local Ray, local output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The embedded predictor picks 1 of 16 candidate seeds per prompt; it was trained at these settings (4 steps).
exec .venv/bin/seedsift generate --prompts examples/parti-sample.tsv --out "${1:-out/demo}" \
  --policy predictor --candidates 16 --keep 1 --steps 4 "${@:2}"
