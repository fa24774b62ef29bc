#!/usr/bin/env bash
# Sets up, then runs the test suite: the fast tier by default.
#   bash scripts/test.sh              fast tier: everything not marked slow or browser
#   bash scripts/test.sh --all        also the slow tier (separate Ray clusters, kills, outages)
#   bash scripts/test.sh -k NAME ...  other arguments go to pytest
# Each tier runs on SEEDSIFT_TEST_WORKERS pytest workers (pytest-xdist; default 2, 1 runs in this process), each
# with its own session Ray: most tests wait on processes (Ray's start, actors' imports, kills, retries) part of the
# time, so two streams fill the cores one leaves idle. Whole files go to a worker (--dist loadfile): a module's
# fixtures (a trained predictor, a cluster run) are built once, and a file's tests run in their order.
# Each tier ends with its wall time and the load average, so a slow run on a busy machine shows as one.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh
echo "set-up: $((SECONDS - started)) s"

workers=${SEEDSIFT_TEST_WORKERS:-2}

tier() {  # tier NAME MARKERS [pytest arguments...]
  local name=$1 markers=$2 begun=$SECONDS status=0 parallel=()
  shift 2
  if (( workers > 1 )); then parallel=(-n "$workers" --dist loadfile); fi
  .venv/bin/python -m pytest -q -m "$markers" "${parallel[@]}" --durations=25 "$@" || status=$?
  echo "$name tier: $((SECONDS - begun)) s, exit $status; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  return $status
}

if [[ "${1:-}" == "--all" ]]; then
  shift
  fast=0
  tier fast "not slow and not browser" "$@" || fast=$?
  slow=0
  tier slow "slow or browser" "$@" || slow=$?  # browser tests skip without Chromium
  echo "all of it: $((SECONDS - started)) s"
  exit $(( fast != 0 ? fast : slow ))
fi
tier fast "not slow and not browser" "$@"
