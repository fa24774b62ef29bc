#!/usr/bin/env bash
# Retrains the embedded:shapes pipeline from its seed on CPU (about 46 CPU minutes on one core; 62 minutes wall on
# a busy shared 2-core machine), installs it in actors/testbed/weights/pipeline, then measures it (docs/shapes.md quotes
# the figures). The trainer's defaults reproduce the shipped weights.
# Usage: scripts/train_shapes_model.sh [WORK]   (extra flags for the trainer go in TRAIN_FLAGS)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-.seedsift/shapes}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$work"
# shellcheck disable=SC2086
nice -n 10 "$python" -m jobs.train_shapes --out "$work/model" --seed 0 ${TRAIN_FLAGS:-} | tee "$work/train.log"
rm -rf actors/testbed/weights/pipeline
mkdir -p orchestrator/models
cp -r "$work/model" actors/testbed/weights/pipeline
du -sb actors/testbed/weights/pipeline
nice -n 10 "$python" -m jobs.shapes_report --out "$work/report" --model embedded:shapes | tee "$work/report.log"
echo "installed: actors/testbed/weights/pipeline (contact sheet: $work/report/contact.png)"
