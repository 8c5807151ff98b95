"""The process figures from /proc, and the process name."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest

from geventproxy import process
from geventproxy.testing.launch import child_env

# /proc/PID/stat of a process whose name holds spaces and parentheses, as the kernel
# writes it: fields 14-15 utime/stime 250+150 ticks, 22 starttime 5000 ticks,
# 23 vsize, 24 rss 300 pages.
STAT = (
    "4242 (geventproxy (w0) x) S 4200 4242 4242 0 -1 4194560 1000 0 0 0 "
    "250 150 0 0 20 0 3 0 5000 123456789 300 18446744073709551615 "
    "1 1 0 0 0 0 0 16781312 134234626 0 0 0 17 1 0 0 0 0 0"
)

LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 524288               files
Max locked memory         65536                65536                bytes
"""


def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    figures = process.parse_stat(STAT, clock_ticks=100, page_size=4096, booted_at=1_000_000.0)
    assert figures == {
        "ppid": 4200,
        "cpu_seconds_total": 4.0,
        "start_time_seconds": 1_000_050.0,
        "virtual_memory_bytes": 123456789,
        "resident_memory_bytes": 300 * 4096,
    }


def test_parse_limits_and_boot_time() -> None:
    assert process.parse_limits(LIMITS) == 1024.0
    unlimited = LIMITS.replace("1024                 524288", "unlimited            unlimited")
    assert process.parse_limits(unlimited) == float("inf")
    with pytest.raises(ValueError):
        process.parse_limits("Limit Soft Hard\n")
    assert process.boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 5\n") == 1700000000.0


def test_figures_of_this_process_match_what_the_kernel_says() -> None:
    figures = process.figures()
    assert figures is not None
    assert figures.max_fds == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # listdir holds one descriptor of its own while it reads the directory.
    assert abs(figures.open_fds - len(os.listdir("/proc/self/fd"))) <= 1
    assert figures.ppid == os.getppid()
    assert figures.resident_memory_bytes > 1 << 20
    assert figures.virtual_memory_bytes >= figures.resident_memory_bytes
    assert 0 < figures.cpu_seconds_total <= time.process_time() + 1
    assert time.time() - 24 * 3600 < figures.start_time_seconds <= time.time() + 1
    assert process.figures(os.getpid()) is not None


def test_figures_of_a_process_that_is_gone() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert process.figures(child.pid) is None


def test_set_name_is_what_ps_shows() -> None:
    code = (
        "from geventproxy import process\n"
        "assert process.set_name('geventproxy w12345')\n"
        "print(open('/proc/self/comm').read().strip())"
    )
    assert _run_python(code) == "geventproxy w12\n"  # the kernel keeps 15 bytes


def test_trim_heap_gives_back_the_pages_of_blocks_freed_between_live_ones() -> None:
    """1. A fresh process allocates 64 MiB of 2 KiB blocks, keeping one block in eight.
    2. It frees the rest: the heap cannot shrink past the kept blocks, RSS stays.
    3. trim_heap() returns the free pages between them: RSS drops by over 24 MiB."""
    if not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"):
        pytest.skip("malloc_trim is glibc's")
    code = (
        "from geventproxy import process\n"
        "def rss(): return process.figures().resident_memory_bytes >> 20\n"
        "blocks = [bytearray(2048) for _ in range(32768)]\n"
        "kept = blocks[::8]\n"
        "del blocks\n"
        "before = rss()\n"
        "assert process.trim_heap()\n"
        "print(before, rss())"
    )
    before, after = map(int, _run_python(code).split())
    assert before - after > 24, (before, after)


def _run_python(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter (its own process name and heap)."""
    done = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
