"""The Prometheus exposition, read back by the reference parser (prometheus_client)."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from geventproxy import __version__, metrics
from geventproxy.codec import Counts
from geventproxy.metrics import render_prometheus
from geventproxy.process import Figures
from geventproxy.stats import (
    CLOSE_REASONS,
    COUNTERS,
    DIRECTIONS,
    GAUGES,
    LATENCY_BOUNDS_US,
    Stats,
    latency_histogram,
    snapshot,
)
from tests.unit.fakes import FakeClock, S

KINDS = ("req", "ack", "nak", "invalid")

# family name as the parser reports it (counters without _total) -> (type, label names)
EXPECTED = {
    "geventproxy_build_info": ("gauge", {"version"}),
    "geventproxy_uptime_seconds": ("gauge", set()),
    "geventproxy_messages": ("counter", {"direction", "type"}),
    "geventproxy_bytes": ("counter", {"direction"}),
    "geventproxy_connections_active": ("gauge", set()),
    "geventproxy_connections": ("counter", set()),
    "geventproxy_connections_refused": ("counter", set()),
    "geventproxy_connections_closed": ("counter", {"reason"}),
    "geventproxy_upstream_connect_failures": ("counter", set()),
    "geventproxy_upstream_connect_timeouts": ("counter", set()),
    "geventproxy_accept_errors": ("counter", set()),
    "geventproxy_latency_unmatched_responses": ("counter", set()),
    "geventproxy_latency_dropped_requests": ("counter", set()),
    "geventproxy_upstream_response_seconds": ("histogram", {"le"}),
}

# unlabelled counter family -> the report field it shows
FIELDS = {
    "geventproxy_connections": "connections_total",
    "geventproxy_connections_refused": "connections_refused",
    "geventproxy_upstream_connect_failures": "upstream_connect_failures",
    "geventproxy_upstream_connect_timeouts": "upstream_connect_timeouts",
    "geventproxy_accept_errors": "accept_errors",
    "geventproxy_latency_unmatched_responses": "latency_unmatched",
    "geventproxy_latency_dropped_requests": "latency_dropped",
}

# Latencies in microseconds: on a bound (le is inclusive), just past one, past the last.
LATENCIES_US = [10, 11, 150, 150, 151, 999, 1000, 250_000, 10_000_000, 10_000_001, 60_000_000]


@pytest.fixture()
def stats() -> Stats:
    """A block where every number differs, so a field shown under the wrong name shows."""
    clock = FakeClock(5000 * S)
    stats = Stats(clock=clock)
    stats.record(0, 1000, Counts(req=7, ack=1, nak=2, invalid=3))
    stats.record(1, 2000, Counts(req=4, ack=5, nak=6, invalid=8))
    for i, name in enumerate(COUNTERS):
        stats.incr(name, 11 + i)
    for i, reason in enumerate(CLOSE_REASONS):
        for _ in range(i + 1):
            stats.closed(reason)
    for us in LATENCIES_US:
        stats.observe_latency(clock.now, us * 1000)
    clock.now += 3 * S + 250_000_000
    return stats


def _render(stats: Stats) -> tuple[str, dict, dict]:
    report = snapshot([stats.block], stats.clock())
    text = render_prometheus(report, latency_histogram([stats.block]))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return text, report, families


def _value(family, **labels: str) -> float:
    matches = [s.value for s in family.samples if s.labels == labels]
    assert len(matches) == 1, (family.name, labels, family.samples)
    return matches[0]


def test_names_types_help_and_label_sets(stats: Stats) -> None:
    text, _report, families = _render(stats)
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert set(families) == set(EXPECTED)
    for name, family in families.items():
        kind, labels = EXPECTED[name]
        assert family.type == kind, name
        assert family.documentation.strip(), f"{name} has no HELP"
        for sample in family.samples:
            assert sample.name.startswith("geventproxy_")
            if kind == "counter":
                assert sample.name == name + "_total"
            if kind == "histogram":
                assert sample.name in (f"{name}_bucket", f"{name}_sum", f"{name}_count")
                expected = {"le"} if sample.name.endswith("_bucket") else set()
                assert set(sample.labels) == expected
            else:
                assert set(sample.labels) == labels, sample
    # One HELP and one TYPE per family, nothing declared twice.
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(type_lines) == len(set(type_lines)) == len(EXPECTED)


def test_label_values_are_the_fixed_sets(stats: Stats) -> None:
    _text, _report, families = _render(stats)
    messages = families["geventproxy_messages"].samples
    assert {(s.labels["direction"], s.labels["type"]) for s in messages} == {
        (d, k) for d in DIRECTIONS for k in KINDS
    }
    assert len(messages) == len(DIRECTIONS) * len(KINDS)
    assert {s.labels["direction"] for s in families["geventproxy_bytes"].samples} == set(DIRECTIONS)
    closed = families["geventproxy_connections_closed"].samples
    assert [s.labels["reason"] for s in closed] == list(CLOSE_REASONS)


def test_values_equal_the_snapshot(stats: Stats) -> None:
    _text, report, families = _render(stats)
    for direction in DIRECTIONS:
        for kind in KINDS:
            got = _value(families["geventproxy_messages"], direction=direction, type=kind)
            assert got == report[f"msg_{kind}_{direction}"]
        assert (
            _value(families["geventproxy_bytes"], direction=direction)
            == (report[f"bytes_{direction}"])
        )
    for reason in CLOSE_REASONS:
        got = _value(families["geventproxy_connections_closed"], reason=reason)
        assert got == report["connections_closed"][reason]
    for family, field in FIELDS.items():
        assert _value(families[family]) == report[field], family
    assert set(FIELDS.values()) | set(GAUGES) == set(COUNTERS)  # every counter is exported
    assert _value(families["geventproxy_connections_active"]) == report["connections_active"]
    assert _value(families["geventproxy_uptime_seconds"]) == pytest.approx(3.25)
    assert _value(families["geventproxy_build_info"], version=__version__) == 1
    # Sum of kinds, as msg_total is defined.
    total = sum(
        _value(families["geventproxy_messages"], direction=d, type=k)
        for d in DIRECTIONS
        for k in ("req", "ack", "nak")
    )
    assert total == report["msg_total"]


def test_histogram_is_cumulative_in_seconds(stats: Stats) -> None:
    _text, report, families = _render(stats)
    family = families["geventproxy_upstream_response_seconds"]
    buckets = [s for s in family.samples if s.name.endswith("_bucket")]
    bounds = [float(s.labels["le"]) for s in buckets]
    assert bounds[:-1] == [b / 1e6 for b in LATENCY_BOUNDS_US]
    assert bounds[-1] == math.inf
    counts = [s.value for s in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    for bound, count in zip(bounds, counts):
        # le is inclusive: a latency exactly on a bound is in that bucket.
        assert count == sum(1 for us in LATENCIES_US if us / 1e6 <= bound), bound
    (count,) = [s.value for s in family.samples if s.name.endswith("_count")]
    (total,) = [s.value for s in family.samples if s.name.endswith("_sum")]
    assert count == counts[-1] == len(LATENCIES_US) == report["latency_count"]
    assert total == pytest.approx(sum(LATENCIES_US) / 1e6)


def test_bucket_bounds_are_written_exactly() -> None:
    # No exponent notation and no float noise: 0.000015, not 1.5e-05 or 0.000015000000000000002.
    assert metrics._seconds(15) == "0.000015"
    assert metrics._seconds(750_000) == "0.75"
    assert metrics._seconds(10_000_000) == "10"


def test_empty_proxy_renders_zeros() -> None:
    stats = Stats(clock=FakeClock(5000 * S))
    _text, _report, families = _render(stats)
    family = families["geventproxy_upstream_response_seconds"]
    assert all(s.value == 0 for s in family.samples)
    assert all(s.value == 0 for s in families["geventproxy_messages"].samples)


def test_label_values_are_escaped(stats: Stats, monkeypatch: pytest.MonkeyPatch) -> None:
    odd = 'a"b\\c\nd'
    monkeypatch.setattr(metrics, "__version__", odd)
    _text, _report, families = _render(stats)
    (sample,) = families["geventproxy_build_info"].samples
    assert sample.labels == {"version": odd}


def test_wrong_histogram_length_is_refused(stats: Stats) -> None:
    report = snapshot([stats.block], stats.clock())
    with pytest.raises(ValueError):
        render_prometheus(report, ([1, 2, 3], 6))


FIGURES = Figures(
    open_fds=12,
    max_fds=float("inf"),
    resident_memory_bytes=30 << 20,
    virtual_memory_bytes=200 << 20,
    cpu_seconds_total=1.5,
    start_time_seconds=1.7e9,
    ppid=1,
)
PROCESS_FAMILIES = {
    "process_open_fds": ("gauge", "open_fds"),
    "process_max_fds": ("gauge", "max_fds"),
    "process_resident_memory_bytes": ("gauge", "resident_memory_bytes"),
    "process_virtual_memory_bytes": ("gauge", "virtual_memory_bytes"),
    "process_cpu_seconds": ("counter", "cpu_seconds_total"),
    "process_start_time_seconds": ("gauge", "start_time_seconds"),
}


def test_one_process_its_figures_unlabelled_and_the_upstream_gauge(stats: Stats) -> None:
    report = snapshot([stats.block], stats.clock())
    text = render_prometheus(
        report, latency_histogram([stats.block]), upstream_up=True, processes=[(None, FIGURES)]
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == set(EXPECTED) | set(PROCESS_FAMILIES) | {"geventproxy_upstream_up"}
    for name, (kind, field) in PROCESS_FAMILIES.items():
        assert families[name].type == kind and families[name].documentation
        assert _value(families[name]) == getattr(FIGURES, field), name
    assert _value(families["geventproxy_upstream_up"]) == 1
    assert "process_max_fds +Inf" in text
    text = render_prometheus(report, latency_histogram([stats.block]), upstream_up=False)
    assert "\ngeventproxy_upstream_up 0\n" in text and "process_" not in text


def test_workers_are_labelled_under_names_of_their_own(stats: Stats) -> None:
    """The unlabelled totals stay the sums; per-worker figures never share a name with them."""
    report = snapshot([stats.block], stats.clock())
    second = FIGURES._replace(open_fds=9)
    workers = [
        ("0", {"pid": 10, "connections_active": 2, "connections_total": 30, "requests": 700}),
        ("1", {"pid": 11, "connections_active": 1, "connections_total": 12, "requests": 300}),
    ]
    text = render_prometheus(
        report,
        latency_histogram([stats.block]),
        upstream_up=True,
        processes=[("0", FIGURES), ("1", second), ("parent", FIGURES)],
        workers=workers,
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert _value(families["process_open_fds"], worker="1") == 9
    assert _value(families["process_open_fds"], worker="parent") == 12
    assert _value(families["geventproxy_worker_requests"], worker="0") == 700
    assert _value(families["geventproxy_worker_connections"], worker="1") == 12
    assert _value(families["geventproxy_worker_connections_active"], worker="0") == 2
    assert families["geventproxy_worker_requests"].type == "counter"
    # The totals are the same families, unlabelled, as with one process.
    assert _value(families["geventproxy_connections_active"]) == report["connections_active"]
    for name in EXPECTED:
        for sample in families[name].samples:
            assert "worker" not in sample.labels
