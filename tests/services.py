"""The real third-party services some tests start on loopback: Prometheus and HAProxy.

Both run as the Debian packages install them (``/usr/bin/prometheus``,
``/usr/sbin/haproxy``; ``.ci/run`` installs them when missing), each in a
temporary directory of its own, with the deployment files of
``scripts/deploy/`` adapted only where a test must differ (addresses,
intervals, paths). Every wait has a deadline; ``stop`` always ends them.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from geventproxy.testing.launch import ROOT
from tests.helpers import closed_port, wait_until

DEPLOY = ROOT / "scripts" / "deploy"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
#: Seconds a service may take to start on a busy machine.
START_TIMEOUT = 60.0


def run_tool(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """promtool, haproxy -c...: to completion, output captured."""
    return subprocess.run(
        list(argv),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


class _Service:
    def __init__(self, argv: list[str], workdir: Path) -> None:
        self.log_path = workdir / "service.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()

    def __enter__(self) -> _Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Prometheus(_Service):
    """A Prometheus server scraping ``targets`` every second with the shipped config and rules."""

    def __init__(self, targets: list[str], workdir: Path) -> None:
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(DEPLOY / name) for name in config["rule_files"]]
        (job,) = config["scrape_configs"]
        assert job["job_name"] == "geventproxy", job
        job["static_configs"] = [{"targets": targets}]
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                PROMETHEUS,
                f"--config.file={path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            workdir,
        )
        try:
            wait_until(self._ready, timeout=START_TIMEOUT, interval=0.2)
        except AssertionError:
            self.stop()
            raise AssertionError(f"prometheus did not start:\n{self.log()}") from None

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: each series' labels and value."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", body
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [({}, float(result[1]))]
        return [(series["metric"], float(series["value"][1])) for series in result]

    def value(self, expr: str) -> float | None:
        """The value of a query that gives one series, or None while it gives none."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return result[0][1] if result else None

    def rules(self) -> list[dict[str, Any]]:
        body = self._get("/api/v1/rules")
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]


#: Checks other than the shipped /healthz one, on each proxy's client port: HAProxy's
#: plain TCP check, and one that sends a Foo request and expects its reply.
CHECKS = {
    "tcp": "",
    "foo": (
        "    option tcp-check\n"
        '    tcp-check send "REQ 1 check\\n"\n'
        '    tcp-check expect rstring "^(ACK|NAK) 1 "\n'
    ),
}


class HAProxy(_Service):
    """HAProxy with the shipped front, on a free loopback port, in front of ``servers``.

    ``servers`` are (client port, admin port) of each geventproxy instance.
    ``check`` replaces the shipped /healthz check on the admin port by one of
    ``CHECKS`` on the client port.
    """

    def __init__(
        self,
        servers: list[tuple[int, int]],
        workdir: Path,
        *,
        inter: str = "200ms",
        check: str | None = None,
    ) -> None:
        self.port = closed_port()
        self.socket_path = workdir / "haproxy.sock"
        lines = "".join(
            f"    server gp{i} 127.0.0.1:{port} check" + ("" if check else f" port {admin}") + "\n"
            for i, (port, admin) in enumerate(servers, 1)
        )
        replacements = {
            "log /dev/log local0": "log stderr format raw local0",
            # HAProxy sizes its descriptor limit from maxconn: keep it under any hard limit.
            "maxconn 20000": "maxconn 1000",
            "/run/haproxy/geventproxy.sock": str(self.socket_path),
            "bind :8002": f"bind 127.0.0.1:{self.port}",
            "default-server inter 2s": f"default-server inter {inter}",
            "    server gp1 10.0.0.5:8002 check port 9102\n"
            "    server gp2 10.0.0.6:8002 check port 9102\n": lines,
        }
        if check is not None:
            shipped = "    option httpchk GET /healthz\n    http-check expect status 200\n"
            replacements[shipped] = CHECKS[check]
        text = (DEPLOY / "haproxy.cfg").read_text()
        for old, new in replacements.items():
            assert old in text, f"{old!r} is no longer in haproxy.cfg: update this test"
            text = text.replace(old, new)
        path = workdir / "haproxy.cfg"
        path.write_text(text)
        checked = run_tool(HAPROXY, "-c", "-f", str(path))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        super().__init__([HAPROXY, "-db", "-f", str(path)], workdir)
        try:
            wait_until(lambda: self._alive() and self.socket_path.exists(), timeout=START_TIMEOUT)
        except AssertionError:
            self.stop()
            raise AssertionError(f"haproxy did not start:\n{self.log()}") from None

    def _alive(self) -> bool:
        assert self.proc.poll() is None, f"haproxy exited:\n{self.log()}"
        return True

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``, ``disable health ...``)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """Each server of the geventproxy backend: its ``show stat`` fields by name."""
        header, *rows = self.command("show stat").strip().splitlines()
        names = header.lstrip("# ").split(",")
        found = {}
        for row in rows:
            fields = dict(zip(names, row.split(",")))
            if fields["pxname"] == "geventproxy" and fields["svname"] != "BACKEND":
                found[fields["svname"]] = fields
        return found

    def status(self) -> dict[str, str]:
        """Each server and its state (UP, DOWN, ...)."""
        return {name: fields["status"] for name, fields in self.servers().items()}

    def wait_status(self, server: str, status: str, timeout: float = 30.0) -> float:
        """Wait until ``server`` is ``status``; return the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.status()
            if now.get(server) == status:
                return time.monotonic()
            assert time.monotonic() < deadline, f"{server} not {status}: {now}\n{self.log()}"
            time.sleep(0.05)
