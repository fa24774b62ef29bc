#!/usr/bin/env bash
# Retrains the embedded:shapes-dit pipeline (a PixArt-layout transformer and a small T5 encoder on the shipped
# shapes VAE, actors/testbed/dit.py) from its seed on CPU: about 30 minutes on one core of the development machine
# (0.3 s per step, 6,000 steps, plus 80 s encoding the scenes). Installs it in actors/testbed/weights/pipeline-dit.
# Usage: scripts/train_shapes_dit_model.sh [WORK]   (extra flags for the trainer go in TRAIN_FLAGS)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-.seedsift/shapes-dit}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$work"
# shellcheck disable=SC2086
nice -n 10 "$python" -m jobs.train_shapes --denoiser dit --out "$work/model" --seed 0 --denoiser-steps 6000 \
    --denoiser-schedule-steps 6000 ${TRAIN_FLAGS:-} | tee "$work/train.log"
rm -rf actors/testbed/weights/pipeline-dit
cp -r "$work/model" actors/testbed/weights/pipeline-dit
du -sb actors/testbed/weights/pipeline-dit
echo "installed: actors/testbed/weights/pipeline-dit"
