"""The admin endpoint of a real proxy in front of the reference server."""

from __future__ import annotations

import json
import signal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from geventproxy.testing.launch import run_foo_client, start_foo_server, start_proxy
from tests.helpers import admin_address, connect, http_request, recv_lines, wait_until

# A free port of its own. (127.0.0.1:0 would equal launch's -listen=127.0.0.1:0,
# which the configuration refuses as the same address.)
ADMIN = "-admin=localhost:0"
HEALTH = "-health-interval=0.2"
CLIENTS = 3


def _metrics(address: tuple[str, int]) -> dict[tuple[str, tuple], float]:
    status, headers, body = http_request(address, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def _healthz(address: tuple[str, int]) -> tuple[int, str]:
    status, _headers, body = http_request(address, "/healthz")
    return status, body.decode()


def test_routes_match_the_traffic_and_the_usr1_report() -> None:
    with (
        start_foo_server() as upstream,
        start_proxy(upstream.port, ADMIN, HEALTH, "-log-level=debug") as p,
    ):
        admin = admin_address(p)
        assert wait_until(lambda: _healthz(admin) == (200, "ok\n"), timeout=5)
        done = run_foo_client(f"-connect=127.0.0.1:{p.port}", f"-connections={CLIENTS}")
        assert done.returncode == 0, done.stdout + done.stderr

        m = _metrics(admin)
        c2u = (("direction", "client_to_upstream"),)
        u2c = (("direction", "upstream_to_client"),)
        assert m[("geventproxy_messages_total", (*c2u, ("type", "req")))] == 100 * CLIENTS
        assert m[("geventproxy_messages_total", (*u2c, ("type", "ack")))] == 88 * CLIENTS
        assert m[("geventproxy_messages_total", (*u2c, ("type", "nak")))] == 12 * CLIENTS
        assert m[("geventproxy_messages_total", (*c2u, ("type", "invalid")))] == 0
        assert m[("geventproxy_connections_total", ())] == CLIENTS
        assert m[("geventproxy_connections_closed_total", (("reason", "client_closed"),))] == (
            CLIENTS
        )
        assert m[("geventproxy_upstream_response_seconds_count", ())] == 100 * CLIENTS
        assert m[("geventproxy_upstream_response_seconds_bucket", (("le", "+Inf"),))] == (
            100 * CLIENTS
        )

        status, headers, body = http_request(admin, "/stats")
        assert (status, headers["content-type"]) == (200, "application/json")
        over_http = json.loads(body)
        usr1 = p.report()
        assert over_http.keys() == usr1.keys()
        for key, value in usr1.items():
            if isinstance(value, int) and not isinstance(value, bool):
                assert over_http[key] == value, key
        assert over_http["connections_closed"] == usr1["connections_closed"]
        assert (over_http["msg_req"], over_http["msg_ack"], over_http["msg_nak"]) == (
            100 * CLIENTS,
            88 * CLIENTS,
            12 * CLIENTS,
        )
        assert m[("geventproxy_bytes_total", c2u)] == usr1["bytes_client_to_upstream"]

        # HEAD has the headers and no body; other methods and paths are refused.
        status, headers, body = http_request(admin, "/metrics", method="HEAD")
        assert (status, body) == (200, b"") and int(headers["content-length"]) > 0
        status, headers, _ = http_request(admin, "/stats", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert http_request(admin, "/nothing-here")[0] == 404
        assert http_request(admin, "/")[0] == 200  # the live page (test_live_page.py)

        # The upstream goes away: /healthz says so within a few check intervals.
        upstream.stop()
        status, text = wait_until(
            lambda: (r := _healthz(admin))[0] == 503 and r, timeout=3, interval=0.05
        )
        assert "unreachable" in text and str(upstream.port) in text
        p.wait_log("health: upstream unreachable")

        # Access lines went to the log (stderr) at debug; stdout holds nothing but reports.
        p.wait_log("admin request")
        p.stop()
        assert p.stdout_lines, "no final report"
        for line in p.stdout_lines:
            assert "msg_total" in json.loads(line)


def test_healthz_fails_while_draining() -> None:
    with start_foo_server() as upstream, start_proxy(upstream.port, ADMIN, HEALTH) as p:
        admin = admin_address(p)
        assert wait_until(lambda: _healthz(admin)[0] == 200, timeout=5)
        client = connect(p.port)
        try:
            client.sendall(b"REQ 1 hello\n")
            assert recv_lines(client, 1)[0].startswith((b"ACK 1 ", b"NAK 1 "))
            p.proc.send_signal(signal.SIGTERM)
            p.wait_log("draining")
            status, text = _healthz(admin)
            assert status == 503 and "not accepting" in text
            # Metrics stay readable during the drain.
            assert _metrics(admin)[("geventproxy_connections_active", ())] == 1
        finally:
            client.close()
        assert p.proc.wait(timeout=5) == 0


def test_admin_address_in_use_is_fatal() -> None:
    with start_foo_server() as upstream, start_proxy(upstream.port, ADMIN) as first:
        host, taken = admin_address(first)
        with pytest.raises(
            RuntimeError, match=f"cannot listen on the -admin address address={host}:{taken}"
        ):
            start_proxy(upstream.port, f"-admin={host}:{taken}")
