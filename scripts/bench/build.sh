#!/usr/bin/env bash
# Build the benchmark instruments (loadgen, stub) from their C sources.
#
# Usage: scripts/bench/build.sh [OUTDIR]
#   OUTDIR defaults to ${TMPDIR:-/tmp}/geventproxy-bench.
# Safe to run again: binaries are rebuilt into a temporary name and moved
# into place, so a concurrent reader never sees a half-written file.
# Prints the output directory (only that, on stdout) for callers to capture:
#   BIN=$(scripts/bench/build.sh)
set -euo pipefail

src_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out_dir=${1:-${TMPDIR:-/tmp}/geventproxy-bench}
cc=${CC:-cc}

mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)

for prog in loadgen stub; do
    tmp="$out_dir/.$prog.tmp.$$"
    # Compiler messages go to stderr so stdout stays just the directory.
    if ! "$cc" -O2 -Wall -Wextra -Wno-unused-parameter -o "$tmp" "$src_dir/$prog.c" >&2; then
        rm -f "$tmp"
        echo "build.sh: failed to compile $prog.c" >&2
        exit 1
    fi
    mv -f "$tmp" "$out_dir/$prog"
done

echo "$out_dir"
