"""The shared statistics file: what a worker maps, what a report sums, what a reload keeps."""

from __future__ import annotations

import pytest

from geventproxy.codec import Counts
from geventproxy.sharedstats import BASELINE, IncompatibleLayout, SharedStats
from geventproxy.stats import Stats, new_baseline, persistent_totals, snapshot

NOW = 10**12  # any monotonic time, in ns


def _written(shared: SharedStats, index: int, reqs: int) -> Stats:
    """A worker's writes: ``reqs`` REQs and one open connection in block ``index``."""
    stats = Stats(shared.blocks[index], clock=lambda: NOW, mark_start=False)
    stats.record(0, 10 * reqs, Counts(req=reqs))
    stats.incr("connections_total")
    stats.incr("connections_active")
    return stats


def test_a_worker_maps_the_parents_blocks() -> None:
    parent = SharedStats.create(3)
    parent.give(1, worker=0, generation=1)
    worker = SharedStats.attach(parent.fd)  # what the exec'd worker does with the descriptor
    _written(worker, 1, 5)
    assert snapshot(parent.used(), NOW)["msg_req"] == 5
    worker.beat(1)
    assert parent.heartbeat(1) == worker.heartbeat(1) > 0


def test_another_layout_is_refused() -> None:
    parent = SharedStats.create(2)
    header = memoryview(parent._map).cast("q")
    header[1] += 1  # as if written by a version with another block layout
    with pytest.raises(IncompatibleLayout, match="restart"):
        SharedStats.attach(parent.fd)


def test_a_block_outlives_its_worker_and_the_next_one_counts_on() -> None:
    """1. Worker A writes block 1, then exits: its totals stay, its open connection goes.
    2. Worker B gets the free block 1 and counts on from A's totals.
    3. Meanwhile worker C writes block 2: the report is the sum, never less than before."""
    shared = SharedStats.create(4)
    shared.give(1, worker=0, generation=1)
    _written(shared, 1, 5)
    before = snapshot(shared.used(), NOW)
    assert (before["msg_req"], before["connections_active"]) == (5, 1)
    shared.release(1)
    exited = snapshot(shared.used(), NOW)
    assert (exited["msg_req"], exited["connections_active"]) == (5, 0)
    assert exited["request_rate_10s"] == before["request_rate_10s"] == 0.5
    assert shared.free(held=set()) == [1, 2, 3]  # the used block first
    shared.give(1, worker=0, generation=1)
    shared.give(2, worker=0, generation=1)
    _written(shared, 1, 3)
    _written(shared, 2, 2)
    after = snapshot(shared.used(), NOW)
    assert (after["msg_req"], after["connections_total"], after["connections_active"]) == (
        10,
        3,
        2,
    )
    assert after["request_rate_10s"] == 1.0
    assert shared.free(held={1, 2}) == [3]


def test_the_baseline_is_summed_in_and_never_given_out() -> None:
    saved = Stats()
    saved.record(0, 100, Counts(req=7))
    shared = SharedStats.create(3)
    shared.set_baseline(new_baseline(persistent_totals([saved.block])))
    shared.give(1, worker=0, generation=1)
    _written(shared, 1, 1)
    report = snapshot(shared.used(), NOW)
    assert report["msg_req"] == 8
    assert report["request_rate_10s"] == 0.1  # the saved totals have no window
    assert BASELINE not in shared.free(held=set())


def test_a_report_sums_the_copy_a_worker_froze_between_two_updates() -> None:
    """1. The parent asks for request 1; the worker freezes its block (from its loop).
    2. The worker goes on counting; a report of request 1 sums the frozen copy, not
       the half-updated block. 3. A freeze nobody asked for copies nothing."""
    shared = SharedStats.create(3)
    shared.give(1, worker=0, generation=1)
    stats = _written(shared, 1, 5)
    assert shared.freeze(1) is False  # nothing asked yet
    shared.request_freeze(1, 1)
    assert shared.freeze(1) is True
    assert shared.freeze(1) is False  # once per request
    stats.closed("client_closed")  # half of a close: the active count comes next
    live = snapshot(shared.summed(set()), NOW)
    frozen = snapshot(shared.summed({1}), NOW)
    assert live["connections_active"] + sum(live["connections_closed"].values()) == 2
    assert frozen["connections_active"] + sum(frozen["connections_closed"].values()) == 1
    assert frozen["connections_total"] == 1 and frozen["msg_req"] == 5


def test_a_worker_that_died_with_connections_open_closes_them_as_errors() -> None:
    shared = SharedStats.create(2)
    shared.give(1, worker=0, generation=1)
    _written(shared, 1, 5)  # one connection open
    shared.release(1)
    report = snapshot(shared.used(), NOW)
    assert report["connections_active"] == 0 and report["connections_closed"]["error"] == 1
    assert report["connections_total"] == sum(report["connections_closed"].values())
