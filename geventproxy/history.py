"""The last five minutes, one sample a second, in a fixed-size ring.

The live page (``GET /``) and ``geventproxy top`` draw charts from it, so a
page opened late shows the past at once. A sampler takes one
``stats.snapshot`` a second (never anything per message, so the hot path
does not pay for it) and turns two consecutive snapshots into one row:
rates are the counts between the two, divided by the exact time between
them, so a series summed over time gives back the counters exactly.

The ring is a flat block of floats (NaN for "no value"): a list, or the
region of the shared statistics file (``sharedstats``) where the parent
process writes it and worker 0, which serves ``-admin``, reads it. So the
history carries on across a restart of worker 0 and across reloads. A row
is written before the count that makes it visible; one process writes.
No gevent here: the parent, which has no event loop, drives the sampler.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Union

__all__ = [
    "CAPACITY",
    "FIELDS",
    "INTERVAL_S",
    "SLOTS",
    "History",
    "Sampler",
    "new_history_block",
    "sample_row",
]

#: Seconds between two samples.
INTERVAL_S = 1.0
#: Samples kept: five minutes.
CAPACITY = 300

# The fields of a sample, in row order. "mono" is the monotonic clock of the
# sample (internal: the next sample's interval starts there); the others are
# served. Counters are cumulative, so any two samples give exact deltas.
_ROW = (
    "seq",  # sample number since the history began
    "t",  # wall-clock time of the sample, Unix seconds
    "mono",
    "dt",  # seconds since the previous sample: the window of the rates below
    "uptime_s",
    "requests_per_s",  # REQs in the window / dt
    "responses_per_s",  # ACKs + NAKs in the window / dt
    "nak_share",  # NAKs / (ACKs + NAKs) in the window; null without replies
    "invalid_per_s",  # lines that are not well-formed, in the window / dt
    "latency_p50_ms",  # as on /stats: the last 10 s; null without replies
    "latency_p90_ms",
    "latency_p99_ms",
    "connections_active",
    "msg_req",  # cumulative, as on /stats
    "msg_ack",
    "msg_nak",
    "msg_invalid",
)
FIELDS = tuple(name for name in _ROW if name != "mono")
_INT_FIELDS = frozenset(
    ("seq", "connections_active", "msg_req", "msg_ack", "msg_nak", "msg_invalid")
)
# Times to the millisecond; rates unrounded, so that rate * dt gives the count back.
_DIGITS = {"t": 3, "uptime_s": 3}
_I = {name: i for i, name in enumerate(_ROW)}
_WIDTH = len(_ROW)
# Header: when the history began (Unix ms, its identity), samples written so far.
_INSTANCE, _COUNT = 0, 1
_HEADER = 2
SLOTS = _HEADER + CAPACITY * _WIDTH

HistoryBlock = Union[list, memoryview]


def new_history_block(now: float | None = None) -> HistoryBlock:
    """An empty ring (``sharedstats`` copies one into shared memory)."""
    block: HistoryBlock = [0.0] * SLOTS
    block[_INSTANCE] = float(int((time.time() if now is None else now) * 1000))
    block[_COUNT] = 0.0
    return block


def _none(value: Any) -> float:
    return math.nan if value is None else float(value)


def sample_row(
    seq: int,
    wall: float,
    mono: float,
    report: dict[str, Any],
    previous: tuple[float, int, int, int, int] | None,
) -> list[float]:
    """One row from a snapshot ``report`` taken at ``mono``.

    ``previous`` is (mono, msg_req, msg_ack, msg_nak, msg_invalid) of the
    sample before (or of the sampler's start); without it the rates are NaN.
    """
    row = [math.nan] * _WIDTH
    row[_I["seq"]] = float(seq)
    row[_I["t"]] = wall
    row[_I["mono"]] = mono
    row[_I["uptime_s"]] = float(report["uptime_s"])
    for q in ("p50", "p90", "p99"):
        row[_I[f"latency_{q}_ms"]] = _none(report[f"latency_{q}_ms"])
    totals = [report[f"msg_{kind}"] for kind in ("req", "ack", "nak", "invalid")]
    for name, value in zip(("msg_req", "msg_ack", "msg_nak", "msg_invalid"), totals):
        row[_I[name]] = float(value)
    row[_I["connections_active"]] = float(report["connections_active"])
    if previous is not None and mono > previous[0]:
        dt = mono - previous[0]
        req, ack, nak, invalid = (now - before for now, before in zip(totals, previous[1:]))
        row[_I["dt"]] = dt
        row[_I["requests_per_s"]] = req / dt
        row[_I["responses_per_s"]] = (ack + nak) / dt
        row[_I["invalid_per_s"]] = invalid / dt
        if ack + nak:
            row[_I["nak_share"]] = nak / (ack + nak)
    return row


class History:
    """The ring: ``append`` a row, read ``samples`` after a sequence number."""

    capacity = CAPACITY
    interval_s = INTERVAL_S

    def __init__(self, block: HistoryBlock | None = None) -> None:
        self.block = new_history_block() if block is None else block

    @property
    def instance(self) -> str:
        """Identifies this history: a page that sees it change starts over."""
        return str(int(self.block[_INSTANCE]))

    def __len__(self) -> int:
        return min(int(self.block[_COUNT]), CAPACITY)

    def append(self, row: Sequence[float]) -> None:
        count = int(self.block[_COUNT])
        base = _HEADER + (count % CAPACITY) * _WIDTH
        for i, value in enumerate(row):
            self.block[base + i] = float(value)
        self.block[_COUNT] = float(count + 1)

    def _row(self, n: int) -> list[float]:
        base = _HEADER + (n % CAPACITY) * _WIDTH
        return list(self.block[base : base + _WIDTH])

    def last(self) -> list[float] | None:
        count = int(self.block[_COUNT])
        return self._row(count - 1) if count else None

    def next_seq(self) -> int:
        return int(self.block[_COUNT])

    def samples(self, after: int = -1) -> list[dict[str, Any]]:
        """The rows with ``seq > after``, oldest first, as JSON-ready dicts."""
        count = int(self.block[_COUNT])
        first = max(count - CAPACITY, after + 1, 0)
        return [_as_dict(self._row(n)) for n in range(first, count)]

    def document(self, after: int = -1, version: str = "") -> dict[str, Any]:
        """The body of ``/history``."""
        return {
            "version": version,
            "instance": self.instance,
            "interval_s": INTERVAL_S,
            "capacity": CAPACITY,
            "fields": list(FIELDS),
            "samples": self.samples(after),
        }


def _as_dict(row: list[float]) -> dict[str, Any]:
    sample: dict[str, Any] = {}
    for name in FIELDS:
        value = row[_I[name]]
        if math.isnan(value):
            sample[name] = None
        elif name in _INT_FIELDS:
            sample[name] = int(value)
        elif name in _DIGITS:
            sample[name] = round(value, _DIGITS[name])
        else:
            sample[name] = value
    return sample


class Sampler:
    """Appends one row to ``history`` every INTERVAL_S seconds, when ``tick`` says.

    Ticks are on a fixed grid of the monotonic clock, so a late call (a busy
    loop) does not shift the ones after it; a missed tick is simply not
    sampled, and the next row's ``dt`` covers the gap. The caller's loop
    calls ``tick`` and sleeps no longer than until ``next_tick``.
    """

    def __init__(
        self,
        history: History,
        snapshot: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.history = history
        self.snapshot = snapshot
        self.clock = clock
        self.wall = wall
        self._previous: tuple[float, int, int, int, int] | None = None
        self.next_tick = math.inf

    def start(self) -> None:
        last = self.history.last()
        if last is not None:
            # A ring that outlived its sampler: the next interval starts at the last row.
            self._previous = (
                last[_I["mono"]],
                *(int(last[_I[f"msg_{k}"]]) for k in ("req", "ack", "nak", "invalid")),
            )
        else:
            self._previous = self._totals(self.clock(), self.snapshot())
        self.next_tick = self.clock() + INTERVAL_S

    @staticmethod
    def _totals(mono: float, report: dict[str, Any]) -> tuple[float, int, int, int, int]:
        return (
            mono,
            report["msg_req"],
            report["msg_ack"],
            report["msg_nak"],
            report["msg_invalid"],
        )

    def sample(self) -> None:
        """Take one sample now."""
        report = self.snapshot()  # no yield between the snapshot and the clock reads
        mono, wall = self.clock(), self.wall()
        row = sample_row(self.history.next_seq(), wall, mono, report, self._previous)
        self.history.append(row)
        self._previous = self._totals(mono, report)

    def tick(self) -> None:
        """Sample if a tick is due."""
        now = self.clock()
        if now < self.next_tick:
            return
        self.sample()
        while self.next_tick <= now:
            self.next_tick += INTERVAL_S
