#!/usr/bin/env bash
# Sets up, then runs the test suite: the fast tier by default.
#   bash scripts/test.sh              fast tier: everything not marked slow or browser
#   bash scripts/test.sh --all        also the slow tier (separate Ray clusters, kills, outages)
#   bash scripts/test.sh -k NAME ...  other arguments go to pytest
# Each tier runs on two pytest workers (pytest-xdist; SEEDSIFT_FAST_WORKERS and SEEDSIFT_SLOW_WORKERS, 1 runs a
# tier in this process), each worker with its own session Ray, whole files to a worker (a module's fixtures, such
# as the cluster run or the predictor's collect, are built once). In one process the cores stand idle about 30% of
# either tier's time (a job's start is one process importing torch and diffusers while the other core waits), and
# a second stream fills much of that. Measured on 2 cores: slow tier 554-596 s in one process, 461-528 s on two;
# fast tier 278-323 s in one process, 251-286 s on two (251 back to back with a 323 s run in one; 474 CPU-seconds
# against about 400: the second session Ray and session fixtures cost that). The machine's own speed varies by a
# quarter within an hour, so the gain is a range, 0-20%, not a figure.
# Each tier ends with its wall time and the load average, so a slow run on a busy machine shows as one.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh
echo "set-up: $((SECONDS - started)) s"

fast_workers=${SEEDSIFT_FAST_WORKERS:-2}
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
  tier fast "not slow and not browser" "$fast_workers" "$@" || fast=$?
  slow=0
  tier slow "slow or browser" "$slow_workers" "$@" || slow=$?  # browser tests skip without Chromium
  echo "all of it: $((SECONDS - started)) s"
  exit $(( fast != 0 ? fast : slow ))
fi
tier fast "not slow and not browser" "$fast_workers" "$@"
