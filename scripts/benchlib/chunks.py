"""The per-chunk accounting alone, in this process: compiled accelerator and pure Python.

``Meter.account`` is what the copy loop calls once per forwarded chunk.
Timed here without sockets, on CPU time (``time.process_time``), as the
best of several repeats: other work on the machine disturbs this far less
than the end-to-end figures, so it shows what a change to the counting
code does. It is not a substitute for the end-to-end runs.
"""

from __future__ import annotations

import time
import timeit
from typing import Any, Callable

from geventproxy.latency import RequestTimer
from geventproxy.meter import Meter
from geventproxy.stats import LATENCY_BOUNDS_US, Stats, layout

__all__ = ["measure_chunks"]

_DATA = b"abcdefghij"  # what loadgen sends
_DIGEST = b"0123456789abcdef0123456789abcdef"  # what a reply carries


def _round_trips() -> list[tuple[str, bytes, bytes, int]]:
    """(name, client chunk, upstream chunk, messages): what the two loops see."""
    reqs = b"".join(b"REQ %d %s\n" % (i, _DATA) for i in range(100000, 100100))
    replies = b"".join(
        b"%s %d %s\n" % (b"NAK" if i % 8 == 3 else b"ACK", i, _DIGEST)
        for i in range(100000, 100100)
    )
    return [
        ("serial: 1 REQ, 1 reply", b"REQ 123456 %s\n" % _DATA, b"ACK 123456 %s\n" % _DIGEST, 2),
        ("pipelined: 100 REQs, 100 replies", reqs, replies, 200),
    ]


def _meters(compiled: bool) -> tuple[Any, Any]:
    stats = Stats()
    if compiled:
        from geventproxy import _accel

        writer = _accel.StatsWriter(stats.block, None, layout(), LATENCY_BOUNDS_US)
        timer = _accel.RequestTimer(writer)
        return _accel.Meter(0, 65536, timer), _accel.Meter(1, 65536, timer)
    timer = RequestTimer(stats)
    return Meter(0, 65536, timer), Meter(1, 65536, timer)


def _best_ns(fn: Callable[[], Any], number: int, repeat: int = 7) -> float:
    timer = timeit.Timer(fn, timer=time.process_time)
    return min(timer.repeat(number=number, repeat=repeat)) / number * 1e9


def measure_chunks(implementations: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """(ns per round trip, ns per message) by implementation: a client chunk and the
    upstream chunk that answers it, each through its direction's Meter."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name in implementations:
        up, down = _meters(name == "accelerated")
        row = {}
        for label, request, reply, messages in _round_trips():
            number = 20000 if messages < 10 else 1000
            pair = (up.account, down.account, request, reply)
            ns = _best_ns(lambda p=pair: (p[0](p[2]), p[1](p[3])), number)
            row[label] = (ns, ns / messages)
        out[name] = row
    return out
