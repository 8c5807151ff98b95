#!/usr/bin/env bash
# The whole test suite on a fresh machine. It installs what is missing first:
# the Debian programs the integration tests start (Chromium for the live page,
# tmux for `geventproxy top`, Prometheus, HAProxy) and gcc, which builds the
# compiled accelerator and has the sanitizers' runtimes; then the package with
# its test extra (building the accelerator). Then:
#   1. every test, with the compiled accelerator;
#   2. the integration tests that exercise the relay again on the pure-Python
#      path (GEVENTPROXY_PURE=1), with one worker;
#   3. the compiled code's tests under AddressSanitizer and UBSan.
# Each runs on two pytest-xdist workers: most tests wait on sockets and child
# processes, not on a CPU, and every test starts its own processes on ports
# of its own. Arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=""
for program in chromium tmux prometheus haproxy gcc; do
    command -v "$program" >/dev/null || missing="$missing $program"
done
if [ -n "$missing" ]; then
    apt-get update && apt-get install -y --no-install-recommends $missing
fi
pip install -q -e '.[test]'
python -m pytest -n 2 "$@"
# (With one worker: the two-worker variants exercise the parent, not the relay.)
GEVENTPROXY_PURE=1 python -m pytest -q -n 2 -k "not workers2" \
    tests/integration/test_proxy.py tests/integration/test_lifecycle.py \
    tests/integration/test_partial_sends.py tests/integration/test_hostile.py \
    tests/integration/test_faults.py tests/integration/test_reference_driver.py
scripts/sanitize.sh -n 2
