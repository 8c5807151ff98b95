"""The statistics report as Prometheus text exposition format 0.0.4.

Pure: a report from ``stats.snapshot`` and a histogram from
``stats.latency_histogram`` in, text out. Every name starts with
``geventproxy_``, except the ``process_*`` family every exporter shares;
counters end in ``_total``; units are in the names. Labels come from fixed
sets only (``direction``, ``type``, ``reason``, the ``version`` of
``geventproxy_build_info``, and ``worker``, one value per worker process and
``parent``), so the number of series never depends on traffic.

With ``-workers`` the ``geventproxy_*`` totals are the exact sums over the
workers, unlabelled as with one process; what differs per process (its
``process_*`` figures, its connections, its share of the requests) is
labelled ``worker``, under names of its own so that a ``sum()`` never counts
a request twice.

The report's moving-window rates and recent-latency percentiles are left
out on purpose: a scrape every 15 s would sample a 1 s window at random,
and Prometheus computes both from the counters and the histogram, e.g.
``rate(geventproxy_messages_total{type="req"}[1m])`` and
``histogram_quantile(0.99, rate(geventproxy_upstream_response_seconds_bucket[5m]))``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import __version__
from .process import Figures
from .stats import CLOSE_REASONS, DIRECTIONS, LATENCY_BOUNDS_US, MSG_KINDS

__all__ = ["CONTENT_TYPE", "render_prometheus"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "geventproxy_"

# Unlabelled counters: metric name (without the prefix), report field, help.
_COUNTERS = (
    (
        "connections_total",
        "connections_total",
        "Client connections accepted and handled (refused ones not included).",
    ),
    (
        "connections_refused_total",
        "connections_refused",
        "Client connections closed at once because --max-connections was reached.",
    ),
    (
        "upstream_connect_failures_total",
        "upstream_connect_failures",
        "Upstream connects refused, unreachable, or whose name did not resolve.",
    ),
    (
        "upstream_connect_timeouts_total",
        "upstream_connect_timeouts",
        "Upstream connects that got no answer within --connect-timeout.",
    ),
    (
        "accept_errors_total",
        "accept_errors",
        "accept() failures for lack of a resource, such as file descriptors.",
    ),
    (
        "latency_unmatched_responses_total",
        "latency_unmatched",
        "ACK/NAK responses that arrived with no REQ waiting for them (not timed).",
    ),
    (
        "latency_dropped_requests_total",
        "latency_dropped",
        "REQs left untimed because their connection had too many unanswered ones.",
    ),
)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _seconds(us: int) -> str:
    """A bucket bound in seconds, exact and without exponent notation: 0.00001, 2.5, 10."""
    whole, frac = divmod(us, 1_000_000)
    return f"{whole}.{frac:06d}".rstrip("0").rstrip(".")


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str, prefix: str = PREFIX) -> None:
        self.lines.append(f"# HELP {prefix}{name} {_escape_help(text)}")
        self.lines.append(f"# TYPE {prefix}{name} {kind}")

    def sample(
        self,
        name: str,
        value: float,
        labels: Mapping[str, str] | None = None,
        prefix: str = PREFIX,
    ) -> None:
        if labels:
            body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{prefix}{name}{{{body}}} {_number(value)}")
        else:
            self.lines.append(f"{prefix}{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _histogram(out: _Writer, name: str, counts: Iterable[int], sum_us: int) -> None:
    out.family(
        name,
        "histogram",
        "Time from forwarding a REQ to forwarding its ACK/NAK, as the proxy sees it.",
    )
    cumulative = 0
    bounds = [_seconds(b) for b in LATENCY_BOUNDS_US] + ["+Inf"]
    counts = list(counts)
    if len(counts) != len(bounds):
        raise ValueError(f"{len(counts)} histogram buckets for {len(bounds)} bounds")
    for le, n in zip(bounds, counts):
        cumulative += n
        out.sample(f"{name}_bucket", cumulative, {"le": le})
    out.sample(f"{name}_sum", sum_us / 1e6)
    out.sample(f"{name}_count", cumulative)


# process_* families: name, type, help, the Figures field.
_PROCESS = (
    ("open_fds", "gauge", "Open file descriptors.", "open_fds"),
    ("max_fds", "gauge", "The limit on open file descriptors (soft RLIMIT_NOFILE).", "max_fds"),
    ("resident_memory_bytes", "gauge", "Resident memory size.", "resident_memory_bytes"),
    ("virtual_memory_bytes", "gauge", "Virtual memory size.", "virtual_memory_bytes"),
    ("cpu_seconds_total", "counter", "User and system CPU time spent.", "cpu_seconds_total"),
    (
        "start_time_seconds",
        "gauge",
        "When the process started, in seconds since the Unix epoch.",
        "start_time_seconds",
    ),
)

# Per-worker families: name, type, help, the stats.worker_figures field.
_WORKER = (
    (
        "worker_connections_active",
        "gauge",
        "Client connections open now in this worker.",
        "connections_active",
    ),
    (
        "worker_connections_total",
        "counter",
        "Client connections this worker's slot accepted and handled.",
        "connections_total",
    ),
    (
        "worker_requests_total",
        "counter",
        "REQ messages this worker's slot forwarded to the upstream.",
        "requests",
    ),
)


def _processes(out: _Writer, processes: Sequence[tuple[str | None, Figures]]) -> None:
    for name, kind, text, field in _PROCESS:
        out.family(name, kind, text, prefix="process_")
        for worker, figures in processes:
            labels = None if worker is None else {"worker": worker}
            out.sample(name, getattr(figures, field), labels, prefix="process_")


def _traffic(out: _Writer, report: Mapping[str, Any]) -> None:
    out.family(
        "messages_total",
        "counter",
        "Foo messages forwarded, by direction and type; "
        "type=invalid counts lines that are not well-formed (forwarded all the same).",
    )
    for direction in DIRECTIONS:
        for kind in MSG_KINDS:
            out.sample(
                "messages_total",
                report[f"msg_{kind}_{direction}"],
                {"direction": direction, "type": kind},
            )
    out.family("bytes_total", "counter", "Bytes forwarded, by direction.")
    for direction in DIRECTIONS:
        out.sample("bytes_total", report[f"bytes_{direction}"], {"direction": direction})


def _connections(out: _Writer, report: Mapping[str, Any]) -> None:
    """connections_active, the plain counters, and the closed connections by reason."""
    out.family("connections_active", "gauge", "Client connections open now.")
    out.sample("connections_active", report["connections_active"])
    for name, field, text in _COUNTERS:
        out.family(name, "counter", text)
        out.sample(name, report[field])
    out.family("connections_closed_total", "counter", "Client connections closed, by the reason.")
    closed = report["connections_closed"]
    for reason in CLOSE_REASONS:
        out.sample("connections_closed_total", closed[reason], {"reason": reason})


def render_prometheus(
    report: Mapping[str, Any],
    histogram: tuple[list[int], int],
    *,
    upstream_up: bool | None = None,
    processes: Sequence[tuple[str | None, Figures]] = (),
    workers: Sequence[tuple[str, Mapping[str, int]]] = (),
) -> str:
    """``report`` (from ``stats.snapshot``) and ``histogram`` as one exposition text.

    ``upstream_up`` is the health check's verdict (left out when there is no
    check); ``processes`` the ``process_*`` figures, unlabelled for a single
    process or by ``worker``; ``workers`` each worker's ``stats.worker_figures``.
    """
    out = _Writer()
    if processes:
        _processes(out, processes)
    out.family("build_info", "gauge", "Always 1; the version is in the label.")
    out.sample("build_info", 1, {"version": __version__})
    out.family("uptime_seconds", "gauge", "Seconds since the proxy started.")
    out.sample("uptime_seconds", float(report["uptime_s"]))
    _traffic(out, report)
    _connections(out, report)
    counts, sum_us = histogram
    _histogram(out, "upstream_response_seconds", counts, sum_us)

    if upstream_up is not None:
        out.family(
            "upstream_up",
            "gauge",
            "1 if the last health check connected to the upstream (and is recent), else 0.",
        )
        out.sample("upstream_up", int(upstream_up))
    for name, kind, text, field in _WORKER if workers else ():
        out.family(name, kind, text)
        for worker, figures in workers:
            out.sample(name, figures[field], {"worker": worker})
    return out.text()
