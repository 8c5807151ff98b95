"""Benchmark: geventproxy next to HAProxy and a direct connection, on loopback.

Builds the C instruments in scripts/bench/ (a load generator and a fast Foo
stub server), then measures, on 127.0.0.1:

    direct   loadgen -> stub
    proxy    loadgen -> python -m geventproxy -> stub
    haproxy  loadgen -> haproxy (mode tcp, one thread) -> stub

Scenarios (--scenarios, comma separated; all by default):

    serial1    1 connection, one request in flight
    serial50   50 connections, one request in flight each
    pipe50     50 connections, 100 requests in flight each
    idle1000   1,000 idle connections: resident memory per connection of the
               proxy and of HAProxy, with and without one request first

Every scenario runs its targets in turn (direct, proxy, haproxy, direct, ...)
for --runs rounds and reports the median of each figure. With two or more
CPUs and `taskset`, the stub and the load generator share the first CPU and
the proxy or HAProxy gets the second, so the relay under test has one core of
its own; the load generator reports how busy the first core was, and a
figure taken while it was saturated is flagged.

After every proxy run the proxy's SIGUSR1 statistics are checked: the
counters must add up (REQs = replies + requests still in flight at the end,
no invalid messages), and request_rate_10s must agree with the REQ count
over the last 10 s. The script exits 1 if any check or any run fails.

--workers-compare adds pipelined runs (50 connections x 100 in flight, and
200 x 25 so that connections spread over the workers) against `-workers=1`
and `-workers=2`, unpinned: two workers need both cores, which they then
share with the load generator and the stub. Their check reads the parent's
summed statistics.

Usage:
    python scripts/bench.py [--quick] [--runs N] [--duration S]
                            [--scenarios serial1,serial50,pipe50,idle1000]
                            [--no-haproxy] [--workers-compare]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import functools
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geventproxy.testing.launch import Launched, start_proxy  # noqa: E402

SCENARIOS = ("serial1", "serial50", "pipe50", "idle1000")
#: name -> (loadgen mode, connections, window)
LOADS = {
    "serial1": ("serial", 1, 1),
    "serial50": ("serial", 50, 1),
    "pipe50": ("pipe", 50, 100),
    "pipe200": ("pipe", 200, 25),
}
TITLES = {
    "serial1": "1 connection, serial (one request in flight)",
    "serial50": "50 connections, serial",
    "pipe50": "50 connections x 100 pipelined requests",
    "pipe200": "200 connections x 25 pipelined requests",
    "idle1000": "1,000 idle connections: resident memory",
}
IDLE_CONNS = 1000
#: Seconds loadgen holds the idle connections (the proxy parks idle ones after 2 s).
IDLE_HOLD = 3.0
#: lg_cpus_busy above this: the load generator / stub side was saturated.
BUSY_FLAG = 0.95
#: request_rate_10s may differ this much from the REQs counted over 10 s.
RATE_TOLERANCE = 0.02
HAPROXY_CFG = """\
global
    maxconn 8000
    nbthread 1
    log stdout format raw local0 emerg
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{upstream}
"""

# -- child processes: every one is registered, and all are ended at exit ------

_popens: list[subprocess.Popen[Any]] = []
_launched: list[Launched] = []


def _cleanup() -> None:
    for launched in _launched:
        with contextlib.suppress(Exception):
            launched.stop(timeout=5)
    for proc in _popens:
        if proc.poll() is None:
            proc.terminate()
    for proc in _popens:
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=3)
    _launched.clear()
    _popens.clear()


def _on_term(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
    _popens.append(proc)
    return proc


def _stop_popen(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)
    if proc in _popens:
        _popens.remove(proc)


def _stop_proxy(launched: Launched) -> None:
    launched.stop(timeout=5)
    if launched in _launched:
        _launched.remove(launched)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def _start_listener(argv_for_port: Any, pin: list[str], what: str, log: Any) -> tuple[Any, int]:
    """Start a child that listens on a port we choose; retry if the port was taken."""
    for _ in range(3):
        port = _free_port()
        proc = _popen([*pin, *argv_for_port(port)], stdout=log, stderr=log)
        if _wait_port(port, proc):
            return proc, port
        _stop_popen(proc)
    log.flush()
    tail = Path(log.name).read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{what} did not start; its output:\n{tail}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_ticks(cpu: int | None) -> tuple[int, int] | None:
    """(busy, total) jiffies of one CPU from /proc/stat; steal counts as busy."""
    if cpu is None:
        return None
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                idle = v[3] + v[4]
                return sum(v) - idle, sum(v)
    return None


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def worker_of(launched: Launched) -> int:
    """The relay's process: the one worker under the proxy's parent (-workers=1)."""
    kids = children_of(launched.pid)
    if len(kids) != 1:
        raise RuntimeError(f"expected one worker under pid {launched.pid}, found {kids}")
    return kids[0]


# -- the proxy's statistics -----------------------------------------------------


class Watch:
    """SIGUSR1 reports of one proxy, with the history needed for the rate check."""

    def __init__(self, launched: Launched) -> None:
        self.launched = launched
        self.history: list[tuple[float, int]] = [(0.0, 0)]  # (uptime_s, msg_req)

    def report(self) -> dict[str, Any]:
        rep = self.launched.report()
        self.history.append((rep["uptime_s"], rep["msg_req"]))
        return rep

    def settled(self, max_wait: float = 2.0) -> dict[str, Any]:
        """A report once the counters have stopped moving (the load has ended)."""
        prev = self.report()
        deadline = time.monotonic() + max_wait
        while time.monotonic() < deadline:
            time.sleep(0.1)
            cur = self.report()
            if (cur["msg_total"], cur["connections_active"]) == (
                prev["msg_total"],
                prev["connections_active"],
            ):
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

    def wait_for_exact_window(self, quiet_from: float, max_wait: float) -> dict[str, Any] | None:
        """A report whose 10 s window starts in the quiet spell that began at
        ``quiet_from`` (before the last run), so that the REQs in that window are
        known exactly; None if that needs more than ``max_wait`` seconds."""
        now = self.history[-1][0]
        if now - 10.0 >= quiet_from:
            return None  # the latest report already has such a window, or never will
        wait = quiet_from + 10.0 - now + 0.05
        if wait > max_wait:
            return None
        time.sleep(wait)
        return self.report()


def _settled_or_none(watch: Watch | None) -> dict[str, Any] | None:
    if watch is None:
        return None
    try:
        return watch.settled()
    except (queue.Empty, KeyError, OSError):
        return None


def _rate_within(
    rep: dict[str, Any], expected: float, high: float | None, how: str
) -> tuple[bool, str]:
    """Is request_rate_10s equal to ``expected`` (or within [expected, high])?"""
    got = rep["request_rate_10s"]
    if high is None:
        err = abs(got - expected) / expected if expected else abs(got)
        ok = err <= RATE_TOLERANCE or abs(got - expected) <= 0.5
        return ok, f"rate_10s {got:.1f}/s, expected {expected:.1f}/s ({how}, off {err:.2%})"
    ok = expected * (1 - RATE_TOLERANCE) - 0.5 <= got <= high * (1 + RATE_TOLERANCE) + 0.5
    return ok, f"rate_10s {got:.1f}/s, expected {expected:.1f}..{high:.1f}/s ({how})"


def check_stats(
    watch: Watch,
    before: dict[str, Any],
    after: dict[str, Any],
    in_flight_max: int,
    lg_replies: int | None,
    exact_req: int | None = None,
    pair: tuple[dict[str, Any], dict[str, Any]] | None = None,
    extra: tuple[dict[str, Any], ...] = (),
) -> tuple[bool, str]:
    """Are the proxy's counters exact over one run? Returns (ok, explanation)."""
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

    # request_rate_10s against the REQs counted in the 10 s before a report.
    rate_note = ""
    for rep in (after, *extra):
        lo, hi = watch.req_bounds(rep["uptime_s"] - 10.0)
        if lo == hi:
            rate_ok, rate_note = _rate_within(rep, (rep["msg_req"] - lo) / 10.0, None, "exact")
            break
    else:
        if pair is not None and abs(pair[1]["uptime_s"] - pair[0]["uptime_s"] - 10.0) < 0.2:
            a, b = pair
            span = b["uptime_s"] - a["uptime_s"]
            expected = (b["msg_req"] - a["msg_req"]) / span
            rate_ok, rate_note = _rate_within(b, expected, None, f"reports {span:.3f} s apart")
        elif d["msg_req"] > 0:
            # The window starts inside an earlier run: only bounds are known.
            lo, hi = watch.req_bounds(after["uptime_s"] - 10.0)
            low, high = (after["msg_req"] - hi) / 10.0, (after["msg_req"] - lo) / 10.0
            rate_ok, rate_note = _rate_within(after, low, high, "bounds")
            if not after["request_rate_10s"] > 0:
                rate_ok, rate_note = False, "request_rate_10s is 0 right after a run"
        else:
            rate_ok, rate_note = True, "no REQ"
    if not rate_ok:
        problems.append("request_rate_10s does not match the REQ counts")
    text = f"REQ {d['msg_req']}, replies {replies}, in flight at end {in_flight}; {rate_note}"
    if problems:
        return False, "FAIL: " + "; ".join(problems) + f" ({text})"
    return True, "PASS: " + text


# -- the load generator ---------------------------------------------------------


def parse_result(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            out: dict[str, Any] = {}
            for tok in line.split()[1:]:
                key, _, val = tok.partition("=")
                try:
                    out[key] = float(val)
                except ValueError:
                    out[key] = None if val == "na" else val
            return out
    return {}


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.failures: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="geventproxy-bench-"))
        atexit.register(shutil.rmtree, self.tmp, True)
        self.log = open(self.tmp / "children.log", "ab")  # noqa: SIM115 (closed at exit)
        atexit.register(self.log.close)
        self.bin = Path(
            subprocess.run(
                ["bash", str(ROOT / "scripts" / "bench" / "build.sh")],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        self.loadgen = str(self.bin / "loadgen")
        self.stub_bin = str(self.bin / "stub")
        cpus = sorted(os.sched_getaffinity(0))
        self.pin_note = ""
        if not shutil.which("taskset"):
            self.pin_note = "no CPU pinning: taskset not found"
        elif len(cpus) < 2:
            self.pin_note = "no CPU pinning: only one CPU"
        if self.pin_note:
            self.pin_lg: list[str] = []
            self.pin_relay: list[str] = []
            self.relay_cpu: int | None = None
        else:
            self.pin_lg = ["taskset", "-c", str(cpus[0])]
            self.pin_relay = ["taskset", "-c", str(cpus[1])]
            self.relay_cpu = cpus[1]
            self.pin_note = (
                f"stub and loadgen pinned to CPU {cpus[0]}, proxy / HAProxy to CPU {cpus[1]}"
            )
        self.haproxy = shutil.which("haproxy") if not opts.no_haproxy else None
        self.warmup = 0.3 if opts.quick else 0.5
        # Seconds a proxy run may wait so that the rate check gets an exact window.
        self.rate_wait = 0.0 if opts.quick else 3.0

    # -- processes

    def start_stub(self, pin: list[str]) -> tuple[subprocess.Popen[Any], int]:
        return _start_listener(
            lambda p: [self.stub_bin, "-listen", f"127.0.0.1:{p}"], pin, "stub", self.log
        )

    def start_haproxy(self, upstream: int) -> tuple[subprocess.Popen[Any], int]:
        assert self.haproxy

        def argv(port: int) -> list[str]:
            cfg = self.tmp / f"haproxy-{port}.cfg"
            cfg.write_text(HAPROXY_CFG.format(port=port, upstream=upstream))
            return [self.haproxy, "-f", str(cfg), "-db"]

        return _start_listener(argv, self.pin_relay, "haproxy", self.log)

    def start_proxy(self, upstream: int, *args: str, pin: list[str] | None = None) -> Watch:
        launched = start_proxy(
            f"127.0.0.1:{upstream}",
            "-log-connections=false",
            *args,
            prefix=self.pin_relay if pin is None else pin,
        )
        _launched.append(launched)
        return Watch(launched)

    # -- one load run

    def run_load(
        self,
        port: int,
        load: str,
        cpu: dict[str, int],
        pin: list[str],
        watch: Watch | None = None,
    ) -> dict[str, Any]:
        mode, conns, window = LOADS[load]
        dur = self.opts.duration
        argv = [*pin, self.loadgen, "-addr", f"127.0.0.1:{port}", "-mode", mode]
        argv += ["-c", str(conns), "-w", str(window), "-d", str(dur), "-warmup", str(self.warmup)]
        for name, pid in cpu.items():
            argv += ["-cpu", f"{name}={pid}"]
        before = _settled_or_none(watch)
        quiet_from = watch.quiet_since() if watch else 0.0
        t0 = time.monotonic()
        core0 = cpu_ticks(self.relay_cpu)
        proc = _popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pair_a = None
        if watch and dur >= 10:
            # A report 10 s before one taken just after the end: the REQs
            # between them are what request_rate_10s must show.
            time.sleep(max(0.0, t0 + self.warmup + dur - 9.8 - time.monotonic()))
            t_a = time.monotonic()
            pair_a = watch.report()
        try:
            out, err = proc.communicate(timeout=self.warmup + dur + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\nbench: loadgen timed out"
        core1 = cpu_ticks(self.relay_cpu)
        _stop_popen(proc)
        res = parse_result(out)
        res["rc"] = proc.returncode
        res["stderr"] = err.strip()
        res["ok"] = proc.returncode == 0 and bool(res.get("msgs"))
        if core0 and core1 and core1[1] > core0[1]:
            res["relay_core_busy"] = (core1[0] - core0[0]) / (core1[1] - core0[1])
        if watch and before is None:
            res["check_ok"], res["check"] = False, "FAIL: no statistics report before the run"
        elif watch and before is not None:
            try:
                pair = None
                if pair_a is not None:
                    time.sleep(max(0.0, t_a + 10.0 - time.monotonic()))
                    pair = (pair_a, watch.report())
                after = watch.settled()
                extra = watch.wait_for_exact_window(quiet_from, self.rate_wait)
                res["check_ok"], res["check"] = check_stats(
                    watch,
                    before,
                    after,
                    conns * window,
                    int(res.get("replies") or 0),
                    pair=pair,
                    extra=(extra,) if extra else (),
                )
            except (queue.Empty, KeyError, OSError) as exc:
                res["check_ok"], res["check"] = False, f"FAIL: no statistics report ({exc!r})"
        return res

    def record(self, label: str, res: dict[str, Any]) -> None:
        if not res["ok"]:
            msg = f"{label}: loadgen exit {res['rc']}: {res['stderr'][-500:]}"
            self.failures.append(msg)
            print(f"    FAIL {msg}", flush=True)
        if "check" in res:
            print(f"    stats {res['check']}", flush=True)
            if not res["check_ok"]:
                self.failures.append(f"{label}: stats {res['check']}")

    # -- scenarios

    def throughput(self, scenario: str, targets: dict[str, Any]) -> dict[str, list[dict]]:
        results: dict[str, list[dict]] = {name: [] for name in targets}
        for rnd in range(self.opts.runs):
            for name, (port, cpu, watch) in targets.items():
                res = self.run_load(port, scenario, cpu, self.pin_lg, watch)
                results[name].append(res)
                label = f"{scenario} round {rnd + 1}/{self.opts.runs} {name}"
                print(f"  {label:<28} {_brief(res, name)}", flush=True)
                self.record(label, res)
        return results

    def idle(self, stub_port: int) -> dict[str, list[dict]]:
        """RSS per idle connection, each measurement in a fresh relay process."""
        hold = IDLE_HOLD
        results: dict[str, list[dict]] = {}
        for rnd in range(self.opts.runs):
            for ping in (0, 1):
                for target in ("proxy", "haproxy") if self.haproxy else ("proxy",):
                    key = f"{target} idleping={ping}"
                    watch = None
                    if target == "proxy":
                        watch = self.start_proxy(stub_port)
                        pid, port, proc = worker_of(watch.launched), watch.launched.port, None
                    else:
                        proc, port = self.start_haproxy(stub_port)
                        pid = proc.pid
                    try:
                        res = self.idle_run(port, pid, ping, hold, watch)
                    finally:
                        if watch:
                            _stop_proxy(watch.launched)
                        if proc:
                            _stop_popen(proc)
                    results.setdefault(key, []).append(res)
                    label = f"idle1000 round {rnd + 1}/{self.opts.runs} {key}"
                    print(
                        f"  {label:<40} RSS {res['rss0']} -> {res['rss1']} KiB "
                        f"(peak {res['peak']}): {res['per_conn']:.2f} KiB/conn",
                        flush=True,
                    )
                    self.record(label, res)
        return results

    def idle_run(
        self, port: int, pid: int, ping: int, hold: float, watch: Watch | None
    ) -> dict[str, Any]:
        before = _settled_or_none(watch)
        time.sleep(0.2)
        rss0 = rss_kib(pid)
        argv = [*self.pin_lg, self.loadgen, "-addr", f"127.0.0.1:{port}", "-c", "0"]
        argv += ["-idle", str(IDLE_CONNS), "-idleping", str(ping), "-d", str(hold)]
        proc = _popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        err_lines: list[str] = []

        def read_err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err_lines.append(line)
                lines.put(line)
            lines.put("")

        threading.Thread(target=read_err, daemon=True).start()
        ready_at = None
        deadline = time.monotonic() + 10
        while ready_at is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if "READY" in line:
                ready_at = time.monotonic()
            elif not line:
                break
        samples = []
        if ready_at is not None:
            # Sample while they are held; the last sample is the settled figure.
            while time.monotonic() < ready_at + hold - 0.25 and proc.poll() is None:
                time.sleep(0.25)
                samples.append(rss_kib(pid))
        try:
            out, _ = proc.communicate(timeout=hold + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        _stop_popen(proc)
        rss1 = samples[-1] if samples else rss0
        res: dict[str, Any] = {
            "rss0": rss0,
            "rss1": rss1,
            "peak": max(samples, default=rss0),
            "per_conn": (rss1 - rss0) / IDLE_CONNS,
            "rc": proc.returncode,
            "stderr": "".join(err_lines).strip(),
            "ok": proc.returncode == 0 and ready_at is not None and bool(samples),
        }
        res.update({k: v for k, v in parse_result(out).items() if k not in res})
        if watch and before is None:
            res["check_ok"], res["check"] = False, "FAIL: no statistics report before the run"
        elif watch and before is not None:
            try:
                after = watch.settled()
                res["check_ok"], res["check"] = check_stats(
                    watch, before, after, 0, None, exact_req=IDLE_CONNS * ping
                )
            except (queue.Empty, KeyError, OSError) as exc:
                res["check_ok"], res["check"] = False, f"FAIL: no statistics report ({exc!r})"
        return res

    def workers_compare(self) -> dict[str, dict[str, list[dict]]]:
        stub, stub_port = self.start_stub([])
        out: dict[str, dict[str, list[dict]]] = {}
        try:
            watches = {
                f"workers={n}": self.start_proxy(stub_port, f"-workers={n}", pin=[]) for n in (1, 2)
            }
            time.sleep(0.5)
            for scenario in ("pipe50", "pipe200"):
                results: dict[str, list[dict]] = {name: [] for name in watches}
                for rnd in range(self.opts.runs):
                    for name, watch in watches.items():
                        kids = children_of(watch.launched.pid)
                        cpu = {f"w{i}": k for i, k in enumerate(kids)}
                        cpu["stub"] = stub.pid
                        res = self.run_load(watch.launched.port, scenario, cpu, [], watch)
                        results[name].append(res)
                        label = f"{scenario} round {rnd + 1}/{self.opts.runs} {name}"
                        print(f"  {label:<28} {_brief(res, name)}", flush=True)
                        self.record(label, res)
                out[scenario] = results
            for watch in watches.values():
                _stop_proxy(watch.launched)
        finally:
            _stop_popen(stub)
        return out


# -- reporting --------------------------------------------------------------------


def _med(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def _relay_name(target: str) -> str | None:
    return {"proxy": "proxy", "haproxy": "haproxy"}.get(target)


def _worker_sum(runs: list[dict], suffix: str) -> float | None:
    vals = []
    for r in runs:
        parts = [v for k, v in r.items() if k.startswith("w") and k.endswith(suffix)]
        if parts and all(isinstance(v, float) for v in parts):
            vals.append(sum(parts))
    return statistics.median(vals) if vals else None


def _brief(res: dict[str, Any], name: str) -> str:
    if not res.get("msgs"):
        return "no result"
    relay = _relay_name(name)
    cpu = res.get(f"{relay}_cpu") if relay else None
    busy = res.get("lg_cpus_busy")
    flag = "!" if isinstance(busy, float) and busy > BUSY_FLAG else ""
    return (
        f"{_n(res['rate'])} msgs/s  p50 {_f(res['p50_us'])} us  "
        f"{'relay cpu ' + _f(cpu, 2) + '  ' if cpu is not None else ''}"
        f"lg cpu {_f(res.get('self_cpu'), 2)}  lg_cpus_busy {_f(busy, 2)}{flag}"
    )


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _f(x: float | None, prec: int = 1) -> str:
    return "-" if x is None else f"{x:,.{prec}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for i, row in enumerate([headers, *rows]):
        cells = [
            str(c).ljust(w) if j == 0 else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(row, widths))
        ]
        print("  " + "  ".join(cells).rstrip())
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def report_throughput(scenario: str, results: dict[str, list[dict]], runs: int) -> None:
    print(f"\n== {scenario}: {TITLES[scenario]} (median of {runs})")
    headers = ["target", "msgs/s", "req/s", "p50 us", "p99 us", "relay cpu", "relay core busy"]
    headers += ["relay cpu s/M", "stub cpu s/M", "lg cpu", "lg_cpus_busy", "stats"]
    rows = []
    flagged = False
    med: dict[str, dict[str, float | None]] = {}
    for name, rs in results.items():
        relay = _relay_name(name) or ""
        m = {
            k: _med(rs, k)
            for k in ("rate", "req_rate", "p50_us", "p99_us", "self_cpu", "lg_cpus_busy")
        }
        m["core_busy"] = _med(rs, "relay_core_busy")
        m["cpu"] = _med(rs, f"{relay}_cpu")
        m["cpu_per_M"] = _med(rs, f"{relay}_cpu_per_M")
        m["stub_per_M"] = _med(rs, "stub_cpu_per_M")
        med[name] = m
        busy = m["lg_cpus_busy"]
        flag = ""
        if busy is not None and busy > BUSY_FLAG:
            flag, flagged = " !", True
        checks = [r["check_ok"] for r in rs if "check_ok" in r]
        stats = ("PASS" if all(checks) else "FAIL") if checks else ""
        rows.append(
            [
                name,
                _n(m["rate"]),
                _n(m["req_rate"]),
                _f(m["p50_us"]),
                _f(m["p99_us"]),
                _f(m["cpu"], 2),
                _f(m["core_busy"], 2),
                _f(m["cpu_per_M"], 3),
                _f(m["stub_per_M"], 3),
                _f(m["self_cpu"], 2),
                _f(busy, 2) + flag,
                stats,
            ]
        )
    print_table(headers, rows)
    if flagged:
        print(
            f"  ! lg_cpus_busy > {BUSY_FLAG}: the load generator's CPU(s) were saturated, so"
            " that row is bounded by the load side, not by the relay (for direct that is"
            " expected: stub and loadgen share that CPU)"
        )
    p, h, d = med.get("proxy"), med.get("haproxy"), med.get("direct")
    if p and h:
        print(
            f"  proxy/haproxy: throughput {_ratio(p['rate'], h['rate'])}, "
            f"CPU per message {_ratio(p['cpu_per_M'], h['cpu_per_M'])}"
        )
    if p and d and p["p50_us"] is not None and d["p50_us"] is not None:
        added_p = p["p50_us"] - d["p50_us"]
        text = f"  added p50 latency vs direct: proxy {added_p:+.1f} us"
        if h and h["p50_us"] is not None:
            added_h = h["p50_us"] - d["p50_us"]
            text += f", haproxy {added_h:+.1f} us"
            text += f" (proxy/haproxy {_ratio(added_p, added_h) if added_h > 0 else '-'})"
        print(text)


def report_idle(results: dict[str, list[dict]], runs: int) -> None:
    print(f"\n== idle1000: {TITLES['idle1000']} (median of {runs}, fresh process each)")
    headers = ["target", "RSS before KiB", "RSS held KiB", "peak KiB", "KiB/conn", "stats"]
    rows = []
    for name, rs in results.items():
        checks = [r["check_ok"] for r in rs if "check_ok" in r]
        rows.append(
            [
                name,
                _n(_med(rs, "rss0")),
                _n(_med(rs, "rss1")),
                _n(_med(rs, "peak")),
                _f(_med(rs, "per_conn"), 2),
                ("PASS" if all(checks) else "FAIL") if checks else "",
            ]
        )
    print_table(headers, rows)
    for ping in (0, 1):
        p = results.get(f"proxy idleping={ping}")
        h = results.get(f"haproxy idleping={ping}")
        if p and h:
            print(
                f"  idleping={ping}: proxy {_f(_med(p, 'per_conn'), 2)} KiB/conn, haproxy "
                f"{_f(_med(h, 'per_conn'), 2)} KiB/conn "
                f"(proxy/haproxy {_ratio(_med(p, 'per_conn'), _med(h, 'per_conn'))})"
            )
    print("  idleping=1: each connection sent one REQ and got its reply before being held")


def report_workers(out: dict[str, dict[str, list[dict]]], runs: int) -> None:
    for scenario, results in out.items():
        print(f"\n== workers {scenario}: {TITLES[scenario]}, unpinned (median of {runs})")
        headers = ["target", "msgs/s", "req/s", "p50 us", "p99 us", "workers cpu"]
        headers += ["workers cpu s/M", "lg cpu", "lg_cpus_busy", "stats"]
        rows = []
        for name, rs in results.items():
            checks = [r["check_ok"] for r in rs if "check_ok" in r]
            splits = [
                "+".join(
                    _f(v, 2) for k, v in sorted(r.items()) if k[:1] == "w" and k.endswith("_cpu")
                )
                for r in rs
            ]
            busy = _med(rs, "lg_cpus_busy")
            rows.append(
                [
                    name,
                    _n(_med(rs, "rate")),
                    _n(_med(rs, "req_rate")),
                    _f(_med(rs, "p50_us")),
                    _f(_med(rs, "p99_us")),
                    splits[len(splits) // 2] if splits else "-",
                    _f(_worker_sum(rs, "_cpu_per_M"), 3),
                    _f(_med(rs, "self_cpu"), 2),
                    _f(busy, 2) + (" !" if busy is not None and busy > BUSY_FLAG else ""),
                    ("PASS" if all(checks) else "FAIL") if checks else "",
                ]
            )
        print_table(headers, rows)
        one, two = results.get("workers=1"), results.get("workers=2")
        if one and two:
            print(
                f"  workers=2/workers=1 throughput {_ratio(_med(two, 'rate'), _med(one, 'rate'))}"
                "; the stats check reads the parent's summed counters"
            )
    print(
        "  loadgen, stub and the workers share all CPUs here, so lg_cpus_busy near 1 is"
        " expected: the machine, not one process, is the limit"
    )


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip() if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def print_header(bench: Bench) -> None:
    try:
        from importlib.metadata import version

        gevent_version = version("gevent")
    except Exception:
        gevent_version = "?"
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    opts = bench.opts
    print("geventproxy benchmark")
    print(f"  date      {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"  machine   {platform.machine()}, {os.cpu_count()} CPUs (nproc), {model}")
    print(
        f"  load avg  {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the machine)"
    )
    print(f"  python    {platform.python_version()}, gevent {gevent_version}")
    if bench.haproxy:
        print(f"  haproxy   {_version([bench.haproxy, '-v'])}")
    elif opts.no_haproxy:
        print("  haproxy   skipped (--no-haproxy)")
    else:
        print("  haproxy   not installed (apt-get install -y haproxy): skipped")
    print(f"  tools     {bench.bin} (built from scripts/bench/)")
    print(f"  pinning   {bench.pin_note}")
    print(
        f"  runs      {opts.runs} round(s) of {opts.duration:g} s (+{bench.warmup:g} s warm-up) per"
        " target, targets alternated, medians reported"
    )
    print("  units     msgs = REQs + replies; 'relay cpu' in cores; 's/M' = CPU s per 1e6 msgs;")
    print("            latency = loadgen's write-to-reply time (pipelined: includes queueing)")


# -- main -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s (under 40 s)")
    parser.add_argument("--runs", type=int, help="rounds per scenario (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 3)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}, or none",
    )
    parser.add_argument("--no-haproxy", action="store_true", help="skip HAProxy")
    parser.add_argument(
        "--workers-compare", action="store_true", help="also compare -workers=1 and -workers=2"
    )
    opts = parser.parse_args(argv)
    if opts.runs is None:
        opts.runs = 1 if opts.quick else 3
    if opts.duration is None:
        opts.duration = 2.0 if opts.quick else 3.0
    if opts.runs < 1 or opts.duration <= 0:
        parser.error("--runs must be >= 1 and --duration > 0")
    opts.scenarios = [s.strip() for s in opts.scenarios.split(",") if s.strip() not in ("", "none")]
    unknown = [s for s in opts.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {','.join(unknown)}; choose from {','.join(SCENARIOS)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    atexit.register(_cleanup)
    signal.signal(signal.SIGTERM, _on_term)
    started = time.monotonic()
    bench = Bench(opts)
    print_header(bench)
    tables: list[Any] = []
    try:
        stub, stub_port = bench.start_stub(bench.pin_lg)
        loads = [s for s in opts.scenarios if s in LOADS]
        if loads:
            proxy = bench.start_proxy(stub_port)
            targets: dict[str, Any] = {"direct": (stub_port, {"stub": stub.pid}, None)}
            cpu = {"proxy": worker_of(proxy.launched), "stub": stub.pid}
            targets["proxy"] = (proxy.launched.port, cpu, proxy)
            if bench.haproxy:
                hap, hap_port = bench.start_haproxy(stub_port)
                targets["haproxy"] = (hap_port, {"haproxy": hap.pid, "stub": stub.pid}, None)
            for scenario in loads:
                print(f"\n-- {scenario}: {TITLES[scenario]}", flush=True)
                res = bench.throughput(scenario, targets)
                tables.append(functools.partial(report_throughput, scenario, res, opts.runs))
            _stop_proxy(proxy.launched)
            if bench.haproxy:
                _stop_popen(hap)
        if "idle1000" in opts.scenarios:
            print(f"\n-- idle1000: {TITLES['idle1000']}", flush=True)
            tables.append(functools.partial(report_idle, bench.idle(stub_port), opts.runs))
        _stop_popen(stub)
        if opts.workers_compare:
            print("\n-- workers: -workers=1 vs -workers=2, unpinned", flush=True)
            tables.append(functools.partial(report_workers, bench.workers_compare(), opts.runs))
    finally:
        _cleanup()

    print("\n" + "=" * 30 + " results " + "=" * 30)
    for print_result in tables:
        print_result()
    print(f"\nload avg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total time {time.monotonic() - started:.0f} s")
    if bench.failures:
        print(f"\n{len(bench.failures)} FAILURE(S):")
        for failure in bench.failures:
            print(f"  {failure}")
        return 1
    print("all runs and statistics checks passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; all child processes stopped", file=sys.stderr)
        sys.exit(130)
