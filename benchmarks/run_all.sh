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
# figure 1: seedsift generate vs a plain diffusers loop. 1 torch thread on both sides: on a shared 2-core machine
# two-thread runs mostly measure the neighbours (OpenMP barriers stall when one thread is preempted); drop the flag
# on a quiet machine to measure the pipeline's local default (a CPU generator gets all cores but one).
$PY benchmarks/bench_overhead.py --generator-cpus 1
$PY benchmarks/bench_embeddings.py         # figure 3: prompt embeddings from the scorer, no text encoder in the generator
# figure 4: 10k -> 1M prompts (scoring runs capped at 120 s each), cluster placement, 1 vs 2 generators
$PY benchmarks/bench_scale.py --score-time-cap 120 --generator-images 64
echo "end: $(uptime)"
{
  echo "# Latest benchmark tables ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, no GPU)"
  for name in overhead selection embeddings scale; do
    echo; echo "## $name"; echo; cat "benchmarks/results/$name.md"
  done
} > benchmarks/results/latest.md
echo "tables: benchmarks/results/latest.md"
