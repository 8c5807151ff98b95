"""The admin WSGI application and the health verdict, without a server or a network."""

from __future__ import annotations

import json
from typing import Any

import pytest

from geventproxy import __version__, process
from geventproxy.admin import AdminApp, HealthCheck
from geventproxy.config import Address
from geventproxy.history import FIELDS, History, sample_row
from geventproxy.stats import Stats, latency_histogram, snapshot


class FakeHealth:
    def __init__(self, verdict: tuple[bool, str]) -> None:
        self.verdict = verdict

    def status(self) -> tuple[bool, str]:
        return self.verdict

    def upstream_up(self) -> bool:
        return self.verdict[0]


def _call(app: AdminApp, path: str, method: str = "GET") -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": path}, start_response))
    return seen["status"], seen["headers"], body


@pytest.fixture()
def app() -> AdminApp:
    stats = Stats()
    return AdminApp(
        lambda: snapshot([stats.block], stats.clock()),
        lambda: latency_histogram([stats.block]),
        FakeHealth((True, "ok")),
    )


def test_routes(app: AdminApp) -> None:
    status, headers, body = _call(app, "/metrics")
    assert status == "200 OK" and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE geventproxy_messages_total counter" in body
    assert headers["Content-Length"] == str(len(body))
    status, headers, body = _call(app, "/stats")
    assert (status, headers["Content-Type"]) == ("200 OK", "application/json")
    assert json.loads(body)["msg_total"] == 0 and body.endswith(b"\n")
    assert _call(app, "/healthz")[::2] == ("200 OK", b"ok\n")


def test_head_404_405(app: AdminApp) -> None:
    status, headers, body = _call(app, "/stats", "HEAD")
    assert status == "200 OK" and body == b"" and int(headers["Content-Length"]) > 0
    assert _call(app, "/metrics/")[0] == "404 Not Found"
    assert _call(app, "/missing", "POST")[0] == "404 Not Found"
    status, headers, _ = _call(app, "/metrics", "DELETE")
    assert status == "405 Method Not Allowed" and headers["Allow"] == "GET, HEAD"


def test_metrics_carry_the_health_and_the_process_figures(app: AdminApp) -> None:
    body = _call(app, "/metrics")[2].decode()
    assert "\ngeventproxy_upstream_up 1\n" in body
    assert "process_open_fds" not in body  # none given
    app.health = FakeHealth((False, "upstream db:1 unreachable: refused"))
    figures = process.figures()
    assert figures is not None
    app.processes = lambda: [(None, figures)]
    body = _call(app, "/metrics")[2].decode()
    assert "\ngeventproxy_upstream_up 0\n" in body
    assert f"\nprocess_open_fds {figures.open_fds}\n" in body


def test_unhealthy_is_503_with_the_reason(app: AdminApp) -> None:
    app.health = FakeHealth((False, "upstream db:1 unreachable: refused"))
    assert _call(app, "/healthz")[::2] == (
        "503 Service Unavailable",
        b"upstream db:1 unreachable: refused\n",
    )


def test_a_failing_route_is_a_500_not_a_crash(app: AdminApp) -> None:
    def broken() -> dict:
        raise RuntimeError("boom")

    app.snapshot = broken
    assert _call(app, "/stats")[0] == "500 Internal Server Error"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_health_verdicts() -> None:
    clock = Clock()
    accepting = [True]
    health = HealthCheck(Address("127.0.0.1", 1), 1.0, 2.0, lambda: accepting[0], clock)
    assert health.status() == (False, "upstream not checked yet")
    assert health.upstream_up() is False
    health.reachable, health.checked_at = True, clock.now
    assert health.status() == (True, "ok") and health.upstream_up() is True
    clock.now += 3 * 2.0 + 1.0 + 0.1  # three missed rounds and a timeout
    assert health.status() == (False, "upstream check is stale")
    assert health.upstream_up() is False
    health.reachable, health.error, health.checked_at = False, "refused", clock.now
    assert health.status() == (False, "upstream 127.0.0.1:1 unreachable: refused")
    assert health.upstream_up() is False
    accepting[0] = False
    assert health.status()[0] is False and "not accepting" in health.status()[1]


def test_health_interval_and_timeout_floors() -> None:
    health = HealthCheck(Address("h", 1), 0.0, 0.0, lambda: True)
    assert health.timeout > 0 and health.interval > 0


def _call_query(app: AdminApp, path: str, query: str) -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query}
    body = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], body


def test_history_route(app: AdminApp) -> None:
    assert _call(app, "/history")[0] == "404 Not Found"  # no history kept without a sampler
    app.history = History()
    for n in range(5):
        app.history.append(sample_row(n, 1000.0 + n, float(n), app.snapshot(), None))
    status, headers, body = _call(app, "/history")
    assert (status, headers["Content-Type"]) == ("200 OK", "application/json")
    document = json.loads(body)
    assert document["version"] == __version__ and document["fields"] == list(FIELDS)
    assert [s["seq"] for s in document["samples"]] == [0, 1, 2, 3, 4]
    status, _, body = _call_query(app, "/history", "after=2")
    assert [s["seq"] for s in json.loads(body)["samples"]] == [3, 4]
    assert _call_query(app, "/history", "after=two")[0] == "400 Bad Request"


def test_the_page_and_its_files(app: AdminApp) -> None:
    status, headers, body = _call(app, "/")
    assert (status, headers["Content-Type"]) == ("200 OK", "text/html; charset=utf-8")
    assert b'<script src="live.js"' in body and b'href="live.css"' in body
    # Nothing but its own origin: no CDN, no inline script.
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "script-src 'self';" in headers["Content-Security-Policy"]
    for path, ctype in (("/live.js", "text/javascript"), ("/live.css", "text/css")):
        status, headers, body = _call(app, path)
        assert status == "200 OK" and headers["Content-Type"].startswith(ctype)
        assert body and b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in body
    assert _call(app, "/", "HEAD")[2] == b""
    assert _call(app, "/index.html")[0] == "404 Not Found"
