"""Matching responses to requests, with an injected clock (no sockets).

Every test runs on both implementations (tests/unit/implementations.py).
"""

from __future__ import annotations

import tracemalloc

import pytest

from geventproxy.stats import Stats, latency_histogram, snapshot
from tests.unit.implementations import IMPLEMENTATIONS

pytestmark = pytest.mark.parametrize("impl", IMPLEMENTATIONS)

MS = 1_000_000


def _stats() -> Stats:
    return Stats(clock=lambda: 0)


def test_pipelined_requests_are_matched_in_order(impl) -> None:
    """1. Chunks of 3 and 2 REQs sent at t=0 and t=1 ms. 2. Replies arrive 1 and 4 at a time.
    3. Each reply is timed against the chunk that holds its request."""
    stats = _stats()
    timer = impl.timer(stats)
    timer.sent(0, (3, 0, 0, 0))
    timer.sent(1 * MS, (2, 0, 0, 0))
    timer.answered(5 * MS, (0, 1, 0, 0))  # 1st REQ: 5 ms
    timer.answered(9 * MS, (0, 3, 1, 0))  # 2nd, 3rd: 9 ms; 4th, 5th: 8 ms
    counts, total_us = latency_histogram([stats.block])
    assert sum(counts) == 5
    assert total_us == 5_000 + 2 * 9_000 + 2 * 8_000
    assert len(timer) == 0
    report = snapshot([stats.block], 9 * MS)
    assert report["latency_count"] == 5 and report["latency_unmatched"] == 0
    assert 4.0 <= report["latency_p50_ms"] <= 10.0


def test_replies_without_requests_are_counted_not_fatal(impl) -> None:
    stats = _stats()
    timer = impl.timer(stats)
    timer.answered(1 * MS, (0, 2, 0, 0))
    timer.sent(2 * MS, (1, 0, 0, 0))
    timer.answered(3 * MS, (0, 1, 1, 0))
    report = snapshot([stats.block], 3 * MS)
    assert report["latency_unmatched"] == 3 and report["latency_count"] == 1


def test_memory_is_bounded_when_the_server_never_answers(impl) -> None:
    """1. 10,000 chunks of REQs, no reply. 2. At most `limit` chunks are remembered;
    the rest are dropped and counted."""
    stats = _stats()
    timer = impl.timer(stats, limit=100)
    for i in range(10_000):
        timer.sent(i, (2, 0, 0, 0))
    assert len(timer) == 100
    assert snapshot([stats.block], 10_000)["latency_dropped"] == 2 * (10_000 - 100)


def test_replies_to_dropped_requests_are_skipped_not_mismatched(impl) -> None:
    """1. limit=2 and three chunks of one REQ at 0, 1 and 2 ms: the first is dropped.
    2. Three replies at 10, 11, 12 ms: the first answers the dropped REQ and is not
       timed; the other two are timed against their own REQs: 10 ms each."""
    stats = _stats()
    timer = impl.timer(stats, limit=2)
    for t in (0, 1, 2):
        timer.sent(t * MS, (1, 0, 0, 0))
    for t in (10, 11, 12):
        timer.answered(t * MS, (0, 1, 0, 0))
    report = snapshot([stats.block], 12 * MS)
    assert report["latency_dropped"] == 1 and report["latency_unmatched"] == 0
    counts, total_us = latency_histogram([stats.block])
    assert sum(counts) == 2 and total_us == 2 * 10_000


def test_an_answered_timer_keeps_no_queue(impl) -> None:
    """1. Forty chunks of REQs wait at once, then all are answered. 2. The timer gives
    back what it took to remember them: an idle connection holds no FIFO (the compiled
    one keeps a ring of up to 16 entries, smaller than this burst's)."""
    stats = _stats()
    timer = impl.timer(stats)
    timer.sent(0, (1, 0, 0, 0))
    timer.answered(1 * MS, (0, 1, 0, 0))  # the first queue, if any, is made and dropped
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            timer.sent(i * MS, (3, 0, 0, 0))
        during = tracemalloc.get_traced_memory()[0]
        timer.answered(50 * MS, (0, 120, 0, 0))
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(timer) == 0
    assert during > before  # the later chunks took memory...
    assert after - before < 100  # ...given back (at most an int or two remain)
