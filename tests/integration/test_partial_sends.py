"""The proxy in-process, with tiny socket buffers so that sends are partial.

Runs the real ProxyServer on this process's gevent hub (no monkey-patching):
a small SO_SNDBUF makes the kernel take part of most chunks, which is the
case a wide-area link or a slow upstream produces and loopback rarely does.
"""

from __future__ import annotations

import gevent
import gevent.socket
from gevent.server import StreamServer

from geventproxy.stats import snapshot
from tests.helpers import in_process_proxy

N = 20_000


def _upstream(sock, _address) -> None:
    """Answers every line, reading in small pieces (so it is often behind)."""
    buf = b""
    while True:
        data = sock.recv(512)
        if not data:
            return
        buf += data
        *lines, buf = buf.split(b"\n")
        if lines:
            sock.sendall(b"".join(b"ACK %s x\n" % line.split(b" ")[1] for line in lines))


def test_latency_stays_matched_when_sends_are_partial() -> None:
    """1. Upstream and proxy in this process; the proxy's sockets get a 4 KiB SO_SNDBUF.
    2. One client pipelines 20,000 REQs in one write and reads every reply.
    3. Every reply arrives in order, and every one is timed against its own REQ:
       none unmatched, none dropped, 20,000 timed."""
    listener = gevent.socket.socket()
    # Set before listen() so accepted sockets start with a small window.
    listener.setsockopt(gevent.socket.SOL_SOCKET, gevent.socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    upstream = StreamServer(listener, _upstream)
    upstream.start()
    server, stats = in_process_proxy(upstream.server_port, send_buffer=4096)
    try:
        client = gevent.socket.create_connection(("127.0.0.1", server.address[1]), timeout=30)
        payload = b"".join(b"REQ %d abcdefghij\n" % seq for seq in range(1, N + 1))
        sender = gevent.spawn(client.sendall, payload)
        received = b""
        with gevent.Timeout(60):
            while received.count(b"\n") < N:
                received += client.recv(65536)
        sender.get()
        assert received.split(b"\n")[N - 1] == b"ACK %d x" % N
        client.close()
        report = snapshot([stats.block], stats.clock())
        assert (report["msg_req"], report["msg_ack"]) == (N, N)
        assert report["latency_unmatched"] == 0 and report["latency_dropped"] == 0
        assert report["latency_count"] == N
    finally:
        server.abort_all()
        upstream.stop()
