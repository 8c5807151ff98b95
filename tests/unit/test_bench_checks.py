"""The benchmark's statistics check and paired ratios (scripts/benchlib), on scripted reports."""

from __future__ import annotations

import pytest

from scripts.benchlib.checks import RATE_TOLERANCE, Watch, check_stats, rate_within
from scripts.benchlib.tables import paired, rounds_text, spread
from scripts.benchlib.targets import TARGETS, verdict


def _rep(uptime: float, req: int, replies: int | None = None, rate: float | None = None, **kw):
    """A SIGUSR1 report: ``req`` REQs so far, as many replies unless said otherwise."""
    replies = req if replies is None else replies
    rep = {
        "uptime_s": uptime,
        "msg_req": req,
        "msg_ack": replies,
        "msg_nak": 0,
        "msg_total": req + replies,
        "msg_invalid": 0,
        "connections_active": 0,
        "request_rate_10s": 0.0 if rate is None else rate,
    }
    rep.update(kw)
    return rep


class Scripted:
    """Hands out prepared reports in order, the last one forever; sleeps are recorded."""

    def __init__(self, *reports: dict) -> None:
        self.reports = list(reports)
        self.slept: list[float] = []

    def __call__(self) -> dict:
        return self.reports.pop(0) if len(self.reports) > 1 else self.reports[0]

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def _watch(*history: tuple[float, int]) -> Watch:
    watch = Watch(lambda: {}, sleep=lambda s: None)
    watch.history += list(history)
    return watch


def test_an_exact_run_passes_with_an_exact_window() -> None:
    """1. Reports at 10 s and 20 s show 1,000 REQs: quiet in between.
    2. A run brings msg_req to 6,000 at 25 s.
    3. The window (15 s, 25 s] starts in the quiet spell: exactly 5,000 REQs, 500/s."""
    watch = _watch((10.0, 1000), (20.0, 1000))
    before, after = _rep(20.0, 1000), _rep(25.0, 6000, rate=500.0)
    ok, text = check_stats(watch, before, after, in_flight_max=50, lg_replies=5000)
    assert ok, text
    assert "exact" in text


@pytest.mark.parametrize(
    "after,lg_replies,exact_req,problem",
    [
        (_rep(25.0, 6000, replies=5900, rate=500.0), 5000, None, "REQ - replies = 100"),
        (_rep(25.0, 6000, rate=500.0, msg_invalid=1), 5000, None, "msg_invalid = 1"),
        (_rep(25.0, 6000, rate=500.0, msg_total=12001), 5000, None, "msg_total delta"),
        (_rep(25.0, 6000, rate=500.0), 5001, None, "loadgen received 5001"),
        (_rep(25.0, 6000, rate=500.0), None, 4999, "expected exactly 4999"),
        (_rep(25.0, 6000, rate=500.0 * (1 + 3 * RATE_TOLERANCE)), 5000, None, "request_rate"),
        (_rep(25.0, 6000, replies=6001, rate=500.0), 5000, None, "REQ - replies = -1"),
    ],
    ids=["lost replies", "invalid", "total", "loadgen saw more", "exact req", "rate", "extra"],
)
def test_each_inexact_figure_fails(after, lg_replies, exact_req, problem) -> None:
    watch = _watch((10.0, 1000), (20.0, 1000))
    ok, text = check_stats(
        watch, _rep(20.0, 1000), after, 50, lg_replies=lg_replies, exact_req=exact_req
    )
    assert not ok and text.startswith("FAIL") and problem in text, text


def test_rate_within_tolerance_passes() -> None:
    watch = _watch((10.0, 1000), (20.0, 1000))
    after = _rep(25.0, 6000, rate=500.0 * (1 + RATE_TOLERANCE / 2))
    assert check_stats(watch, _rep(20.0, 1000), after, 50, 5000)[0]


def test_window_inside_an_earlier_run_is_held_to_bounds() -> None:
    """The 10 s window starts at 15 s, between reports at 12 s (200 REQs) and 18 s
    (800 REQs): only bounds are known, 10,000 - 800 .. 10,000 - 200 REQs in 10 s."""
    watch = _watch((12.0, 200), (18.0, 800), (20.0, 1000))
    before = _rep(20.0, 1000)
    inside = _rep(25.0, 10_000, rate=950.0)
    assert check_stats(watch, before, inside, 50, None)[0]
    too_high = _rep(25.0, 10_000, rate=1100.0)
    ok, text = check_stats(watch, before, too_high, 50, None)
    assert not ok and "bounds" in text
    zero = _rep(25.0, 10_000, rate=0.0)
    ok, text = check_stats(watch, before, zero, 50, None)
    assert not ok and "is 0 right after a run" in text


def test_reports_ten_seconds_apart_give_the_rate() -> None:
    watch = _watch((12.0, 200), (18.0, 800), (20.0, 1000))
    a, b = _rep(14.0, 500), _rep(24.02, 5500, rate=5000 / 10.02)
    assert check_stats(watch, _rep(20.0, 1000), b, 50, None, pair=(a, b))[0]
    bad = _rep(24.02, 5500, rate=600.0)
    assert not check_stats(watch, _rep(20.0, 1000), bad, 50, None, pair=(a, bad))[0]


def test_a_later_report_can_supply_the_exact_window() -> None:
    """1. Quiet from 12 s to 20 s at 1,000 REQs; a run to 6,000 REQs ends by 21.9 s.
    2. The report at 21.9 s has a window from 11.9 s: inexact (and a rate of 0 fails).
    3. A report at 22.5 s has its window start at 12.5 s, in the quiet spell: exact, it decides."""
    watch = _watch((12.0, 1000), (20.0, 1000))
    after = _rep(21.9, 6000, rate=0.0)
    later = _rep(22.5, 6000, rate=500.0)
    watch.history.append((22.5, 6000))
    ok, text = check_stats(watch, _rep(20.0, 1000), after, 50, None, extra=(later,))
    assert ok and "exact" in text, text


def test_no_req_no_rate_to_check() -> None:
    watch = _watch((12.0, 200), (18.0, 800), (20.0, 800))
    assert check_stats(watch, _rep(20.0, 800), _rep(21.0, 800), 0, None)[0]


def test_watch_history_bounds_and_quiet_spell() -> None:
    scripted = Scripted(_rep(1.0, 10), _rep(2.0, 30), _rep(3.0, 30), _rep(4.0, 30))
    watch = Watch(scripted, sleep=scripted.sleep)
    for _ in range(4):
        watch.report()
    assert watch.req_bounds(0.0) == (0, 0)
    assert watch.req_bounds(1.5) == (10, 30)
    assert watch.req_bounds(2.5) == (30, 30)  # between two reports with no REQ: exact
    assert watch.req_bounds(9.0) == (30, 30)
    assert watch.quiet_since() == 2.0


def test_settled_waits_until_counters_stop() -> None:
    moving = [_rep(1.0, n, connections_active=1) for n in (10, 20, 30)]
    scripted = Scripted(*moving, _rep(1.4, 40), _rep(1.5, 40))
    watch = Watch(scripted, sleep=scripted.sleep)
    assert watch.settled()["msg_req"] == 40
    assert len(scripted.slept) == 4


def test_wait_for_exact_window_sleeps_only_as_long_as_allowed() -> None:
    scripted = Scripted(_rep(14.0, 100), _rep(20.1, 100))
    watch = Watch(scripted, sleep=scripted.sleep)
    watch.report()  # now at 14 s; quiet since 10 s: a window from 10 s is 6.05 s away
    assert watch.wait_for_exact_window(10.0, max_wait=3.0) is None
    assert scripted.slept == []
    assert watch.wait_for_exact_window(10.0, max_wait=10.0)["uptime_s"] == 20.1
    assert scripted.slept == [pytest.approx(6.05)]


def test_rate_within_reads_bounds_with_tolerance() -> None:
    rep = {"request_rate_10s": 100.0}
    assert rate_within(rep, 100.0 / (1 + RATE_TOLERANCE / 2), None, "x")[0]
    assert not rate_within(rep, 90.0, None, "x")[0]
    assert rate_within(rep, 95.0, 99.0, "x")[0]  # within tolerance of the high bound
    assert not rate_within(rep, 50.0, 80.0, "x")[0]


def test_paired_ratios_use_the_same_round_only() -> None:
    results = {
        "accelerated": [
            {"round": 0, "relay_cpu_per_M": 6.0},
            {"round": 1, "relay_cpu_per_M": 9.0},
            {"round": 2, "relay_cpu_per_M": 5.0},  # HAProxy's run of round 2 failed
        ],
        "haproxy": [{"round": 0, "relay_cpu_per_M": 5.0}, {"round": 1, "relay_cpu_per_M": 6.0}],
    }
    ratios = paired(
        results, "accelerated", "haproxy", lambda a, b: a["relay_cpu_per_M"] / b["relay_cpu_per_M"]
    )
    assert ratios == [1.2, 1.5]
    assert spread(ratios) == "1.35x (1.20-1.50, n=2)"
    assert spread([1.2]) == "1.20x" and spread([]) == "-"


def test_verdicts_and_honest_wording() -> None:
    target = next(t for t in TARGETS if t.scenario == "serial50" and t.path == "accelerated")
    assert verdict(1.2, target) == "met" and verdict(1.21, target) == "NOT MET"
    assert verdict(None, target) == "no figure"
    assert rounds_text(1) == "a single run: no median, no spread"
    assert rounds_text(5) == "median of 5 rounds"
