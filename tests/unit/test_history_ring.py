"""The live page's history: rows from snapshots, the fixed ring, the sampler."""

from __future__ import annotations

import array
import math
import sys

import pytest

from geventproxy.history import (
    CAPACITY,
    FIELDS,
    SLOTS,
    History,
    HistoryBlock,
    Sampler,
    new_history_block,
    sample_row,
)
from geventproxy.sharedstats import SharedStats
from geventproxy.stats import Stats, snapshot


def _report(req=0, ack=0, nak=0, invalid=0, active=0, p50=None, uptime=1.0) -> dict:
    return {
        "msg_req": req,
        "msg_ack": ack,
        "msg_nak": nak,
        "msg_invalid": invalid,
        "connections_active": active,
        "latency_p50_ms": p50,
        "latency_p90_ms": p50,
        "latency_p99_ms": p50,
        "uptime_s": uptime,
    }


def _as_sample(row: list[float]) -> dict:
    history = History()
    history.append(row)
    return history.samples()[0]


def test_a_row_holds_the_rates_between_two_snapshots() -> None:
    previous = (10.0, 100, 80, 20, 1)
    row = sample_row(7, 1_700_000_000.5, 10.5, _report(400, 320, 80, 6, 3, 1.25, 9.5), previous)
    sample = _as_sample(row)
    assert sample == {
        "seq": 7,
        "t": 1_700_000_000.5,
        "dt": 0.5,
        "uptime_s": 9.5,
        "requests_per_s": 600.0,  # 300 REQs in half a second
        "responses_per_s": 600.0,  # 240 ACKs + 60 NAKs
        "nak_share": 0.2,
        "invalid_per_s": 10.0,
        "latency_p50_ms": 1.25,
        "latency_p90_ms": 1.25,
        "latency_p99_ms": 1.25,
        "connections_active": 3,
        "msg_req": 400,
        "msg_ack": 320,
        "msg_nak": 80,
        "msg_invalid": 6,
    }
    assert list(sample) == list(FIELDS)


def test_no_replies_no_share_no_latency_and_no_previous_no_rates() -> None:
    sample = _as_sample(sample_row(0, 1.0, 5.0, _report(10, 0, 0), (4.0, 0, 0, 0, 0)))
    assert sample["nak_share"] is None and sample["latency_p99_ms"] is None
    assert sample["requests_per_s"] == 10.0 and sample["responses_per_s"] == 0.0
    first = _as_sample(sample_row(0, 1.0, 5.0, _report(10, 5, 5), None))
    assert first["dt"] is None and first["requests_per_s"] is None and first["nak_share"] is None
    assert first["msg_req"] == 10


def _shared_ring(now: float | None = None) -> HistoryBlock:
    """The ring in the shared statistics file, where the parent writes it."""
    ring = SharedStats.create(2).history
    ring[:] = array.array("d", new_history_block(now=now))
    return ring


@pytest.mark.parametrize("shared", [False, True])
def test_the_ring_keeps_the_last_capacity_samples(shared: bool) -> None:
    block = _shared_ring(now=1234.5) if shared else new_history_block(now=1234.5)
    history = History(block)
    assert history.instance == "1234500" and history.samples() == [] and history.last() is None
    for n in range(CAPACITY + 25):
        history.append(sample_row(n, float(n), float(n), _report(req=n), None))
    assert len(history) == CAPACITY
    seqs = [s["seq"] for s in history.samples()]
    assert seqs == list(range(25, CAPACITY + 25))
    assert [s["seq"] for s in history.samples(after=CAPACITY + 20)] == [
        CAPACITY + 21,
        CAPACITY + 22,
        CAPACITY + 23,
        CAPACITY + 24,
    ]
    assert history.samples(after=10**9) == []
    assert [s["seq"] for s in history.samples(after=3)] == seqs  # older than the ring: all
    document = history.document(after=CAPACITY + 23, version="9.9")
    assert document["version"] == "9.9" and document["instance"] == "1234500"
    assert document["capacity"] == CAPACITY and document["interval_s"] == 1.0
    assert document["fields"] == list(FIELDS)
    assert [s["msg_req"] for s in document["samples"]] == [CAPACITY + 24]


def test_the_ring_has_a_fixed_size() -> None:
    history = History()
    size = sys.getsizeof(history.block)
    for n in range(3 * CAPACITY):
        history.append(sample_row(n, 0.0, float(n), _report(req=n), None))
    assert sys.getsizeof(history.block) == size
    assert SLOTS * 8 < 64 * 1024  # about 40 KiB in the shared file


class Clock:
    def __init__(self) -> None:
        self.mono_ns = 1_000_000_000_000

    def mono(self) -> float:
        return self.mono_ns / 1e9

    def wall(self) -> float:
        return 1_700_000_000 + self.mono()


def test_the_sampler_integrates_to_the_counters() -> None:
    """Rates times intervals, summed over the samples, give back the counts exactly."""
    clock = Clock()
    stats = Stats(clock=lambda: clock.mono_ns)
    history = History()
    sampler = Sampler(
        history, lambda: snapshot([stats.block], clock.mono_ns), clock.mono, clock.wall
    )
    sampler.start()
    sent = 0
    for second, (reqs, dt_ms) in enumerate([(5, 1000), (0, 1000), (17, 1250), (3, 980), (40, 1)]):
        stats.record(0, 10, (reqs, 0, 0, 1))
        stats.record(1, 10, (0, reqs - reqs // 4, reqs // 4, 0))
        sent += reqs
        clock.mono_ns += dt_ms * 1_000_000
        sampler.sample()
        assert history.last() is not None
        assert len(history) == second + 1
    samples = history.samples()
    assert math.isclose(sum(s["requests_per_s"] * s["dt"] for s in samples), sent, abs_tol=1e-6)
    assert math.isclose(
        sum(s["invalid_per_s"] * s["dt"] for s in samples), len(samples), abs_tol=1e-6
    )
    naks = sum((s["nak_share"] or 0) * s["responses_per_s"] * s["dt"] for s in samples)
    assert math.isclose(naks, sum(r // 4 for r in (5, 0, 17, 3, 40)), abs_tol=1e-3)
    assert samples[1]["nak_share"] is None  # a second without replies
    assert [round(s["dt"], 9) for s in samples] == [1.0, 1.0, 1.25, 0.98, 0.001]
    assert samples[-1]["msg_req"] == sent


def test_a_restarted_sampler_carries_on_from_the_last_row() -> None:
    """A new sampler on a ring that outlived the last one: the next interval starts at
    the last row."""
    clock = Clock()
    block = _shared_ring()
    history = History(block)
    first = Sampler(history, lambda: _report(req=100), clock.mono, clock.wall)
    first.start()
    clock.mono_ns += 1_000_000_000
    first.sample()
    clock.mono_ns += 4_000_000_000  # four seconds without a sampler
    again = Sampler(History(block), lambda: _report(req=180), clock.mono, clock.wall)
    again.start()
    again.sample()
    last = History(block).samples()[-1]
    assert (last["seq"], last["dt"], last["requests_per_s"]) == (1, 4.0, 20.0)


def test_ticks_sample_on_a_fixed_grid() -> None:
    """The caller's loop calls tick: one sample per second due, none early, a late
    call samples once and the grid stays where it was."""
    clock = Clock()
    history = History()
    sampler = Sampler(history, lambda: _report(req=len(history)), clock.mono, clock.wall)
    sampler.start()
    start = clock.mono()
    assert sampler.next_tick == start + 1.0
    clock.mono_ns += 999_000_000
    sampler.tick()
    assert len(history) == 0
    clock.mono_ns += 1_000_000
    sampler.tick()
    assert len(history) == 1 and sampler.next_tick == start + 2.0
    clock.mono_ns += 3_500_000_000  # a loop late by two and a half seconds
    sampler.tick()
    assert len(history) == 2 and sampler.next_tick == start + 5.0
