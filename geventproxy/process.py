"""This process as the operating system sees it: its name, and its /proc figures.

The figures are the ``process_*`` metrics every Prometheus exporter has
(open descriptors and their limit, resident and virtual memory, CPU seconds,
start time), read from Linux's /proc the way the reference client library
reads them, without it. Parsing is pure (text in, numbers out); reading the
files is the only I/O. Elsewhere than Linux there is no /proc: ``figures``
returns None and the metrics are left out.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, NamedTuple

__all__ = [
    "Figures",
    "figures",
    "parse_limits",
    "parse_stat",
    "set_name",
    "boot_time",
    "trim_heap",
]

#: prctl option that names the calling thread (the process, from its main thread).
PR_SET_NAME = 15
#: The kernel keeps 15 bytes of a name (16 with the NUL).
NAME_MAX = 15


class Figures(NamedTuple):
    """One process, in the units of the Prometheus names."""

    open_fds: int
    max_fds: float  # the soft RLIMIT_NOFILE; +Inf when unlimited
    resident_memory_bytes: int
    virtual_memory_bytes: int
    cpu_seconds_total: float
    start_time_seconds: float  # since the Unix epoch
    ppid: int


def set_name(name: str) -> bool:
    """Name this process for ``ps -o comm``, ``top``, ``pgrep`` (Linux ``prctl``).

    Only the short name: the full command line (``ps -o args``) lives in the
    process's own argv memory, which the standard library cannot rewrite.
    False where the platform has no ``prctl``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The symbols already loaded, libc's among them: no library search (which
        # would run a subprocess) in a worker that has just been forked.
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_NAME, name.encode()[:NAME_MAX], 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _libc_function(name: str) -> Any:
    """A C library function by name, or None where the library has none of that name."""
    try:
        # The symbols already loaded, libc's among them: no library search (which
        # would run a subprocess) in a worker that has just been forked.
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


_malloc_trim: Any = False  # looked up on first use


def trim_heap() -> bool:
    """Give the free pages inside the C heap back to the system (glibc's ``malloc_trim``).

    Blocks that many ended greenlets freed at once (their saved stacks)
    lie between blocks still in use, so the heap cannot shrink from its
    top: without this they stay resident until reused. False where the C
    library has no ``malloc_trim`` (not glibc).
    """
    global _malloc_trim
    if _malloc_trim is False:
        _malloc_trim = _libc_function("malloc_trim") if sys.platform.startswith("linux") else None
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def parse_stat(text: str, clock_ticks: int, page_size: int, booted_at: float) -> dict[str, float]:
    """The fields of ``/proc/PID/stat`` that the metrics need.

    The command name (field 2) is in parentheses and may itself hold spaces
    and parentheses: the fields are counted from the last ``)``.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field N is rest[N - 3].
    utime, stime = int(rest[11]), int(rest[12])
    return {
        "ppid": int(rest[1]),
        "cpu_seconds_total": (utime + stime) / clock_ticks,
        "start_time_seconds": booted_at + int(rest[19]) / clock_ticks,
        "virtual_memory_bytes": int(rest[20]),
        "resident_memory_bytes": int(rest[21]) * page_size,
    }


def parse_limits(text: str) -> float:
    """The soft limit on open files from ``/proc/PID/limits`` (+Inf when unlimited)."""
    for line in text.splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files") :].split()[0]
            return float("inf") if soft == "unlimited" else float(soft)
    raise ValueError("no 'Max open files' line")


def boot_time(stat_text: str) -> float:
    """When the machine booted, in Unix seconds, from ``/proc/stat``'s ``btime``."""
    for line in stat_text.splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError("no btime line")


_booted_at: float | None = None


def figures(pid: int | None = None) -> Figures | None:
    """The figures of process ``pid`` (this one by default), or None if it is gone."""
    global _booted_at
    proc = f"/proc/{pid or 'self'}"
    try:
        if _booted_at is None:
            with open("/proc/stat") as f:
                _booted_at = boot_time(f.read())
        with open(f"{proc}/stat") as f:
            stat = parse_stat(
                f.read(), os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE"), _booted_at
            )
        with open(f"{proc}/limits") as f:
            max_fds = parse_limits(f.read())
        open_fds = len(os.listdir(f"{proc}/fd"))
    except (OSError, ValueError, IndexError):
        return None
    return Figures(
        open_fds=open_fds,
        max_fds=max_fds,
        resident_memory_bytes=int(stat["resident_memory_bytes"]),
        virtual_memory_bytes=int(stat["virtual_memory_bytes"]),
        cpu_seconds_total=stat["cpu_seconds_total"],
        start_time_seconds=stat["start_time_seconds"],
        ppid=int(stat["ppid"]),
    )
