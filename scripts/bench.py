"""Benchmark: geventproxy (compiled accelerator and pure Python) next to HAProxy, on loopback.

Builds the C instruments in scripts/bench/ (a load generator and a fast Foo
stub server), then measures, on 127.0.0.1:

    direct       loadgen -> stub                       (serial1 only: the latency baseline)
    accelerated  loadgen -> python -m geventproxy -> stub  (the compiled accelerator)
    pure         the same with GEVENTPROXY_PURE=1
    haproxy      loadgen -> haproxy (mode tcp, one thread) -> stub

Scenarios (--scenarios, comma separated; all by default):

    chunks      the per-chunk accounting alone, in this process, both implementations
    serial1     1 connection, one request in flight
    serial50    50 connections, one request in flight each
    pipe50      50 connections, 100 requests in flight each
    serial1000  1,000 connections, serial (CPU per message must stay flat)
    serial5000  5,000 connections, serial
    idle1000    1,000 idle connections: resident memory per connection, in a
                fresh process, with and without one request first
    idle10000   the same with 10,000

Rounds are paired: in every round each relay runs once (the order rotates),
and a relay's CPU per message is divided by HAProxy's from the same round;
the tables show the median of those ratios and their range. The stub and
the load generator share the first CPU, the relay under test has the second.

After every proxy run the proxy's SIGUSR1 statistics are checked (counters
exact, request_rate_10s equal to the REQs counted over the window); the
script exits 1 if a check or a run fails. The targets table says, row by
row, the target and whether this run met it.

Usage:
    python scripts/bench.py [--quick] [--runs N] [--duration S] [--scenarios LIST]
                            [--relays accelerated,pure] [--idle-runs N] [--no-haproxy]
                            [--workers-compare]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import runs, tables  # noqa: E402
from benchlib.chunks import measure_chunks  # noqa: E402
from benchlib.processes import Children, build_tools, pinning  # noqa: E402
from benchlib.runs import Bench, Relay  # noqa: E402
from benchlib.scenarios import IDLE, LOADS, SCENARIOS, TITLES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one round of 2 s: a single run, no medians"
    )
    parser.add_argument("--runs", type=int, help="paired rounds per scenario (default 5)")
    parser.add_argument("--idle-runs", type=int, help="rounds of the idle scenarios (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 3)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}, or none",
    )
    parser.add_argument("--no-haproxy", action="store_true", help="skip HAProxy")
    parser.add_argument(
        "--relays",
        default="accelerated,pure",
        help="which proxy paths to measure: accelerated, pure or both (default both)",
    )
    parser.add_argument(
        "--workers-compare", action="store_true", help="also compare -workers=1 and -workers=2"
    )
    opts = parser.parse_args(argv)
    if opts.runs is None:
        opts.runs = 1 if opts.quick else 5
    if opts.idle_runs is None:
        opts.idle_runs = 1 if opts.quick else min(opts.runs, 3)
    if opts.duration is None:
        opts.duration = 2.0 if opts.quick else 3.0
    if opts.runs < 1 or opts.idle_runs < 1 or opts.duration <= 0:
        parser.error("--runs and --idle-runs must be >= 1 and --duration > 0")
    opts.scenarios = [s.strip() for s in opts.scenarios.split(",") if s.strip() not in ("", "none")]
    opts.relays = [r.strip() for r in opts.relays.split(",") if r.strip()]
    if not opts.relays or not set(opts.relays) <= {"accelerated", "pure"}:
        parser.error("--relays is a comma-separated subset of accelerated,pure")
    unknown = [s for s in opts.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {','.join(unknown)}; choose from {','.join(SCENARIOS)}")
    return opts


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
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("geventproxy benchmark")
    print(f"  date      {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"  machine   {platform.machine()}, {os.cpu_count()} CPUs (nproc), {model}")
    print(f"  load avg  {load} (other work on the machine moves every figure)")
    print(f"  python    {platform.python_version()}, gevent {gevent_version}")
    if bench.haproxy:
        print(f"  haproxy   {_version([bench.haproxy, '-v'])}")
    elif opts.no_haproxy:
        print("  haproxy   skipped (--no-haproxy)")
    else:
        print("  haproxy   not installed (apt-get install -y haproxy): skipped")
    print(f"  tools     {bench.tools.directory} (built from scripts/bench/)")
    print(f"  pinning   {bench.pins.note}")
    if opts.runs == 1:
        print(f"  runs      a single run of {opts.duration:g} s per relay: no median, no spread")
    else:
        print(
            f"  runs      {opts.runs} paired rounds of {opts.duration:g} s (+{bench.warmup:g} s"
            f" warm-up) per relay; idle scenarios {opts.idle_runs} round(s)"
        )
    print("  units     msgs = REQs + replies; 'relay cpu' in cores; 's/M' = CPU s per 1e6 msgs;")
    print("            latency = loadgen's write-to-reply time (pipelined: includes queueing)")


def measure(bench: Bench) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Every scenario asked for; the results and the tables to print, in order."""
    opts = bench.opts
    loads: dict[str, Any] = {}
    idles: dict[str, Any] = {}
    printers: list[Any] = []
    if "chunks" in opts.scenarios:
        print(f"\n-- chunks: {TITLES['chunks']}", flush=True)
        printers.append((tables.report_chunks, measure_chunks(opts.relays)))
    stub, stub_port = bench.start_stub(bench.pins.load)
    scenarios = [s for s in opts.scenarios if s in LOADS]
    if scenarios:
        relays = [bench.start_proxy(p, stub_port, prefix=bench.pins.relay) for p in opts.relays]
        for relay in relays:
            print(f"  {relay.name}: the proxy says it counts with: {relay.counting}")
        if bench.haproxy:
            hap, port = bench.start_haproxy(stub_port, bench.pins.relay)
            relays.append(Relay("haproxy", port, {"relay": hap.pid}, process=hap))
        for relay in relays:
            relay.cpu["stub"] = stub.pid
        for scenario in scenarios:
            print(f"\n-- {scenario}: {TITLES[scenario]}", flush=True)
            chosen = relays
            if scenario == "serial1":  # the direct baseline is needed for added latency only
                chosen = [Relay("direct", stub_port, {"stub": stub.pid}), *relays]
            loads[scenario] = runs.throughput(bench, scenario, chosen)
            printers.append((tables.report_throughput, scenario, loads[scenario], opts.runs))
        for relay in relays:
            bench.stop_relay(relay)
    for scenario in (s for s in opts.scenarios if s in IDLE):
        print(f"\n-- {scenario}: {TITLES[scenario]}", flush=True)
        idles[scenario], note = runs.idle(bench, scenario, stub_port)
        printers.append((tables.report_idle, scenario, idles[scenario], opts.idle_runs, note))
    bench.children.stop(stub)
    if opts.workers_compare:
        print("\n-- workers: -workers=1 vs -workers=2, unpinned", flush=True)
        printers.append((tables.report_workers, runs.workers_compare(bench), opts.runs))
    return loads, idles, printers


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # TERM ends the run like Ctrl-C does: through the with blocks, which stop every child.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    started = time.monotonic()
    tools = build_tools()
    haproxy = None if opts.no_haproxy else shutil.which("haproxy")
    with (
        tempfile.TemporaryDirectory(prefix="geventproxy-bench-") as tmp,
        open(Path(tmp) / "children.log", "ab") as log,
        Children(log) as children,
    ):
        bench = Bench(opts, tools, pinning(), children, Path(tmp), haproxy)
        print_header(bench)
        loads, idles, printers = measure(bench)
    print("\n" + "=" * 30 + " results " + "=" * 30)
    for printer, *args in printers:
        printer(*args)
    missed = tables.summary(loads, idles, opts.runs) if loads or idles else 0
    print(f"\nload avg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total time {time.monotonic() - started:.0f} s; {missed} target row(s) not met")
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
