#!/usr/bin/env bash
# Sets up, then runs the test suite: the fast tier by default (about 6.5 minutes with set-up on a quiet 2-core machine).
#   bash scripts/test.sh              fast tier: everything not marked slow or browser
#   bash scripts/test.sh --all        also the slow tier (separate Ray clusters, kills, outages: about 13 min more)
#   bash scripts/test.sh -k NAME ...  other arguments go to pytest
# Each tier ends with its wall time and the load average, so a slow run on a busy machine shows as one.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh
echo "set-up: $((SECONDS - started)) s"

tier() {  # tier NAME MARKERS [pytest arguments...]
  local name=$1 markers=$2 begun=$SECONDS status=0
  shift 2
  .venv/bin/python -m pytest -q -m "$markers" --durations=25 "$@" || status=$?
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
