"""Persisted totals: what is kept, how it comes back, and what a bad file does."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from geventproxy import state
from geventproxy.codec import Counts
from geventproxy.logs import LOGGER
from geventproxy.stats import (
    CLOSE_REASONS,
    COUNTERS,
    GAUGES,
    LATENCY_BOUNDS_US,
    Stats,
    new_baseline,
    persistent_totals,
    snapshot,
)
from tests.unit.fakes import FakeClock, S

# Fields of a report that describe this process, not the history.
PER_PROCESS = {
    "request_rate_1s",
    "request_rate_10s",
    "response_rate_1s",
    "response_rate_10s",
    "uptime_s",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    *GAUGES,
}


def _busy(clock: FakeClock) -> Stats:
    stats = Stats(clock=clock)
    stats.record(0, 300, Counts(req=30, invalid=2))
    stats.record(1, 500, Counts(ack=26, nak=4))
    for i, name in enumerate(COUNTERS):
        stats.incr(name, 3 + i)
    for reason in CLOSE_REASONS[:3]:
        stats.closed(reason)
    stats.observe_latency(clock.now, 2_000_000, n=5)
    return stats


@pytest.fixture()
def records() -> Iterator[list[logging.LogRecord]]:
    """The project logger's records (it does not propagate to pytest's handlers)."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_totals_leave_out_gauges_windows_and_start() -> None:
    totals = persistent_totals([_busy(FakeClock(7000 * S)).block])
    assert "connections_active" not in totals
    assert not any("rate" in key or "started" in key or "uptime" in key for key in totals)
    assert totals["msg_req_client_to_upstream"] == 30
    assert totals["msg_invalid_client_to_upstream"] == 2
    assert totals["bytes_upstream_to_client"] == 500
    assert totals["connections_closed"]["client_reset"] == 1
    json.dumps(totals)  # plain JSON types only


def test_baseline_carries_totals_but_not_rates_or_uptime() -> None:
    clock = FakeClock(7000 * S)
    old = snapshot([_busy(clock).block], clock.now)
    baseline = new_baseline(json.loads(json.dumps(persistent_totals([_busy(clock).block]))))
    clock.now += 5 * S  # a new process, started later
    live = Stats(clock=clock)
    clock.now += S // 2
    live.record(0, 10, Counts(req=1))
    now = clock.now
    restored = snapshot([live.block, baseline], now)
    alone = snapshot([live.block], now)
    for key, value in old.items():
        if key in PER_PROCESS:
            assert restored[key] == alone[key], key
        elif key == "connections_closed":
            assert restored[key] == value
        else:
            assert restored[key] == value + alone[key], key
    assert restored["uptime_s"] == 0.5
    assert restored["request_rate_1s"] == 1.0
    assert restored["latency_p50_ms"] is None  # the recent-latency ring is not restored


def test_baseline_twice_is_idempotent_in_a_chain() -> None:
    """A restart of a restart: the saved totals include the earlier baseline."""
    clock = FakeClock(7000 * S)
    first = _busy(clock)
    baseline = new_baseline(persistent_totals([first.block]))
    second = _busy(clock)
    chained = persistent_totals([second.block, baseline])
    assert chained["msg_req_client_to_upstream"] == 60
    assert chained["latency_buckets"] == [
        2 * n for n in persistent_totals([first.block])["latency_buckets"]
    ]


@pytest.mark.parametrize(
    "bad",
    [
        [],
        "totals",
        {"connections_total": -1},
        {"connections_total": 1.5},
        {"connections_total": True},
        {"msg_req_client_to_upstream": "7"},
        {"connections_closed": [1, 2]},
        {"connections_closed": {"client_closed": None}},
        {"latency_bounds_us": list(LATENCY_BOUNDS_US), "latency_buckets": [1, 2]},
    ],
)
def test_bad_totals_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        new_baseline(bad)  # type: ignore[arg-type]


def test_unknown_and_missing_names() -> None:
    block = new_baseline({"msg_req_client_to_upstream": 5, "from_a_future_version": 9})
    report = snapshot([Stats(clock=FakeClock(7000 * S)).block, block], 7000 * S)
    assert report["msg_req"] == 5 and report["msg_ack"] == 0


def test_latency_saved_with_other_bounds_is_dropped() -> None:
    totals = persistent_totals([_busy(FakeClock(7000 * S)).block])
    totals["latency_bounds_us"] = [1, 2, 3]
    totals["latency_buckets"] = [1, 1, 1, 1]
    report = snapshot([Stats(clock=FakeClock(7000 * S)).block, new_baseline(totals)], 7000 * S)
    assert report["latency_count"] == 0
    assert report["msg_req"] == 30


def test_envelope_round_trip_and_rejections() -> None:
    totals = persistent_totals([_busy(FakeClock(7000 * S)).block])
    assert state.decode(state.encode(totals)) == totals
    for data in (
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"format": "something-else", "version": 1, "totals": {}}',
        b'{"format": "geventproxy-state", "version": 99, "totals": {}}',
        b'{"format": "geventproxy-state", "version": 1}',
    ):
        with pytest.raises(ValueError):
            state.decode(data)


def test_write_atomically_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state.write_atomically(str(path), b"one\n")
    state.write_atomically(str(path), b"two\n")
    assert path.read_bytes() == b"two\n"
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_atomically_failure_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(OSError):
        state.write_atomically(str(tmp_path / "missing-dir" / "state.json"), b"x")
    in_the_way = tmp_path / "a-directory"
    in_the_way.mkdir()
    with pytest.raises(OSError):
        state.write_atomically(str(in_the_way), b"x")  # the rename fails
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state.os, "fsync", disk_full)
    with pytest.raises(OSError):
        state.write_atomically(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["a-directory", "state.json"]


def test_load_baseline_logs_one_line_and_never_raises(
    tmp_path: Path, records: list[logging.LogRecord]
) -> None:
    path = tmp_path / "state.json"
    assert state.load_baseline(str(path)) is None
    assert [r.getMessage() for r in records] == ["state file not found, totals start from zero"]
    records.clear()
    corrupt = b'{"format": "geventproxy-state", "version": 1, "totals": {"msg_'
    path.write_bytes(corrupt)
    assert state.load_baseline(str(path)) is None
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "state file corrupt, ignored")
    ]
    # Kept aside, not overwritten by the next write; the log says where.
    assert not path.exists() and (tmp_path / "state.json.corrupt").read_bytes() == corrupt
    assert records[0].fields["kept_as"] == f"{path}.corrupt"
    records.clear()
    path.write_bytes(state.encode(persistent_totals([_busy(FakeClock(7000 * S)).block])))
    block = state.load_baseline(str(path))
    assert block is not None
    assert snapshot([block], 0)["msg_req"] == 30
    assert [r.getMessage() for r in records] == ["state file loaded"]


def test_check_path_refuses_what_can_never_be_written(tmp_path: Path) -> None:
    assert state.check_path(str(tmp_path / "state.json")) is None
    (tmp_path / "state.json").write_bytes(b"anything")
    assert state.check_path(str(tmp_path / "state.json")) is None  # an existing file is fine
    assert "is a directory" in state.check_path(str(tmp_path))
    missing = tmp_path / "no-such-dir" / "state.json"
    assert "does not exist" in state.check_path(str(missing))
    assert "not a directory" in state.check_path(str(tmp_path / "state.json" / "x.json"))
