#!/usr/bin/env bash
# Sets up, then runs the test suite: the fast tier by default.
#   bash scripts/test.sh              fast tier: everything not marked slow or browser
#   bash scripts/test.sh --all        also the slow tier (separate Ray clusters, kills, outages)
#   bash scripts/test.sh -k NAME ...  other arguments go to pytest
# The slow tier runs on SEEDSIFT_SLOW_WORKERS pytest workers (pytest-xdist, default 2; 1 runs it in this process),
# each with its own session Ray, whole files to a worker (a module's fixtures, such as the cluster run, are built
# once). Its tests wait on processes (Ray heads starting, kills, retries): in one process the cores stand idle
# about 30% of its time, and a second stream fills part of that (2 cores: 554-596 s in one process, 461-524 s on
# two). The fast tier stays in one process: it keeps the cores busy already (two workers: 259 and 300 s, against
# 279-290 s in one), so a second session Ray and second fixture builds buy nothing.
# Each tier ends with its wall time and the load average, so a slow run on a busy machine shows as one.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh
echo "set-up: $((SECONDS - started)) s"

slow_workers=${SEEDSIFT_SLOW_WORKERS:-2}

tier() {  # tier NAME MARKERS WORKERS [pytest arguments...]
  local name=$1 markers=$2 workers=$3 begun=$SECONDS status=0 parallel=()
  shift 3
  if (( workers > 1 )); then parallel=(-n "$workers" --dist loadfile); fi
  .venv/bin/python -m pytest -q -m "$markers" "${parallel[@]}" --durations=25 "$@" || status=$?
  echo "$name tier: $((SECONDS - begun)) s, exit $status; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  return $status
}

if [[ "${1:-}" == "--all" ]]; then
  shift
  fast=0
  tier fast "not slow and not browser" 1 "$@" || fast=$?
  slow=0
  tier slow "slow or browser" "$slow_workers" "$@" || slow=$?  # browser tests skip without Chromium
  echo "all of it: $((SECONDS - started)) s"
  exit $(( fast != 0 ? fast : slow ))
fi
tier fast "not slow and not browser" 1 "$@"
