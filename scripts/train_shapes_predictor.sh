#!/usr/bin/env bash
# Rebuilds the default predictor of embedded:shapes with the project's own jobs: collect all 16 candidates of the
# 600 training prompts (examples/shapes-train.txt, drawn from the training split of the caption grammar), train,
# then collect and evaluate on the 100 held-out prompts (examples/shapes-held-out.txt, never drawn in training),
# and install it where `--policy predictor` finds it. About 90 minutes on 2 CPU cores, most of it the 11,200
# renders of the two collects. Usage: scripts/train_shapes_predictor.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-.seedsift/shapes-predictor}
settings=(--model embedded:shapes --rater shapes --guidance 5 --steps 20 --seed 0 --candidates 16)

.venv/bin/seedsift collect --prompts examples/shapes-train.txt --out "$work/train" --batch-size 16 --no-images \
  "${settings[@]}"
.venv/bin/seedsift train --dataset "$work/train" --out "$work/predictor" ${TRAIN_FLAGS:-}
.venv/bin/seedsift collect --prompts examples/shapes-held-out.txt --out "$work/held-out" --batch-size 16 \
  --no-images "${settings[@]}"
.venv/bin/seedsift evaluate --dataset "$work/held-out" --predictor "$work/predictor" --out "$work/evaluation" \
  --split all --contact-prompts 6
mkdir -p actors/testbed/weights/predictor
cp "$work/predictor/model.safetensors" "$work/predictor/config.json" actors/testbed/weights/predictor/
cp "$work/evaluation/evaluation.json" actors/testbed/weights/predictor/evaluation.json
mkdir -p docs/shapes-predictor
cp "$work/evaluation/report.html" "$work/evaluation/contact_sheet.png" docs/shapes-predictor/
echo "installed: actors/testbed/weights/predictor and docs/shapes-predictor/"
