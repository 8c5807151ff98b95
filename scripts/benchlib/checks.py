"""Is a proxy's statistics report exact over a run? Pure logic, unit-tested.

After every proxy run the benchmark reads the proxy's SIGUSR1 reports and
checks that the counters add up (REQs = replies + requests still in flight
at the end, no invalid message) and that ``request_rate_10s`` agrees with
the REQs counted over the same 10 s. ``Watch`` keeps the history of
(uptime, msg_req) that the rate check needs; it takes the function that
fetches a report, so tests drive it with scripted reports.
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["RATE_TOLERANCE", "Watch", "check_stats", "rate_within"]

#: request_rate_10s may differ this much from the REQs counted over 10 s.
RATE_TOLERANCE = 0.02

Report = dict[str, Any]


class Watch:
    """The SIGUSR1 reports of one proxy, with the history the rate check needs."""

    def __init__(self, report: Callable[[], Report], sleep: Callable[[float], None] = time.sleep):
        self._report = report
        self._sleep = sleep
        self.history: list[tuple[float, int]] = [(0.0, 0)]  # (uptime_s, msg_req)

    def report(self) -> Report:
        rep = self._report()
        self.history.append((rep["uptime_s"], rep["msg_req"]))
        return rep

    def settled(self, max_wait: float = 2.0) -> Report:
        """A report once the counters have stopped moving (the load has ended)."""
        prev = self.report()
        waited = 0.0
        while waited < max_wait:
            self._sleep(0.1)
            waited += 0.1
            cur = self.report()
            key = ("msg_total", "connections_active")
            if [cur[k] for k in key] == [prev[k] for k in key]:
                return cur
            prev = cur
        return prev

    def req_bounds(self, uptime: float) -> tuple[int, int]:
        """Bounds on msg_req at ``uptime``, from the reports around it; equal
        bounds (exact) before the start or between two reports with no REQ."""
        if uptime <= 0:
            return 0, 0
        lo = hi = None
        for u, r in self.history:
            if u <= uptime:
                lo = r
            elif hi is None:
                hi = r
        assert lo is not None
        return lo, lo if hi is None else hi

    def quiet_since(self) -> float:
        """Uptime from which msg_req has not moved, as far as the reports show."""
        u0, r0 = self.history[-1]
        for u, r in reversed(self.history):
            if r != r0:
                break
            u0 = u
        return u0

    def wait_for_exact_window(self, quiet_from: float, max_wait: float) -> Report | None:
        """A report whose 10 s window starts in the quiet spell that began at
        ``quiet_from`` (before the last run), so that the REQs in that window are
        known exactly; None if that needs more than ``max_wait`` seconds."""
        now = self.history[-1][0]
        if now - 10.0 >= quiet_from:
            return None  # the latest report already has such a window, or never will
        wait = quiet_from + 10.0 - now + 0.05
        if wait > max_wait:
            return None
        self._sleep(wait)
        return self.report()


def rate_within(rep: Report, expected: float, high: float | None, how: str) -> tuple[bool, str]:
    """Is request_rate_10s equal to ``expected`` (or within [expected, high])?"""
    got = rep["request_rate_10s"]
    if high is None:
        err = abs(got - expected) / expected if expected else abs(got)
        ok = err <= RATE_TOLERANCE or abs(got - expected) <= 0.5
        return ok, f"rate_10s {got:.1f}/s, expected {expected:.1f}/s ({how}, off {err:.2%})"
    ok = expected * (1 - RATE_TOLERANCE) - 0.5 <= got <= high * (1 + RATE_TOLERANCE) + 0.5
    return ok, f"rate_10s {got:.1f}/s, expected {expected:.1f}..{high:.1f}/s ({how})"


def _rate_check(
    watch: Watch,
    after: Report,
    req_delta: int,
    pair: tuple[Report, Report] | None,
    extra: tuple[Report, ...],
) -> tuple[bool, str]:
    """request_rate_10s against the REQs counted in the 10 s before a report."""
    for rep in (after, *extra):
        lo, hi = watch.req_bounds(rep["uptime_s"] - 10.0)
        if lo == hi:
            return rate_within(rep, (rep["msg_req"] - lo) / 10.0, None, "exact")
    if pair is not None and abs(pair[1]["uptime_s"] - pair[0]["uptime_s"] - 10.0) < 0.2:
        a, b = pair
        span = b["uptime_s"] - a["uptime_s"]
        expected = (b["msg_req"] - a["msg_req"]) / span
        return rate_within(b, expected, None, f"reports {span:.3f} s apart")
    if req_delta > 0:
        # The window starts inside an earlier run: only bounds are known.
        lo, hi = watch.req_bounds(after["uptime_s"] - 10.0)
        low, high = (after["msg_req"] - hi) / 10.0, (after["msg_req"] - lo) / 10.0
        if not after["request_rate_10s"] > 0:
            return False, "request_rate_10s is 0 right after a run"
        return rate_within(after, low, high, "bounds")
    return True, "no REQ"


def check_stats(
    watch: Watch,
    before: Report,
    after: Report,
    in_flight_max: int,
    lg_replies: int | None,
    exact_req: int | None = None,
    pair: tuple[Report, Report] | None = None,
    extra: tuple[Report, ...] = (),
) -> tuple[bool, str]:
    """Are the proxy's counters exact over one run? Returns (ok, explanation).

    ``before``/``after`` are settled reports around the run, ``lg_replies``
    the replies the load generator received, ``exact_req`` the REQs it is
    known to have sent (idle runs); ``pair`` two reports 10 s apart and
    ``extra`` later reports, for the rate check.
    """
    d = {k: after[k] - before[k] for k in ("msg_req", "msg_ack", "msg_nak", "msg_total")}
    replies = d["msg_ack"] + d["msg_nak"]
    in_flight = d["msg_req"] - replies
    problems = []
    if not 0 <= in_flight <= in_flight_max:
        problems.append(f"REQ - replies = {in_flight}, not in [0, {in_flight_max}]")
    if after["msg_invalid"] != 0:
        problems.append(f"msg_invalid = {after['msg_invalid']}")
    if d["msg_total"] != d["msg_req"] + replies:
        problems.append(f"msg_total delta {d['msg_total']} != REQ + ACK + NAK")
    if lg_replies is not None and replies < lg_replies:
        problems.append(f"proxy saw {replies} replies, loadgen received {lg_replies}")
    if exact_req is not None and d["msg_req"] != exact_req:
        problems.append(f"msg_req delta {d['msg_req']}, expected exactly {exact_req}")
    rate_ok, rate_note = _rate_check(watch, after, d["msg_req"], pair, extra)
    if not rate_ok:
        problems.append("request_rate_10s does not match the REQ counts")
    text = f"REQ {d['msg_req']}, replies {replies}, in flight at end {in_flight}; {rate_note}"
    if problems:
        return False, "FAIL: " + "; ".join(problems) + f" ({text})"
    return True, "PASS: " + text
