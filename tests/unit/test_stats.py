"""Moving windows against a brute-force oracle, with an injected clock.

Every test runs on both writers of a block: ``Stats.record`` and the
compiled accelerator's (tests/unit/implementations.py).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geventproxy.codec import Counts
from geventproxy.sharedstats import SharedStats
from geventproxy.stats import BUCKET_NS, Stats, new_block, set_pid, snapshot, worker_figures
from tests.unit.fakes import FakeClock, S
from tests.unit.implementations import IMPLEMENTATIONS

pytestmark = pytest.mark.parametrize("impl", IMPLEMENTATIONS)


class Oracle:
    """Every message's timestamp, counted exactly in (now - W, now]."""

    def __init__(self) -> None:
        self.req: list[int] = []
        self.resp: list[int] = []

    def rate(self, kind: str, now: int, w: int) -> float:
        stamps = self.req if kind == "req" else self.resp
        return sum(1 for t in stamps if now - w * S < t <= now) / w


def _feed(impl, stats: Stats, oracle: Oracle, clock: FakeClock, req: int, resp: int) -> None:
    record = impl.record(stats)
    record(0, 10, Counts(req=req))
    record(1, 10, Counts(ack=resp - resp // 2, nak=resp // 2))
    oracle.req += [clock.now] * req
    oracle.resp += [clock.now] * resp


def _boundary_events(oracle: Oracle, kind: str, now: int, w: int) -> int:
    """Messages in the one bucket that straddles now - W: the most the window may miss."""
    stamps = oracle.req if kind == "req" else oracle.resp
    edge = (now - w * S) // BUCKET_NS
    return sum(1 for t in stamps if t // BUCKET_NS == edge and t > now - w * S)


def _check(stats: Stats, oracle: Oracle, now: int) -> None:
    report = snapshot([stats.block], now)
    for kind, name in (("req", "request"), ("resp", "response")):
        for w in (1, 10):
            got = report[f"{name}_rate_{w}s"]
            exact = oracle.rate(kind, now, w)
            slack = _boundary_events(oracle, kind, now, w) / w
            assert exact - slack - 1e-9 <= got <= exact + 1e-9, (kind, w, got, exact)
            assert isinstance(got, float)


def test_steady_traffic_within_one_percent(impl) -> None:
    clock = FakeClock()
    stats, oracle = Stats(clock=clock), Oracle()
    worst = 0.0
    for _step in range(30_000):  # 30 s at one chunk of 3 REQ every ms, offset within the ms
        clock.now += BUCKET_NS
        _feed(impl, stats, oracle, clock, 3, 3)
        if _step % 997 == 0:
            report = snapshot([stats.block], clock.now)
            for w in (1, 10):
                exact = oracle.rate("req", clock.now, w)
                worst = max(worst, abs(report[f"request_rate_{w}s"] - exact) / exact)
    assert worst <= 0.01
    _check(stats, oracle, clock.now)


def test_zero_exactly_after_window_and_not_before(impl) -> None:
    clock = FakeClock(1000 * S + 123_456)  # mid-bucket
    stats, oracle = Stats(clock=clock), Oracle()
    _feed(impl, stats, oracle, clock, 5, 5)
    last = clock.now
    clock.now = last + S - 1
    assert snapshot([stats.block], clock.now)["request_rate_1s"] in (0.0, 5.0)
    _check(stats, oracle, clock.now)
    clock.now = last + S
    r = snapshot([stats.block], clock.now)
    assert r["request_rate_1s"] == 0.0 and r["response_rate_1s"] == 0.0
    assert r["request_rate_10s"] == 0.5
    clock.now = last + 10 * S
    r = snapshot([stats.block], clock.now)
    assert r["request_rate_10s"] == 0.0 and r["response_rate_10s"] == 0.0
    assert r["msg_req"] == 5 and r["msg_total"] == 10


def test_gap_longer_than_ring_recycles_buckets(impl) -> None:
    clock = FakeClock()
    stats, oracle = Stats(clock=clock), Oracle()
    _feed(impl, stats, oracle, clock, 7, 7)
    clock.now += 10 * S  # exactly one ring later: same slot, stale stamp
    _feed(impl, stats, oracle, clock, 2, 1)
    r = snapshot([stats.block], clock.now)
    assert r["request_rate_1s"] == 2.0 and r["response_rate_1s"] == 1.0
    _check(stats, oracle, clock.now)


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.integers(0, 3 * S),  # gap before the chunk, up to 3 s
            st.integers(0, 50),
            st.integers(0, 50),
        ),
        max_size=60,
    ),
    probes=st.lists(st.integers(0, 12 * S), min_size=1, max_size=5),
)
def test_random_steps_bursts_and_gaps(impl, events, probes) -> None:
    clock = FakeClock(1000 * S + 777)
    stats, oracle = Stats(clock=clock), Oracle()
    for gap, req, resp in events:
        clock.now += gap
        _feed(impl, stats, oracle, clock, req, resp)
        _check(stats, oracle, clock.now)
    end = clock.now
    for p in probes:
        _check(stats, oracle, end + p)


def test_bucket_boundaries(impl) -> None:
    """Events on both sides of a millisecond edge, probed on the edge."""
    clock = FakeClock(500 * S)
    stats, oracle = Stats(clock=clock), Oracle()
    for t in (500 * S - 1, 500 * S, 500 * S + 1, 500 * S + BUCKET_NS - 1, 500 * S + BUCKET_NS):
        clock.now = t
        _feed(impl, stats, oracle, clock, 1, 1)
    # Every nanosecond around both edges, and a spread of probes between them (each
    # probe is a full snapshot: probing all million nanoseconds would take minutes).
    edges = (501 * S, 501 * S + BUCKET_NS)
    probes = {edge + d for edge in edges for d in range(-3, 4)}
    probes.update(range(501 * S - 2, 501 * S + BUCKET_NS + 2, 9_973))
    for probe in sorted(probes):
        _check(stats, oracle, probe)


def test_blocks_sum(impl) -> None:
    clock = FakeClock()
    shared = SharedStats.create(2)  # a worker's block, in shared memory
    shared.give(1, worker=0, generation=1)
    a, b = Stats(shared.blocks[1], clock), Stats(new_block(), clock)
    rng = random.Random(5)
    total = 0
    for _ in range(500):
        clock.now += rng.randrange(0, 5 * BUCKET_NS)
        n = rng.randrange(1, 4)
        impl.record(a if rng.random() < 0.5 else b)(0, 1, Counts(req=n))
        total += n
    one = snapshot([a.block], clock.now)
    two = snapshot([b.block], clock.now)
    both = snapshot([a.block, b.block], clock.now)
    assert both["msg_req"] == total == one["msg_req"] + two["msg_req"]
    for key in ("request_rate_1s", "request_rate_10s", "bytes_client_to_upstream"):
        assert both[key] == one[key] + two[key]


def test_counters_and_report_fields(impl) -> None:
    clock = FakeClock()
    stats = Stats(clock=clock)
    stats.incr("connections_total")
    stats.incr("connections_active")
    stats.closed("client_reset")
    impl.record(stats)(0, 100, Counts(req=2, invalid=1))
    impl.record(stats)(1, 50, Counts(ack=1, nak=1))
    r = snapshot([stats.block], clock.now + S)
    assert r["msg_total"] == 4 and r["msg_invalid"] == 1
    assert (r["msg_req"], r["msg_ack"], r["msg_nak"]) == (2, 1, 1)
    assert r["bytes_client_to_upstream"] == 100 and r["bytes_upstream_to_client"] == 50
    assert r["connections_closed"]["client_reset"] == 1
    assert r["connections_total"] == r["connections_active"] == 1
    assert r["msg_invalid_client_to_upstream"] == 1
    assert r["uptime_s"] == 1.0


def test_worker_figures_are_one_block_alone(impl) -> None:
    clock = FakeClock()
    shared = SharedStats.create(3)  # workers' blocks, in shared memory
    shared.give(1, worker=0, generation=1)
    shared.give(2, worker=0, generation=1)
    mine, other = Stats(shared.blocks[1], clock), Stats(shared.blocks[2], clock)
    set_pid(mine.block, 4242)
    mine.incr("connections_total", 3)
    mine.incr("connections_active")
    impl.record(mine)(0, 10, Counts(req=5))
    impl.record(mine)(1, 10, Counts(ack=5))
    impl.record(other)(0, 10, Counts(req=7))
    assert worker_figures(mine.block) == {
        "pid": 4242,
        "connections_active": 1,
        "connections_total": 3,
        "requests": 5,
    }
    assert worker_figures(other.block)["pid"] == 0
    assert snapshot([mine.block, other.block], clock.now)["msg_req"] == 12
