"""Medians, paired ratios and the printed tables of a benchmark run."""

from __future__ import annotations

import statistics
from typing import Any, Callable

from .scenarios import TITLES
from .targets import TARGETS, Target, verdict

__all__ = [
    "BUSY_FLAG",
    "brief",
    "paired",
    "print_table",
    "report_chunks",
    "report_idle",
    "report_throughput",
    "report_workers",
    "rounds_text",
    "spread",
    "summary",
]

#: lg_cpus_busy above this: the load generator / stub side was saturated.
BUSY_FLAG = 0.95
Results = dict[str, list[dict[str, Any]]]


def rounds_text(runs: int) -> str:
    """How a figure was reduced, said plainly."""
    return f"median of {runs} rounds" if runs > 1 else "a single run: no median, no spread"


def _med(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _f(x: float | None, prec: int = 1) -> str:
    return "-" if x is None else f"{x:,.{prec}f}"


def paired(
    results: Results, name: str, ref: str, figure: Callable[[dict, dict], float | None]
) -> list[float]:
    """``figure(run, ref_run)`` for every round in which both ran (None results left out)."""
    by_round = {r.get("round"): r for r in results.get(ref, [])}
    out = []
    for run in results.get(name, []):
        other = by_round.get(run.get("round"))
        if other is not None:
            value = figure(run, other)
            if value is not None:
                out.append(value)
    return out


def spread(values: list[float], unit: str = "x", prec: int = 2) -> str:
    """Median, with the range and count when there is more than one value."""
    if not values:
        return "-"
    text = f"{statistics.median(values):.{prec}f}{unit}"
    if len(values) > 1:
        text += f" ({min(values):.{prec}f}-{max(values):.{prec}f}, n={len(values)})"
    return text


def _cpu_ratio(run: dict, ref: dict) -> float | None:
    a, b = run.get("relay_cpu_per_M"), ref.get("relay_cpu_per_M")
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def brief(res: dict[str, Any]) -> str:
    """One run on one line, for the progress output."""
    if not res.get("msgs"):
        return "no result"
    cpu = res.get("relay_cpu")
    busy = res.get("lg_cpus_busy")
    flag = "!" if isinstance(busy, float) and busy > BUSY_FLAG else ""
    return (
        f"{_n(res['rate'])} msgs/s  p50 {_f(res['p50_us'])} us  "
        f"{'relay cpu ' + _f(cpu, 2) + '  ' if cpu is not None else ''}"
        f"lg cpu {_f(res.get('self_cpu'), 2)}  lg_cpus_busy {_f(busy, 2)}{flag}"
    )


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


def _load_cells(rs: list[dict]) -> list[str]:
    """msgs/s, req/s, p50 and p99 latency: the medians the load generator measured."""
    return [
        _n(_med(rs, "rate")),
        _n(_med(rs, "req_rate")),
        _f(_med(rs, "p50_us")),
        _f(_med(rs, "p99_us")),
    ]


def _stats_cell(rs: list[dict]) -> str:
    checks = [r["check_ok"] for r in rs if "check_ok" in r]
    return ("PASS" if all(checks) else "FAIL") if checks else ""


def report_throughput(scenario: str, results: Results, runs: int) -> None:
    print(f"\n== {scenario}: {TITLES[scenario]} ({rounds_text(runs)})")
    headers = ["relay", "msgs/s", "req/s", "p50 us", "p99 us", "relay cpu", "relay core busy"]
    headers += ["relay cpu s/M", "stub cpu s/M", "lg cpu", "lg_cpus_busy", "stats"]
    rows, flagged = [], False
    for name, rs in results.items():
        busy = _med(rs, "lg_cpus_busy")
        flag = ""
        if busy is not None and busy > BUSY_FLAG:
            flag, flagged = " !", True
        rows.append(
            [
                name,
                *_load_cells(rs),
                _f(_med(rs, "relay_cpu"), 2),
                _f(_med(rs, "relay_core_busy"), 2),
                _f(_med(rs, "relay_cpu_per_M"), 3),
                _f(_med(rs, "stub_cpu_per_M"), 3),
                _f(_med(rs, "self_cpu"), 2),
                _f(busy, 2) + flag,
                _stats_cell(rs),
            ]
        )
    print_table(headers, rows)
    if flagged:
        print(
            f"  ! lg_cpus_busy > {BUSY_FLAG}: the load generator's CPU(s) were saturated, so"
            " that row is bounded by the load side, not by the relay (for direct that is"
            " expected: stub and loadgen share that CPU)"
        )
    if "haproxy" in results:
        for name in ("accelerated", "pure"):
            ratios = paired(results, name, "haproxy", _cpu_ratio)
            if ratios:
                print(f"  {name}/haproxy CPU per message, paired by round: {spread(ratios)}")


def report_idle(scenario: str, results: Results, runs: int, note: str = "") -> None:
    print(f"\n== {scenario}: {TITLES[scenario]} ({rounds_text(runs)}, a fresh process each)")
    if note:
        print(f"  {note}")
    headers = ["relay", "RSS before KiB", "RSS held KiB", "peak KiB", "KiB/conn", "stats"]
    rows = [
        [
            name,
            _n(_med(rs, "rss0")),
            _n(_med(rs, "rss1")),
            _n(_med(rs, "peak")),
            spread([r["per_conn"] for r in rs], unit="", prec=2),
            _stats_cell(rs),
        ]
        for name, rs in results.items()
    ]
    print_table(headers, rows)
    print("  idleping=1: each connection sent one REQ and got its reply before being held")


def report_chunks(results: dict[str, dict[str, tuple[float, float]]]) -> None:
    print(f"\n== chunks: {TITLES['chunks']} (best of 7 repeats, CPU time)")
    labels = list(next(iter(results.values())))
    headers = ["implementation", *[f"{label}: ns" for label in labels], "ns/message"]
    rows = [
        [name, *[_n(row[label][0]) for label in labels], "  ".join(_n(row[x][1]) for x in labels)]
        for name, row in results.items()
    ]
    print_table(headers, rows)
    if {"accelerated", "pure"} <= set(results):
        ratios = [results["pure"][x][0] / results["accelerated"][x][0] for x in labels]
        print("  pure/accelerated: " + ", ".join(f"{r:.1f}x" for r in ratios))


def report_workers(out: dict[str, Results], runs: int) -> None:
    for scenario, results in out.items():
        print(f"\n== workers {scenario}: {TITLES[scenario]}, unpinned ({rounds_text(runs)})")
        headers = ["relay", "msgs/s", "req/s", "p50 us", "p99 us", "workers cpu"]
        headers += ["workers cpu s/M", "lg cpu", "lg_cpus_busy", "stats"]
        rows = []
        for name, rs in results.items():
            splits = [
                "+".join(
                    _f(v, 2) for k, v in sorted(r.items()) if k[:1] == "w" and k.endswith("_cpu")
                )
                for r in rs
            ]
            sums = [
                sum(v for k, v in r.items() if k[:1] == "w" and k.endswith("_cpu_per_M"))
                for r in rs
            ]
            busy = _med(rs, "lg_cpus_busy")
            rows.append(
                [
                    name,
                    *_load_cells(rs),
                    splits[len(splits) // 2] if splits else "-",
                    _f(statistics.median(sums) if sums else None, 3),
                    _f(_med(rs, "self_cpu"), 2),
                    _f(busy, 2) + (" !" if busy is not None and busy > BUSY_FLAG else ""),
                    _stats_cell(rs),
                ]
            )
        print_table(headers, rows)
        one, two = (
            _med(results.get("workers=1", []), "rate"),
            _med(results.get("workers=2", []), "rate"),
        )
        if one and two:
            print(f"  workers=2/workers=1 throughput {two / one:.2f}x (the parent's summed stats)")
    print(
        "  loadgen, stub and the workers share all CPUs here, so lg_cpus_busy near 1 is"
        " expected: the machine, not one process, is the limit"
    )


# -- the targets --------------------------------------------------------------------


Row = tuple[list[float], str, str]  # values, HAProxy's figure, label


def _added_latency(direct: dict[Any, Any]) -> Callable[[dict, dict], float | None]:
    """Added p50 latency over direct in the same round, relative to HAProxy's."""

    def figure(run: dict, ref: dict) -> float | None:
        d, a, h = direct.get(run.get("round")), run.get("p50_us"), ref.get("p50_us")
        if d is None or a is None or h is None or h - d <= 0:
            return None
        return (a - d) / (h - d)

    return figure


def _figures(target: Target, loads: dict[str, Results], idles: dict[str, Results]) -> list[Row]:
    """The rows one target judges, from this run's results."""
    path = target.path
    if target.figure == "cpu_ratio":
        results = loads.get(target.scenario, {})
        ref = _med(results.get("haproxy", []), "relay_cpu_per_M")
        return [(paired(results, path, "haproxy", _cpu_ratio), f"{_f(ref, 3)} s/M", "")]
    if target.figure == "latency_ratio":
        results = loads.get(target.scenario, {})
        direct = {r.get("round"): r.get("p50_us") for r in results.get("direct", [])}
        hap = paired(results, "haproxy", "direct", lambda h, d: _diff(h, d, "p50_us"))
        ref = f"+{statistics.median(hap):.0f} us" if hap else "-"
        return [(paired(results, path, "haproxy", _added_latency(direct)), ref, "")]
    rows = []
    for ping in (0, 1):
        rs = idles.get(target.scenario, {})
        runs = rs.get(f"{path} idleping={ping}", [])
        values = [r["per_conn"] for r in runs]
        hap = _med(rs.get(f"haproxy idleping={ping}", []), "per_conn")
        label = "after 1 REQ" if ping else "never used"
        held = {r.get("held") for r in runs}
        if len(held) == 1 and None not in held:
            label += f", {held.pop():,} held"
        rows.append((values, f"{_f(hap, 2)} KiB", label))
    return rows


def _diff(a: dict, b: dict, key: str) -> float | None:
    x, y = a.get(key), b.get(key)
    return None if x is None or y is None else x - y


def summary(loads: dict[str, Results], idles: dict[str, Results], runs: int) -> int:
    """The table of targets; returns how many were not met."""
    print(f"\n== targets ({rounds_text(runs)}; ratios paired with HAProxy round by round)")
    headers = ["scenario", "figure", "relay", "value", "HAProxy", "target", "verdict"]
    rows, missed = [], 0
    for target in TARGETS:
        if target.scenario not in loads and target.scenario not in idles:
            continue
        for values, ref, label in _figures(target, loads, idles):
            unit = "" if target.figure == "kib_per_conn" else "x"
            value = statistics.median(values) if values else None
            result = verdict(value, target)
            missed += result != "met"
            text = target.text + (f", {label}" if label else "")
            rows.append(
                [
                    target.scenario,
                    text,
                    target.path,
                    spread(values, unit),
                    ref,
                    target.describe(),
                    result,
                ]
            )
    print_table(headers, rows)
    return missed
