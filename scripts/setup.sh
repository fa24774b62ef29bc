#!/usr/bin/env bash
# Creates .venv in the repository root: CPU torch first (a plain `torch` requirement would pull a multi-GB CUDA
# build), then seedsift with its test tools. Safe to rerun; set TORCH_SPEC to install another torch build.
# Installs with uv (about 15 s on a fresh machine, against about 2 minutes for pip), or with pip where uv cannot
# be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q uv >/dev/null 2>&1 || true
if [ -x .venv/bin/uv ]; then
  # uv reads no pip configuration: hand it the wheel folders pip is told about (where a machine keeps its torch
  # build), so that the pin resolves to the same wheel pip would take.
  find_links=${PIP_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}
  if [ -n "$find_links" ]; then export UV_FIND_LINKS="${UV_FIND_LINKS:-${find_links// /,}}"; fi
  .venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode "$torch_spec" -e ".[test]"
else
  .venv/bin/python -m pip install -q "$torch_spec"
  .venv/bin/python -m pip install -q -e ".[test]"
fi
.venv/bin/python -c "import torch, ray, diffusers, orchestrator, actors, jobs"  # fail here, not mid-job
