"""-report-interval: the SIGUSR1 line on stdout by itself, every interval."""

from __future__ import annotations

import signal
import statistics
import time

import pytest

from geventproxy.testing.launch import start_proxy
from tests.helpers import Traffic, wait_until

INTERVAL = 0.5
# Counters only ever grow; gauges, rates, percentiles and uptime are left out.
_COUNTERS = (
    "msg_total",
    "msg_req",
    "msg_ack",
    "msg_nak",
    "msg_invalid",
    "bytes_client_to_upstream",
    "bytes_upstream_to_client",
    "connections_total",
    "connections_refused",
    "latency_count",
)


@pytest.mark.parametrize("workers", [1, 2])
def test_reports_arrive_every_interval(foo_port: int, workers: int) -> None:
    """1. A proxy with -report-interval=0.5s (-workers=N) and the reference client running
       through it; no signal is sent, yet lines arrive on stdout.
    2. Three SIGUSR1 land among them: still nothing but whole JSON lines.
    3. Timed by the proxy's own clock (uptime_s), the periodic lines come one per 0.5 s
       tick at most, and at least one per two ticks (a busy machine may skip one).
    4. Every counter only grows from one line to the next; the last line after SIGTERM
       holds every REQ the client sent.
    """
    with start_proxy(foo_port, f"-report-interval={INTERVAL}s", f"-workers={workers}") as p:
        with Traffic(p.port, connections=4) as traffic:
            wait_until(lambda: len(p.stdout_lines) >= 3, timeout=10)
            for _ in range(3):
                p.proc.send_signal(signal.SIGUSR1)
                time.sleep(0.1)
            wait_until(
                lambda: p.stdout_reports() and p.stdout_reports()[-1]["uptime_s"] >= 4.0,
                timeout=15,
            )
        assert not traffic.failures and traffic.requests > 0
        p.proc.send_signal(signal.SIGTERM)
        assert p.wait_exit(timeout=15) == 0
    reports = p.stdout_reports()  # fails on any line that is not one whole JSON object
    times = [r["uptime_s"] for r in reports]
    assert times == sorted(times)
    # From 1 s to 4 s of uptime: six ticks, or seven where the ticks' grid is not
    # exactly aligned with uptime's zero. USR1 adds at most three lines.
    in_window = [t for t in times if 1.0 <= t < 4.0]
    assert 3 <= len(in_window) <= 7 + 3, times
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 0.2 <= statistics.median(gaps) <= 1.0, gaps
    for before, after in zip(reports, reports[1:]):
        for name in _COUNTERS:
            assert after[name] >= before[name], name
        for reason, n in after["connections_closed"].items():
            assert n >= before["connections_closed"][reason], reason
    assert reports[-1]["msg_req"] == traffic.requests
    assert reports[-1]["connections_active"] == 0
