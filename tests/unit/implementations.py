"""The two implementations of the per-chunk work, side by side, for parametrized tests.

Each is a namespace with the same names: ``classify``, ``count_block``,
``LineScanner``, ``record(stats)`` and ``observe_latency(stats)`` (the
functions that write ``stats.block``), ``timer(stats, limit)`` and
``meter(direction, max_line, timer)``. The compiled one is skipped where
the extension was not built (tests/unit/test_accel.py says when that is a
failure).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from geventproxy import codec
from geventproxy.latency import RequestTimer
from geventproxy.meter import Meter
from geventproxy.stats import LATENCY_BOUNDS_US, Stats, layout

try:
    from geventproxy import _accel
except ImportError:  # not built here
    _accel = None

__all__ = ["COMPILED", "IMPLEMENTATIONS", "PURE", "REFERENCE", "ComposedMeter", "native_writer"]


class ComposedMeter:
    """What ``Meter.account`` means, spelled as the three reference calls it replaces."""

    def __init__(self, direction: int, max_line: int, timer: RequestTimer) -> None:
        self._scanner = codec.LineScanner(max_line)
        self._record = timer.stats.record
        self._direction = direction
        self._on_messages = timer.answered if direction else timer.sent

    @property
    def pending(self) -> int:
        return self._scanner.pending

    @property
    def mid_line(self) -> bool:
        return self._scanner.mid_line

    def account(self, data: bytes) -> int:
        counts = self._scanner.feed(data)
        now = self._record(self._direction, len(data), counts)
        if now:
            self._on_messages(now, counts)
        return data.count(b"\n")  # the lines it ended, well-formed or not


def native_writer(stats: Stats) -> Any:
    """A compiled writer of ``stats.block`` with its clock (one per Stats, as accel does)."""
    if stats.writer is None:
        clock = None if stats.clock is time.monotonic_ns else stats.clock
        stats.writer = _accel.StatsWriter(stats.block, clock, layout(), LATENCY_BOUNDS_US)
    return stats.writer


PURE = SimpleNamespace(
    name="pure",
    classify=codec.classify,
    count_block=codec.count_block,
    LineScanner=codec.LineScanner,
    record=lambda stats: stats.record,
    observe_latency=lambda stats: stats.observe_latency,
    timer=lambda stats, limit=RequestTimer.default_limit: RequestTimer(stats, limit),
    meter=Meter,
)

REFERENCE = SimpleNamespace(**{**vars(PURE), "name": "reference", "meter": ComposedMeter})

COMPILED = (
    None
    if _accel is None
    else SimpleNamespace(
        name="compiled",
        classify=_accel.classify,
        count_block=_accel.count_block,
        LineScanner=_accel.LineScanner,
        record=lambda stats: native_writer(stats).record,
        observe_latency=lambda stats: native_writer(stats).observe_latency,
        timer=lambda stats, limit=RequestTimer.default_limit: _accel.RequestTimer(
            native_writer(stats), limit
        ),
        meter=_accel.Meter,
    )
)

IMPLEMENTATIONS = [
    pytest.param(PURE, id="pure"),
    pytest.param(
        COMPILED,
        id="compiled",
        marks=pytest.mark.skipif(COMPILED is None, reason="the extension is not built"),
    ),
]
