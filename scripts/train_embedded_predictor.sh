#!/usr/bin/env bash
# Rebuilds the embedded default predictor (tiny SD pipeline, colourfulness rater) with the project's own jobs:
# collect on a stable 20% sample of PartiPrompts, train, evaluate on the held-out prompts, then install it where
# `--policy predictor` finds it. About 15-30 minutes on 2 CPU cores. Usage: scripts/train_embedded_predictor.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-.seedsift/testbed}
corpus=${PARTI:-../shared/data/PartiPrompts.tsv}
settings=(--model embedded:tiny-sd --steps 4 --guidance 7.5 --rater colorfulness --seed 0)

.venv/bin/seedsift collect --prompts "$corpus" --out "$work/collect" --sample 0.2 --candidates 16 \
  --batch-size 16 --no-images "${settings[@]}"
.venv/bin/seedsift train --dataset "$work/collect" --out "$work/predictor" \
  --channels 16,32,64 --hidden 128 --head 128,64 --epochs 20 --patience 5 \
  --learning-rate 3e-4 --weight-decay 1e-2 --dropout 0.2
.venv/bin/seedsift evaluate --dataset "$work/collect" --predictor "$work/predictor" --out "$work/evaluation" \
  --contact-prompts 4
mkdir -p actors/models/predictors/tiny-sd-colorfulness
cp "$work/predictor/model.safetensors" "$work/predictor/config.json" actors/models/predictors/tiny-sd-colorfulness/
cp "$work/evaluation/evaluation.json" actors/models/predictors/tiny-sd-colorfulness/evaluation.json
# The report the README links, with its contact sheet (paths in it are relative to the repository root).
mkdir -p docs/embedded-predictor
cp "$work/evaluation/report.html" "$work/evaluation/contact_sheet.png" docs/embedded-predictor/
echo "installed: actors/models/predictors/tiny-sd-colorfulness and docs/embedded-predictor/"
