"""Several instances behind the shipped HAProxy front, with a real Prometheus beside them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from geventproxy.testing.launch import Launched, run_foo_client, start_proxy
from tests.helpers import admin_address, http_request, process_tree, wait_until
from tests.services import DEPLOY, HAPROXY, HAProxy, Prometheus, run_tool

ADMIN = "-admin=127.0.0.1:0"
HEALTH = "-health-interval=0.2"
# Long enough for a busy machine; checks come every 200 ms, scrapes every second.
DEADLINE = 60.0


def _stats(p: Launched) -> dict:
    status, _headers, body = http_request(admin_address(p), "/stats")
    assert status == 200
    return json.loads(body)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_shipped_front_passes_haproxy_check() -> None:
    done = run_tool(HAPROXY, "-c", "-f", str(DEPLOY / "haproxy.cfg"))
    assert done.returncode == 0, done.stdout + done.stderr


class _ClientLoop:
    """The reference client through HAProxy again and again, each run's start and result."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.runs: list[tuple[float, int, str]] = []  # (started, exit status, output)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            result = run_foo_client(
                f"-connect=127.0.0.1:{self.port}", "-connections=4", "-requests=300"
            )
            self.runs.append((started, result.returncode, result.stdout + result.stderr))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=DEADLINE)


def test_an_instance_killed_mid_run(tmp_path: Path, foo_port: int) -> None:
    """1. Instances A and B (-admin), the shipped HAProxy front checking each one's
       /healthz every 200 ms, and a Prometheus scraping both every second.
    2. 20 reference clients through HAProxy: all pass; both instances served some;
       Prometheus sums both instances to exactly the REQs sent.
    3. The reference client runs through HAProxy without pause; A is SIGKILLed while
       it holds some of the client's connections (that client fails).
    4. HAProxy's checks mark A DOWN; every client started after that passes.
    5. Prometheus sees A down (what GeventproxyTargetDown alerts on), and for B
       exactly what B's /stats says.
    """
    with (
        start_proxy(foo_port, ADMIN, HEALTH, "-log-connections=false") as a,
        start_proxy(foo_port, ADMIN, HEALTH, "-log-connections=false") as b,
    ):
        admins = [admin_address(a), admin_address(b)]
        targets = [f"127.0.0.1:{port}" for _host, port in admins]
        (tmp_path / "haproxy").mkdir()
        (tmp_path / "prometheus").mkdir()
        servers = [(a.port, admins[0][1]), (b.port, admins[1][1])]
        with (
            HAProxy(servers, tmp_path / "haproxy") as front,
            Prometheus(targets, tmp_path / "prometheus") as prom,
        ):
            front.wait_status("gp1", "UP", DEADLINE)
            front.wait_status("gp2", "UP", DEADLINE)
            wait_until(lambda: prom.value("sum(up)") == 2, timeout=DEADLINE, interval=0.2)

            done = run_foo_client(f"-connect=127.0.0.1:{front.port}", "-connections=20")
            assert done.returncode == 0, done.stdout + done.stderr
            assert _stats(a)["msg_req"] > 0 and _stats(b)["msg_req"] > 0
            assert _stats(a)["msg_req"] + _stats(b)["msg_req"] == 2000
            total = 'sum(geventproxy_messages_total{type="req"})'
            wait_until(lambda: prom.value(total) == 2000, timeout=DEADLINE, interval=0.2)
            per_instance = 'sum by (instance) (geventproxy_messages_total{type="req"})'
            assert prom.value(f"count({per_instance} > 0)") == 2  # both served, both summed

            loop = _ClientLoop(front.port)
            try:
                # Mid-run: while A holds some of the loop's connections.
                wait_until(lambda: _stats(a)["connections_active"] > 0, timeout=DEADLINE)
                # The whole instance, as when its machine dies: the parent and its worker.
                for pid in process_tree(a.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                a.proc.wait(timeout=10)
                noticed = front.wait_status("gp1", "DOWN", DEADLINE)
                wait_until(
                    lambda: sum(1 for started, *_ in loop.runs if started > noticed) >= 5,
                    timeout=DEADLINE,
                    interval=0.1,
                )
            finally:
                loop.stop()
            after = [(code, out) for started, code, out in loop.runs if started > noticed]
            assert len(after) >= 5 and all(code == 0 for code, _ in after), after
            # The run that had connections on A when it died saw them cut.
            assert any(code != 0 for started, code, _ in loop.runs if started <= noticed)

            wait_until(
                lambda: prom.value(f'up{{instance="{targets[0]}"}}') == 0,
                timeout=DEADLINE,
                interval=0.2,
            )
            served_by_b = _stats(b)["msg_req"]
            instance_b = f'geventproxy_messages_total{{type="req",instance="{targets[1]}"}}'
            wait_until(
                lambda: prom.value(f"sum({instance_b})") == served_by_b,
                timeout=DEADLINE,
                interval=0.2,
            )


def test_plain_tcp_checks_leave_no_connection_open(tmp_path: Path, foo_port: int) -> None:
    """1. Instances A and B; the shipped front with HAProxy's plain TCP check instead of
       /healthz, on each proxy's client port, every 100 ms.
    2. Both servers are UP on those checks (L4OK) for 3 s, some 30 checks each.
    3. Neither proxy has an open connection, nor a descriptor more than before.
       (HAProxy's plain check answers the SYN-ACK with a reset: the kernel drops the
       half-open connection, so the proxies never even accept one.)
    """
    with start_proxy(foo_port, ADMIN, HEALTH) as a, start_proxy(foo_port, ADMIN, HEALTH) as b:
        admins = [admin_address(a), admin_address(b)]
        before = {p.pid: _fds(p.pid) for p in (a, b)}
        servers = [(a.port, admins[0][1]), (b.port, admins[1][1])]
        with HAProxy(servers, tmp_path, inter="100ms", check="tcp") as front:
            front.wait_status("gp1", "UP", DEADLINE)
            front.wait_status("gp2", "UP", DEADLINE)
            time.sleep(3)
            checked = front.servers()
            # "* L4OK": a check is running at this moment; L4OK is the last one's result.
            assert {
                name: (f["status"], f["check_status"].removeprefix("* "))
                for name, f in checked.items()
            } == {
                "gp1": ("UP", "L4OK"),
                "gp2": ("UP", "L4OK"),
            }
            for p in (a, b):
                stats = _stats(p)
                assert stats["connections_active"] == 0, stats
                assert stats["connections_total"] == 0, stats
                wait_until(lambda p=p: _fds(p.pid) <= before[p.pid], timeout=DEADLINE)


def test_checks_that_connect_and_close_leave_no_connection_open(
    tmp_path: Path, foo_port: int
) -> None:
    """1. Instances A and B; the front with a check that does connect to each proxy's
       client port: it sends a REQ, expects its reply and closes, every 100 ms.
    2. Once each proxy has served 20 such checks, the checks are switched off (HAProxy
       keeps running, so nothing is closed by its exit).
    3. Both proxies are back to 0 open connections and to the descriptors they had
       before; every connection ended with a close reason.
    """
    with start_proxy(foo_port, ADMIN, HEALTH) as a, start_proxy(foo_port, ADMIN, HEALTH) as b:
        admins = [admin_address(a), admin_address(b)]
        before = {p.pid: _fds(p.pid) for p in (a, b)}
        servers = [(a.port, admins[0][1]), (b.port, admins[1][1])]
        with HAProxy(servers, tmp_path, inter="100ms", check="foo") as front:
            for p in (a, b):
                wait_until(
                    lambda p=p: _stats(p)["connections_total"] >= 20,
                    timeout=DEADLINE,
                    interval=0.1,
                )
            assert front.status() == {"gp1": "UP", "gp2": "UP"}
            front.command("disable health geventproxy/gp1")
            front.command("disable health geventproxy/gp2")
            for p in (a, b):
                settled = wait_until(
                    lambda p=p: (s := _stats(p))["connections_active"] == 0 and s,
                    timeout=DEADLINE,
                    interval=0.1,
                )
                closed = settled["connections_closed"]
                assert settled["connections_total"] == sum(closed.values()), settled
                assert settled["msg_req"] >= 20  # the checks went through to the upstream
                wait_until(lambda p=p: _fds(p.pid) <= before[p.pid], timeout=DEADLINE)
