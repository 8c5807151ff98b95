#!/usr/bin/env bash
# The whole test suite on a fresh machine: the Debian programs the integration
# tests start (Chromium for the live page, tmux for `geventproxy top`,
# Prometheus, HAProxy), the package with its test extra, then pytest.
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=""
for program in chromium tmux prometheus haproxy; do
    command -v "$program" >/dev/null || missing="$missing $program"
done
if [ -n "$missing" ]; then
    apt-get update && apt-get install -y --no-install-recommends $missing
fi
pip install -q -e '.[test]'
python -m pytest "$@"
