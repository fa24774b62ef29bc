#!/usr/bin/env bash
# Regenerates every benchmark figure: one script per figure, each printing its table and writing
# benchmarks/results/NAME.json and NAME.md; the tables are then gathered into benchmarks/results/latest.md.
# The machine is shared: the load average is recorded by each script; run when it is quiet if you can.
# Usage: bash benchmarks/run_all.sh            (about 20-30 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export SEEDSIFT_CACHE="${SEEDSIFT_CACHE:-$HOME/.cache/seedsift}"
echo "start: $(uptime)"
$PY benchmarks/bench_selection.py          # figure 2: scoring 16 candidates vs rendering one SD 1.5 image
$PY benchmarks/bench_overhead.py           # figure 1: seedsift generate vs a plain diffusers loop
$PY benchmarks/bench_embeddings.py         # figure 3: prompt embeddings from the scorer, no text encoder in the generator
$PY benchmarks/bench_scale.py              # figure 4: 10k -> 1M prompts, cluster placement, 1 vs 2 generators
echo "end: $(uptime)"
{
  echo "# Latest benchmark tables ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, no GPU)"
  for name in overhead selection embeddings scale; do
    echo; echo "## $name"; echo; cat "benchmarks/results/$name.md"
  done
} > benchmarks/results/latest.md
echo "tables: benchmarks/results/latest.md"
