#!/usr/bin/env bash
# Build the compiled accelerator with AddressSanitizer and UndefinedBehaviorSanitizer
# in a scratch copy of this checkout, and run the tests of the compiled code under it
# (the differential and property tests, and the copy loop on real loopback sockets).
#
# Usage: scripts/sanitize.sh [PYTEST ARGS...]
# Needs gcc (or CC) with libasan/libubsan. The interpreter itself is not
# instrumented, so the sanitizer runtime is preloaded, Python's own small-object
# allocator is switched off (PYTHONMALLOC=malloc, so that every buffer the
# extension allocates is one the sanitizer watches) and leak detection is off
# (the interpreter keeps memory until exit on purpose). Any report fails the run.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cc=${CC:-gcc}
asan=$("$cc" -print-file-name=libasan.so)
ubsan=$("$cc" -print-file-name=libubsan.so)
if [[ ! -e $asan || ! -e $ubsan ]]; then
    echo "sanitize.sh: $cc has no libasan/libubsan" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/geventproxy-sanitize.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The tracked and new (not ignored) files, without any extension built here.
(cd "$root" && git ls-files -co --exclude-standard | grep -v '\.so$' | tar cf - -T -) |
    (cd "$work" && tar xf -)

cd "$work"
# No redzones around stack arrays (asan-stack=0): greenlet copies a suspended C stack,
# our copy loop's frame included, with memcpy, which would read them. Heap buffers (the
# held lines, the timer queues, the copy buffer) and globals stay instrumented.
flags="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
flags="$flags --param asan-stack=0"
CC=$cc CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
    python setup.py -q build_ext --inplace >build.log 2>&1 || { cat build.log >&2; exit 1; }
python -c 'import geventproxy._accel' 2>/dev/null && {
    echo "sanitize.sh: the instrumented build imports without the sanitizer runtime?" >&2
    exit 1
}

status=0
LD_PRELOAD="$asan:$ubsan" PYTHONMALLOC=malloc \
    ASAN_OPTIONS="detect_leaks=0:log_path=$work/sanitizer" UBSAN_OPTIONS="log_path=$work/sanitizer" \
    FUZZ_EXAMPLES_SCALE=${FUZZ_EXAMPLES_SCALE:-0.25} GEVENTPROXY_PURE= \
    python -m pytest -q -p no:cacheprovider tests/unit/test_accel.py \
    tests/unit/test_codec.py tests/unit/test_latency.py tests/integration/test_copy_loops.py \
    -k "not pure and not chunking and not oracle and not byte_at_a_time" "$@" || status=$?
if compgen -G "$work/sanitizer*" >/dev/null; then
    cat "$work"/sanitizer* >&2
    status=1
fi
[[ $status -eq 0 ]] && echo "sanitize.sh: no sanitizer report"
exit $status
