"""One load run, one idle run, and the scenarios made of them.

A ``Bench`` holds what every run needs (options, tools, pinning, the
children of this run) and collects failures. Relays under test:

    direct       loadgen -> stub (no relay; the latency baseline)
    accelerated  loadgen -> python -m geventproxy (compiled accelerator) -> stub
    pure         the same with GEVENTPROXY_PURE=1
    haproxy      loadgen -> haproxy (mode tcp, nbthread 1) -> stub
"""

from __future__ import annotations

import dataclasses
import queue
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from geventproxy.testing.launch import Launched

from .checks import Watch, check_stats
from .processes import (
    ACCELERATED_ENV,
    PURE_ENV,
    Children,
    Pinning,
    Tools,
    children_of,
    cpu_ticks,
    fd_prefix,
    haproxy_config,
    rss_kib,
)
from .scenarios import IDLE, LOADS
from .tables import brief

__all__ = [
    "Bench",
    "Relay",
    "idle",
    "idle_run",
    "parse_result",
    "run_load",
    "throughput",
    "workers_compare",
]

#: Seconds loadgen holds idle connections (the proxy parks idle ones after 2 s).
IDLE_HOLD = 3.5
#: The start line's field that names the counting implementation (quoted if it has spaces).
_COUNTING = re.compile(r'counting=(?:"([^"]*)"|(\S+))')
#: Descriptors a relay process needs besides its connections (listeners, event loop, logs).
FD_RESERVE = 100
PROXY_PATHS = {"accelerated": ACCELERATED_ENV, "pure": PURE_ENV}


@dataclasses.dataclass
class Relay:
    """A target the load generator talks to."""

    name: str
    port: int
    cpu: dict[str, int]  # loadgen -cpu NAME=PID: "relay" and "stub"
    watch: Watch | None = None  # the proxy's statistics, for the check
    counting: str = ""  # what the proxy's start line says it runs
    process: Launched | subprocess.Popen[Any] | None = None  # None: not ours to stop


@dataclasses.dataclass
class Bench:
    opts: Any
    tools: Tools
    pins: Pinning
    children: Children
    tmp: Path
    haproxy: str | None
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def warmup(self) -> float:
        return 0.3 if self.opts.quick else 0.5

    @property
    def rate_wait(self) -> float:
        """Seconds a proxy run may wait so that the rate check gets an exact window."""
        return 0.0 if self.opts.quick else 3.0

    # -- relays

    def start_stub(self, prefix: list[str]) -> tuple[subprocess.Popen[Any], int]:
        stub = self.tools.stub
        return self.children.listener(lambda p: [stub, "-listen", f"127.0.0.1:{p}"], prefix, "stub")

    def start_haproxy(
        self, upstream: int, prefix: list[str], maxconn: int = 8000
    ) -> tuple[subprocess.Popen[Any], int]:
        assert self.haproxy
        haproxy = self.haproxy

        def argv(port: int) -> list[str]:
            cfg = self.tmp / f"haproxy-{port}.cfg"
            cfg.write_text(haproxy_config(port, upstream, maxconn))
            return [haproxy, "-f", str(cfg), "-db"]

        return self.children.listener(argv, prefix, "haproxy")

    def start_proxy(self, path: str, upstream: int, *args: str, prefix: list[str]) -> Relay:
        launched = self.children.proxy(upstream, *args, prefix=prefix, env=PROXY_PATHS[path])
        # The proxy is a parent and its workers; the worker says how it counts.
        found = _COUNTING.search(launched.wait_log("serving"))
        counting = (found.group(1) or found.group(2)) if found else "not said"
        watch = Watch(launched.report)
        workers = children_of(launched.pid)
        # One worker: it is the relay whose CPU counts. Several: the parent, whose
        # children the workers comparison measures.
        pid = workers[0] if len(workers) == 1 else launched.pid
        return Relay(path, launched.port, {"relay": pid}, watch, counting, launched)

    def stop_relay(self, relay: Relay) -> None:
        if isinstance(relay.process, Launched):
            self.children.stop_proxy(relay.process)
        elif relay.process is not None:
            self.children.stop(relay.process)

    def record(self, label: str, res: dict[str, Any]) -> None:
        if not res["ok"]:
            msg = f"{label}: loadgen exit {res['rc']}: {res['stderr'][-500:]}"
            self.failures.append(msg)
            print(f"    FAIL {msg}", flush=True)
        if "check" in res:
            print(f"    stats {res['check']}", flush=True)
            if not res["check_ok"]:
                self.failures.append(f"{label}: stats {res['check']}")


# -- one run ------------------------------------------------------------------------


def run_load(bench: Bench, relay: Relay, scenario: str, prefix: list[str]) -> dict[str, Any]:
    """One timed loadgen run against ``relay``; the loadgen's figures and the check."""
    mode, conns, window = LOADS[scenario]
    dur, watch, warmup = bench.opts.duration, relay.watch, bench.warmup
    argv = [*prefix, bench.tools.loadgen, "-addr", f"127.0.0.1:{relay.port}", "-mode", mode]
    argv += ["-c", str(conns), "-w", str(window), "-d", str(dur), "-warmup", str(warmup)]
    for name, pid in relay.cpu.items():
        argv += ["-cpu", f"{name}={pid}"]
    before = _settled_or_none(watch)
    quiet_from = watch.quiet_since() if watch else 0.0
    t0 = time.monotonic()
    core0 = cpu_ticks(bench.pins.relay_cpu)
    proc = bench.children.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pair_a = None
    if watch and dur >= 10:
        # A report 10 s before one taken just after the end: the REQs
        # between them are what request_rate_10s must show.
        time.sleep(max(0.0, t0 + warmup + dur - 9.8 - time.monotonic()))
        pair_a = (time.monotonic(), watch.report())
    try:
        out, err = proc.communicate(timeout=warmup + dur + 30 + conns / 200)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += "\nbench: loadgen timed out"
    core1 = cpu_ticks(bench.pins.relay_cpu)
    bench.children.stop(proc)
    res = parse_result(out)
    res.update(rc=proc.returncode, stderr=err.strip())
    res["ok"] = proc.returncode == 0 and bool(res.get("msgs"))
    if core0 and core1 and core1[1] > core0[1]:
        res["relay_core_busy"] = (core1[0] - core0[0]) / (core1[1] - core0[1])
    if watch is not None:
        res["check_ok"], res["check"] = _check_load(
            bench, watch, before, quiet_from, pair_a, conns * window, int(res.get("replies") or 0)
        )
    return res


def _check_load(
    bench: Bench,
    watch: Watch,
    before: dict[str, Any] | None,
    quiet_from: float,
    pair_a: tuple[float, dict[str, Any]] | None,
    in_flight_max: int,
    lg_replies: int,
) -> tuple[bool, str]:
    """The statistics check after a load run (see checks.check_stats)."""
    if before is None:
        return False, "FAIL: no statistics report before the run"
    try:
        pair = None
        if pair_a is not None:
            time.sleep(max(0.0, pair_a[0] + 10.0 - time.monotonic()))
            pair = (pair_a[1], watch.report())
        after = watch.settled()
        extra = watch.wait_for_exact_window(quiet_from, bench.rate_wait)
        return check_stats(
            watch,
            before,
            after,
            in_flight_max,
            lg_replies,
            pair=pair,
            extra=(extra,) if extra else (),
        )
    except (queue.Empty, KeyError, OSError) as exc:
        return False, f"FAIL: no statistics report ({exc!r})"


def idle_run(bench: Bench, relay: Relay, count: int, ping: int) -> dict[str, Any]:
    """Hold ``count`` idle connections through ``relay`` (a fresh process); its RSS growth."""
    pid, watch = relay.cpu["relay"], relay.watch
    before = _settled_or_none(watch)
    time.sleep(0.2)
    rss0 = rss_kib(pid)
    argv = [*bench.pins.load, bench.tools.loadgen, "-addr", f"127.0.0.1:{relay.port}", "-c", "0"]
    argv += ["-idle", str(count), "-idleping", str(ping), "-d", str(IDLE_HOLD)]
    proc = bench.children.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    ready_at = _wait_ready(proc, err_lines, timeout=30 + count / 500)
    samples = []
    if ready_at is not None:
        # Sample while they are held; the last sample is the settled figure.
        while time.monotonic() < ready_at + IDLE_HOLD - 0.25 and proc.poll() is None:
            time.sleep(0.25)
            samples.append(rss_kib(pid))
    try:
        out, _ = proc.communicate(timeout=IDLE_HOLD + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    bench.children.stop(proc)
    rss1 = samples[-1] if samples else rss0
    res: dict[str, Any] = {
        "rss0": rss0,
        "rss1": rss1,
        "peak": max(samples, default=rss0),
        "per_conn": (rss1 - rss0) / count,
        "held": count,
        "rc": proc.returncode,
        "stderr": "".join(err_lines).strip(),
        "ok": proc.returncode == 0 and ready_at is not None and bool(samples),
    }
    res.update({k: v for k, v in parse_result(out).items() if k not in res})
    if watch is not None:
        try:
            after = watch.settled()
            if before is None:
                raise KeyError("no report before the run")
            res["check_ok"], res["check"] = check_stats(
                watch, before, after, 0, None, exact_req=count * ping
            )
        except (queue.Empty, KeyError, OSError) as exc:
            res["check_ok"], res["check"] = False, f"FAIL: no statistics report ({exc!r})"
    return res


def _wait_ready(proc: subprocess.Popen[str], err_lines: list[str], timeout: float) -> float | None:
    """When loadgen said READY (all idle connections open), or None; stderr kept in err_lines."""
    lines: queue.Queue[str] = queue.Queue()

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            lines.put(line)
        lines.put("")

    threading.Thread(target=read_err, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if "READY" in line:
            return time.monotonic()
        if not line:
            return None
    return None


def parse_result(stdout: str) -> dict[str, Any]:
    """The loadgen's RESULT line as a dict of numbers (None for "na")."""
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


def _settled_or_none(watch: Watch | None) -> dict[str, Any] | None:
    if watch is None:
        return None
    try:
        return watch.settled()
    except (queue.Empty, KeyError, OSError):
        return None


# -- scenarios --------------------------------------------------------------------


def throughput(bench: Bench, scenario: str, relays: list[Relay]) -> dict[str, list[dict]]:
    """``--runs`` paired rounds: every relay once per round, in an order that rotates."""
    results: dict[str, list[dict]] = {r.name: [] for r in relays}
    runs = bench.opts.runs
    for rnd in range(runs):
        shift = rnd % len(relays)
        for relay in relays[shift:] + relays[:shift]:
            res = run_load(bench, relay, scenario, bench.pins.load)
            res["round"] = rnd
            results[relay.name].append(res)
            label = f"{scenario} round {rnd + 1}/{runs} {relay.name}"
            print(f"  {label:<34} {brief(res)}", flush=True)
            bench.record(label, res)
    return results


def idle(bench: Bench, scenario: str, stub_port: int) -> tuple[dict[str, list[dict]], str]:
    """RSS per idle connection, each measurement in a fresh relay process."""
    count = IDLE[scenario]
    prefix, hard = fd_prefix(2 * count + FD_RESERVE)
    note = ""
    if prefix is None:  # hold as many as one relay process can: two descriptors each
        prefix, count = [], (hard - FD_RESERVE) // 2
        note = (
            f"{count:,} connections held, not {IDLE[scenario]:,}: a relay needs two descriptors"
            f" per connection, the hard limit here is {hard:,} and it cannot be raised"
        )
        print(f"  {note}", flush=True)
    paths = [*bench.opts.relays] + (["haproxy"] if bench.haproxy else [])
    results: dict[str, list[dict]] = {}
    runs = bench.opts.idle_runs
    for rnd in range(runs):
        for ping in (0, 1):
            for path in paths:
                key = f"{path} idleping={ping}"
                if path == "haproxy":
                    proc, port = bench.start_haproxy(stub_port, prefix, maxconn=count + 20)
                    relay = Relay("haproxy", port, {"relay": proc.pid}, process=proc)
                else:
                    relay = bench.start_proxy(
                        path, stub_port, f"-max-connections={2 * count}", prefix=prefix
                    )
                try:
                    res = idle_run(bench, relay, count, ping)
                finally:
                    bench.stop_relay(relay)
                results.setdefault(key, []).append(res)
                label = f"{scenario} round {rnd + 1}/{runs} {key}"
                print(
                    f"  {label:<44} RSS {res['rss0']} -> {res['rss1']} KiB "
                    f"(peak {res['peak']}): {res['per_conn']:.2f} KiB/conn",
                    flush=True,
                )
                bench.record(label, res)
    return results, note


def workers_compare(bench: Bench) -> dict[str, dict[str, list[dict]]]:
    """Pipelined runs against -workers=1 and -workers=2, unpinned, accelerated."""
    stub, stub_port = bench.start_stub([])
    out: dict[str, dict[str, list[dict]]] = {}
    relays = []
    for n in (1, 2):
        relay = bench.start_proxy("accelerated", stub_port, f"-workers={n}", prefix=[])
        relay.name = f"workers={n}"
        relays.append(relay)
    time.sleep(0.5)
    for scenario in ("pipe50", "pipe200"):
        results: dict[str, list[dict]] = {r.name: [] for r in relays}
        for rnd in range(bench.opts.runs):
            for relay in relays:
                pid = relay.cpu["relay"]
                kids = children_of(pid)
                cpu = {f"w{i}": k for i, k in enumerate(kids)} if kids else {"w0": pid}
                cpu["stub"] = stub.pid
                run = dataclasses.replace(relay, cpu=cpu)
                res = run_load(bench, run, scenario, [])
                results[relay.name].append(res)
                label = f"{scenario} round {rnd + 1}/{bench.opts.runs} {relay.name}"
                print(f"  {label:<34} {brief(res)}", flush=True)
                bench.record(label, res)
        out[scenario] = results
    for relay in relays:
        bench.stop_relay(relay)
    bench.children.stop(stub)
    return out
