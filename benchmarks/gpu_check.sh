#!/usr/bin/env bash
# The GPU check, as one command: full-size random-weight SD 1.5 and SDXL, seedsift generate against a plain
# diffusers fp16 loop (benchmarks/gpu_check.py says what is measured). About 6-8 minutes on one H200; needs the
# project's .venv with a CUDA build of torch (bash scripts/setup.sh on the GPU machine), or SEEDSIFT_PYTHON: an
# interpreter that already has torch and the project's packages (an offline GPU machine). --smoke: CPU, tiny configs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${SEEDSIFT_PYTHON:-.venv/bin/python}
[ -n "${SEEDSIFT_PYTHON:-}" ] || [ -x .venv/bin/python ] || bash scripts/setup.sh
echo "gpu_check: $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU')"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
