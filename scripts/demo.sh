#!/usr/bin/env bash
# Sets up, then runs the main job on the embedded default: tiny pipeline built offline, local Ray, local output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/seedsift generate --prompts examples/parti-sample.tsv --out "${1:-out/demo}" "${@:2}"
