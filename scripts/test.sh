#!/usr/bin/env bash
# Sets up, then runs the test suite: the fast tier by default (under 15 minutes on 2 cores).
#   bash scripts/test.sh              fast tier: everything not marked slow or browser
#   bash scripts/test.sh --all        also the slow tier (separate Ray clusters, kills, outages: about 15 min more)
#   bash scripts/test.sh -k NAME ...  other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ "${1:-}" == "--all" ]]; then
  shift
  fast=0
  .venv/bin/python -m pytest -q -m "not slow and not browser" "$@" || fast=$?
  slow=0
  .venv/bin/python -m pytest -q -m "slow or browser" "$@" || slow=$?  # browser tests skip without Chromium
  exit $(( fast != 0 ? fast : slow ))
fi
exec .venv/bin/python -m pytest -q -m "not slow and not browser" "$@"
