"""Which implementation does the per-chunk work: the compiled accelerator or pure Python.

``geventproxy._accel`` is a C extension built by ``pip install`` where a C
compiler is found. It is used unless ``GEVENTPROXY_PURE=1`` is set, or it
is missing or fails to import; then the pure-Python reference (codec,
stats, latency, meter) runs. Both give identical counts, statistics and
timings; the tests hold them to it. The choice is made once, at import.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

from .latency import RequestTimer
from .meter import Meter
from .stats import LATENCY_BOUNDS_US, Stats, layout

__all__ = [
    "COMPILED",
    "DESCRIPTION",
    "PURE_ENV",
    "copy_loop",
    "new_meter",
    "new_timer",
    "writer_for",
]

PURE_ENV = "GEVENTPROXY_PURE"
#: The _accel.INTERFACE this code was written against: a build from older
#: sources (a checkout updated without rebuilding) is not used.
INTERFACE = 2


def _load() -> tuple[Any, str]:
    """The extension module (or None) and a phrase that says which is in use and why."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return None, f"pure Python ({PURE_ENV}={os.environ[PURE_ENV]})"
    try:
        native = importlib.import_module(f"{__package__}._accel")
    except ModuleNotFoundError:
        return None, "pure Python (compiled accelerator not built)"
    except ImportError as exc:  # built, but for another interpreter, or broken
        return None, f"pure Python (compiled accelerator failed to import: {exc})"
    built = getattr(native, "INTERFACE", 1)
    if built != INTERFACE:
        return None, (
            f"pure Python (compiled accelerator is a stale build, interface {built}, "
            f"not {INTERFACE}: rebuild it with pip install -e .)"
        )
    return native, "compiled accelerator"


_native, DESCRIPTION = _load()
COMPILED = _native is not None
#: relay._copy compiled (recv, send and the accounting in C), or None on the pure path.
copy_loop = _native.copy if COMPILED else None


def writer_for(stats: Stats) -> Any:
    """The compiled writer of ``stats``'s block, made once per Stats."""
    if stats.writer is None:
        clock = None if stats.clock is time.monotonic_ns else stats.clock
        stats.writer = _native.StatsWriter(stats.block, clock, layout(), LATENCY_BOUNDS_US)
    return stats.writer


def new_timer(stats: Stats, limit: int = RequestTimer.default_limit) -> Any:
    """A RequestTimer for one connection: its ``sent``/``answered`` take (now, counts)."""
    if COMPILED:
        return _native.RequestTimer(writer_for(stats), limit)
    return RequestTimer(stats, limit)


def new_meter(direction: int, max_line: int, timer: Any) -> Any:
    """One direction's Meter (``account(chunk)`` per forwarded chunk) on ``timer``."""
    if COMPILED:
        return _native.Meter(direction, max_line, timer)
    return Meter(direction, max_line, timer)
