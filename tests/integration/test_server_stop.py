"""The ProxyServer in-process: what stopping it stops, and one reason per connection.

Runs on this process's gevent hub (no monkey-patching), with the reference
server's class as the upstream.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator

import gevent
import gevent.socket
import pytest

from geventproxy import server as server_module
from geventproxy.server import ProxyServer
from geventproxy.stats import Stats, snapshot
from geventproxy.testing.protocol import reply_for
from geventproxy.testing.server import FooServer
from tests.helpers import ScriptedUpstream, in_process_proxy


@pytest.fixture
def upstream() -> Iterator[FooServer]:
    foo = FooServer(("127.0.0.1", 0))
    foo.start()
    yield foo
    foo.stop()


def _proxy(upstream: FooServer) -> tuple[ProxyServer, Stats]:
    return in_process_proxy(upstream.server_port)


def _report(stats: Stats) -> dict:
    return snapshot([stats.block], stats.clock())


def _served_client(port: int, seq: int) -> gevent.socket.socket:
    client = gevent.socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"REQ %d x\n" % seq)
    reply = b""
    while not reply.endswith(b"\n"):  # the reference server writes a reply in pieces
        piece = client.recv(1024)
        assert piece, reply
        reply += piece
    assert reply == reply_for("REQ", seq, b"x")
    return client


def test_close_stops_the_resume_timer_and_the_sweeper_ends_with_the_last_connection(
    upstream: FooServer,
) -> None:
    """1. A started proxy has a sweeper; out of descriptors, it has a resume timer.
    2. close(): the resume timer is gone at once, and accepting never resumes.
    3. A connection still open keeps the sweeper alive (its timeouts still hold).
    4. Once that connection ends, the sweeper ends by itself.
    """
    proxy, _ = _proxy(upstream)
    try:
        client = _served_client(proxy.server_port, 1)
        assert proxy.sweeper.running
        proxy.accept_pause.pause(OSError(errno.EMFILE, "Too many open files"))
        assert proxy.accept_pause.timer is not None
        proxy.close()
        assert proxy.accept_pause.timer is None
        gevent.sleep(proxy.accept_retry_min * 3)
        assert proxy.closed
        assert proxy.sweeper.running  # one connection is still open
        client.close()
        with gevent.Timeout(10):
            while proxy.sweeper.running:
                gevent.sleep(0.05)
        assert not proxy.connections
    finally:
        proxy.abort_all()


def test_an_error_preparing_the_client_socket_still_closes_with_one_reason(
    upstream: FooServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. Preparing the next client's socket fails (an OSError from setsockopt).
    2. That connection is counted closed with reason error; none stays active.
    3. The listener goes on: the next client is served.
    """
    proxy, stats = _proxy(upstream)
    real_tune = server_module.tune
    failures = [OSError(errno.EINVAL, "Invalid argument")]

    def flaky_tune(sock, send_buffer=None):
        if failures:
            raise failures.pop()
        return real_tune(sock, send_buffer)

    monkeypatch.setattr(server_module, "tune", flaky_tune)
    try:
        first = gevent.socket.create_connection(("127.0.0.1", proxy.server_port), timeout=10)
        with gevent.Timeout(10):
            assert first.recv(1024) == b""  # closed by the proxy
            while _report(stats)["connections_closed"]["error"] != 1:
                gevent.sleep(0.02)
        second = _served_client(proxy.server_port, 2)
        second.close()
        with gevent.Timeout(10):
            while _report(stats)["connections_active"]:
                gevent.sleep(0.02)
        report = _report(stats)
        assert report["connections_total"] == 2
        assert report["connections_closed"]["error"] == 1
        assert report["connections_closed"]["client_closed"] == 1
    finally:
        proxy.abort_all()


def test_an_unusable_accepted_socket_is_counted_and_the_listener_goes_on(
    upstream: FooServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. Turning the next accepted socket into a standard-library one fails (ENOTSOCK).
    2. It is counted in accept_errors; the listener stays open.
    3. The next client is served.
    """
    proxy, stats = _proxy(upstream)
    real_detach = server_module.detach
    failures = [OSError(errno.ENOTSOCK, "Socket operation on non-socket")]

    def flaky_detach(sock):
        if failures:
            real_detach(sock).close()  # the descriptor is not leaked by the test either
            raise failures.pop()
        return real_detach(sock)

    monkeypatch.setattr(server_module, "detach", flaky_detach)
    try:
        first = gevent.socket.create_connection(("127.0.0.1", proxy.server_port), timeout=10)
        with gevent.Timeout(10):
            assert first.recv(1024) == b""
        assert not proxy.closed
        assert _report(stats)["accept_errors"] == 1
        _served_client(proxy.server_port, 2).close()
    finally:
        proxy.abort_all()


def test_a_killed_handler_ends_a_client_side_restarted_meanwhile() -> None:
    """The handler is killed while a park is queued for its client side.

    1. A client sends a REQ; the upstream half-closes, so only the client side runs.
    2. The handler is killed and a park is queued, then enough loop callbacks to use
       up the loop's time slice: the park lands first and the client side's watcher
       restarts it before the handler runs again.
    3. The handler ends whichever client side it finds running: none is left in
       relay(), and the connection is counted closed once.
    """
    up = ScriptedUpstream()
    proxy, stats = in_process_proxy(up.port)
    loop = gevent.get_hub().loop
    try:
        for _ in range(3):
            client = gevent.socket.create_connection(("127.0.0.1", proxy.server_port), timeout=10)
            with gevent.Timeout(10):  # the scripted upstream accepts in a thread of its own
                while up.accepted.empty() or not proxy.connections:
                    gevent.sleep(0.01)
            upstream_side = up.accepted.get_nowait()
            conn = next(iter(proxy.connections))
            handler = next(iter(proxy.handlers))
            upstream_side.shutdown(socket.SHUT_WR)
            client.sendall(b"REQ 1 x\n")
            with gevent.Timeout(10):
                while conn._waiting is not handler:  # the handler waits for the client side
                    gevent.sleep(0.01)
            handler.kill(block=False)
            conn.park()
            for _ in range(60):
                loop.run_callback(time.sleep, 0.0002)
            handler.join(timeout=10)
            assert handler.dead
            gevent.sleep(0.1)
            running = conn._up_greenlet
            assert running is None or running.dead, "a client side was left suspended"
            client.close()
            upstream_side.close()
        with gevent.Timeout(10):
            while _report(stats)["connections_active"]:
                gevent.sleep(0.02)
        assert _report(stats)["connections_closed"]["error"] == 3
    finally:
        proxy.abort_all()
        up.close()
