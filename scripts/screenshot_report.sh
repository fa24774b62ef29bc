#!/usr/bin/env bash
# Screenshots OUT/report.html with headless Chromium (Debian: apt-get install chromium fonts-noto-cjk), as the
# opt-in browser test does. Usage: scripts/screenshot_report.sh OUT PNG [WIDTHxHEIGHT]   (how docs/report.png is made)
set -euo pipefail
out=$1 png=$2 size=${3:-1200x900}
browser=$(command -v chromium || command -v chromium-browser) || { echo "chromium is not installed" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="${size/x/,}" --screenshot="$(realpath -m "$png")" "file://$(realpath "$out")/report.html" 2>/dev/null
echo "written: $png"
