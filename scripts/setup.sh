#!/usr/bin/env bash
# Creates .venv in the repository root: CPU torch first (a plain `torch` requirement would pull a multi-GB CUDA
# build), then seedsift with its test tools. Safe to rerun; set TORCH_SPEC to install another torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, ray, diffusers, orchestrator, actors, jobs"  # fail here, not mid-job
