"""The live page at GET / of -admin, in a real browser (headless Chromium) with real traffic."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from geventproxy import __version__
from geventproxy.testing.launch import ROOT, start_proxy
from tests.chromium import Browser, executable
from tests.helpers import Traffic, closed_port, connect, http_request, recv_lines, wait_until

pytestmark = pytest.mark.skipif(
    executable() is None, reason="chromium is not installed (.ci/run installs it)"
)

#: With GEVENTPROXY_README_SCREENSHOT=1, the -workers=2 run also writes the README's picture,
#: after a longer run of traffic (a minute of charts rather than a few seconds).
README = os.environ.get("GEVENTPROXY_README_SCREENSHOT") == "1"
README_SCREENSHOT = ROOT / "scripts" / "screenshots" / "live-page.png"
README_TRAFFIC_S = 50
CONNECTIONS, REQUESTS = 8, 100  # per run of the reference client: 12 NAKs per 100 REQs
BAD_LINES = 5

# Everything the test reads from the page, in one evaluation: the charts' points and the totals.
READ_PAGE = """(() => {
  const series = {};
  for (const path of document.querySelectorAll("svg path[data-series]")) {
    series[path.dataset.series] = JSON.parse(path.dataset.points);
  }
  const totals = {};
  for (const cell of document.querySelectorAll("#totals [data-field][data-value]")) {
    totals[cell.dataset.field] = {kind: cell.dataset.kind, value: Number(cell.dataset.value)};
  }
  const banner = document.getElementById("banner");
  return {
    state: document.body.dataset.state,
    instance: document.body.dataset.instance || null,
    lastSeq: Number(document.body.dataset.lastSeq ?? -1),
    version: document.querySelector('header [data-field="version"]').textContent,
    health: document.getElementById("health").textContent,
    banner: banner.hidden ? "" : banner.textContent,
    series,
    totals,
  };
})()"""


def _get_json(admin: tuple[str, int], path: str) -> Any:
    status, _, body = http_request(admin, path)
    assert status == 200, (path, status, body)
    return json.loads(body)


@contextlib.contextmanager
def _bad_lines(port: int) -> Iterator[None]:
    """One client sends lines that are not Foo (the reference server NAKs each one), then
    stays connected until the block ends: every sample meanwhile sees a connection open."""
    sock = connect(port)
    try:
        sock.sendall(b"this is not foo\n" * BAD_LINES)
        assert recv_lines(sock, BAD_LINES) == [b"NAK 0 ERRDECODE\n"] * BAD_LINES
        yield
    finally:
        sock.close()


def _count(points: list, samples: dict[int, dict]) -> float:
    """What a chart's points add up to: each rate times the length of its second."""
    return sum(
        (value or 0) * samples[seq]["dt"] for seq, value in points if samples[seq]["dt"] is not None
    )


def _window_bounds(points: list, samples: dict[int, dict], end: float) -> tuple[float, float]:
    """REQs of the chart points inside the 10 s before uptime ``end``, and of those touching it."""
    inside = touching = 0.0
    for seq, value in points:
        sample = samples[seq]
        if sample["dt"] is None:
            continue
        high, low = sample["uptime_s"], sample["uptime_s"] - sample["dt"]
        count = (value or 0) * sample["dt"]
        if low >= end - 10 and high <= end:
            inside += count
        if high > end - 10 and low < end:
            touching += count
    return inside, touching


@pytest.mark.parametrize("workers", [1, 2])
def test_the_page_shows_what_the_proxy_counts(
    foo_port: int, workers: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """1. A proxy with -admin and -workers=N; the reference client runs through it in a loop
       (8 connections x 100 REQs a run), and one client sends 5 lines that are not Foo
       and stays connected while the traffic runs.
    2. While the traffic runs, headless Chromium opens the page: it goes live, and the
       requests/s chart fills with points above zero.
    3. /stats, read during the traffic: its 10 s request rate lies between the REQs of the
       chart points inside that window and of those that touch it.
    4. The traffic stops. Every chart point equals /history; the charts add up to the
       counts (requests/s x seconds = the REQs the client sent, NAK share x responses =
       msg_nak, invalid/s x seconds = the 5 bad lines); every total beside them equals
       /stats; the page asked nothing of any other origin. A screenshot is saved.
    5. The proxy stops: the page says it cannot reach it. A new proxy on the same admin
       address: the page reconnects by itself and starts over with the new history.
    """
    admin_port = closed_port()
    admin = ("127.0.0.1", admin_port)
    args = (f"-admin=127.0.0.1:{admin_port}", f"-workers={workers}", "-log-connections=false")
    shots = tmp_path_factory.mktemp("screenshots")
    browser = Browser()
    try:
        with start_proxy(foo_port, *args) as p:
            p.wait_log("admin started")
            with _bad_lines(p.port), Traffic(p.port, CONNECTIONS, REQUESTS) as traffic:
                browser.navigate(f"http://127.0.0.1:{admin_port}/")
                browser.wait_for(
                    "document.body.dataset.state === 'live' && JSON.parse(document.querySelector("
                    "'path[data-series=requests_per_s]').dataset.points)"
                    ".filter(([, v]) => v > 0).length >= 3",
                    timeout=20,
                )
                if README and workers == 2:
                    time.sleep(README_TRAFFIC_S)
                during = _get_json(admin, "/stats")
                # Samples past the moment of that read, so that its window is covered.
                wait_until(
                    lambda: any(
                        s["uptime_s"] >= during["uptime_s"]
                        for s in _get_json(admin, "/history")["samples"]
                    ),
                    timeout=10,
                )
            assert not traffic.failures, traffic.failures[0]
            assert traffic.requests >= CONNECTIONS * REQUESTS
            # Once the proxy has seen every client go, the counts stand still.
            final = wait_until(
                lambda: (r := _get_json(admin, "/stats"))["connections_active"] == 0 and r
            )
            assert final["msg_req"] == traffic.requests
            assert final["msg_invalid"] == BAD_LINES
            # A sample after the end of the traffic, and the page has drawn it.
            newest = wait_until(
                lambda: [
                    s
                    for s in _get_json(admin, "/history")["samples"]
                    if s["msg_req"] == final["msg_req"] and s["connections_active"] == 0
                ],
                timeout=10,
            )[0]
            page = browser.wait_for(
                f"(() => {{ const p = {READ_PAGE}; return p.lastSeq >= {newest['seq']} "
                f"&& p.totals.msg_req.value === {final['msg_req']} && p; }})()",
                timeout=10,
            )
            history = _get_json(admin, "/history")
            samples = {s["seq"]: s for s in history["samples"]}
            path = shots / f"live-page-workers{workers}.png"
            browser.screenshot(str(path))
            print(f"\nscreenshot of the live page (-workers={workers}): {path}")
            if README and workers == 2:
                shutil.copyfile(path, README_SCREENSHOT)

            # 4. The charts hold exactly what /history holds...
            assert page["state"] == "live" and page["instance"] == history["instance"]
            assert page["version"] == __version__ and page["health"] == "healthy"
            for key in (
                "requests_per_s",
                "responses_per_s",
                "nak_share",
                "invalid_per_s",
                "latency_p50_ms",
                "latency_p90_ms",
                "latency_p99_ms",
                "connections_active",
            ):
                points = page["series"][key]
                assert len(points) >= 5, key
                for seq, value in points:
                    assert samples[seq][key] == value, (key, seq)
            # ... and they add up to what the proxy counted and the client sent.
            series = page["series"]
            assert _count(series["requests_per_s"], samples) == pytest.approx(
                traffic.requests, abs=0.01
            )
            replies = final["msg_ack"] + final["msg_nak"]
            assert _count(series["responses_per_s"], samples) == pytest.approx(replies, abs=0.01)
            naks = sum(
                (share or 0) * samples[seq]["responses_per_s"] * samples[seq]["dt"]
                for seq, share in series["nak_share"]
                if samples[seq]["dt"] is not None
            )
            assert naks == pytest.approx(final["msg_nak"], abs=0.01)
            assert final["msg_nak"] == traffic.requests * 12 // 100 + BAD_LINES
            assert _count(series["invalid_per_s"], samples) == pytest.approx(BAD_LINES, abs=0.01)
            # 3. The rate /stats gave during the traffic is within the chart's bounds for it.
            inside, touching = _window_bounds(series["requests_per_s"], samples, during["uptime_s"])
            in_window = during["request_rate_10s"] * 10
            slack = 2 + 0.01 * max(v or 0 for _, v in series["requests_per_s"])
            assert inside - slack <= in_window <= touching + slack, (inside, in_window, touching)
            assert in_window > 0
            # Latency: percentiles while replies flowed, in order; connections within the load.
            timed = [
                (samples[seq]["latency_p50_ms"], samples[seq]["latency_p90_ms"], p99)
                for seq, p99 in series["latency_p99_ms"]
                if p99 is not None
            ]
            assert timed and all(0 < p50 <= p90 <= p99 < 10_000 for p50, p90, p99 in timed)
            active = [v for _, v in series["connections_active"]]
            assert max(active) >= 1 and max(active) <= CONNECTIONS + 1 and active[-1] == 0
            # The totals beside the charts are /stats, field by field.
            assert {"msg_req", "msg_nak_upstream_to_client", "bytes_client_to_upstream"} <= set(
                page["totals"]
            )
            assert "connections_closed.client_closed" in page["totals"]
            for field, cell in page["totals"].items():
                if cell.get("kind") == "rate":
                    continue
                expected: Any = final
                for part in field.split("."):
                    expected = expected[part]
                assert cell["value"] == expected, field
            origin = f"http://127.0.0.1:{admin_port}/"
            urls = browser.requested_urls()
            assert urls and all(url.startswith(origin) for url in urls), urls

        # 5. The proxy is gone: the page says so; a new one on the same address: live again.
        down = browser.wait_for(
            f"(() => {{ const p = {READ_PAGE}; return p.state === 'unreachable' && p; }})()",
            timeout=10,
        )
        assert "Cannot reach the proxy at 127.0.0.1:" in down["banner"], down["banner"]
        assert "Retrying every second" in down["banner"]
        assert down["health"] == "unreachable"
        again = start_proxy(foo_port, *args)
        try:
            back = browser.wait_for(
                f"(() => {{ const p = {READ_PAGE}; return p.state === 'live' "
                f"&& p.instance !== {json.dumps(page['instance'])} && p; }})()",
                timeout=15,
            )
            assert back["banner"] == "" and back["totals"]["msg_req"]["value"] == 0
            assert max(seq for seq, _ in back["series"]["requests_per_s"] or [(0, 0)]) < 60
        finally:
            again.stop()
    finally:
        browser.close()
