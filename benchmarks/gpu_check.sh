#!/usr/bin/env bash
# The GPU check, as one command: full-size random-weight SD 1.5 and SDXL, seedsift generate against a plain
# diffusers fp16 loop (benchmarks/gpu_check.py says what is measured). About 6-8 minutes on one H200; needs the
# project's .venv with a CUDA build of torch (bash scripts/setup.sh on the GPU machine). --smoke: CPU, tiny configs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
echo "gpu_check: $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU')"
exec .venv/bin/python benchmarks/gpu_check.py "$@"
