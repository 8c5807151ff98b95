"""The statistics report as Prometheus text exposition format 0.0.4.

Pure: a report from ``stats.snapshot`` and a histogram from
``stats.latency_histogram`` in, text out. Every name starts with
``geventproxy_``; counters end in ``_total``; units are in the names. Labels
come from fixed sets only (``direction``, ``type``, ``reason``, and the
``version`` of ``geventproxy_build_info``), so the number of series never
depends on traffic.

The report's moving-window rates and recent-latency percentiles are left
out on purpose: a scrape every 15 s would sample a 1 s window at random,
and Prometheus computes both from the counters and the histogram, e.g.
``rate(geventproxy_messages_total{type="req"}[1m])`` and
``histogram_quantile(0.99, rate(geventproxy_upstream_response_seconds_bucket[5m]))``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import __version__
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

    def family(self, name: str, kind: str, text: str) -> None:
        self.lines.append(f"# HELP {PREFIX}{name} {_escape_help(text)}")
        self.lines.append(f"# TYPE {PREFIX}{name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        if labels:
            body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{PREFIX}{name}{{{body}}} {_number(value)}")
        else:
            self.lines.append(f"{PREFIX}{name} {_number(value)}")

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


def render_prometheus(report: Mapping[str, Any], histogram: tuple[list[int], int]) -> str:
    """``report`` (from ``stats.snapshot``) and ``histogram`` as one exposition text."""
    out = _Writer()
    out.family("build_info", "gauge", "Always 1; the version is in the label.")
    out.sample("build_info", 1, {"version": __version__})
    out.family("uptime_seconds", "gauge", "Seconds since the proxy started.")
    out.sample("uptime_seconds", float(report["uptime_s"]))

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

    out.family("connections_active", "gauge", "Client connections open now.")
    out.sample("connections_active", report["connections_active"])
    for name, field, text in _COUNTERS:
        out.family(name, "counter", text)
        out.sample(name, report[field])
    out.family("connections_closed_total", "counter", "Client connections closed, by the reason.")
    closed = report["connections_closed"]
    for reason in CLOSE_REASONS:
        out.sample("connections_closed_total", closed[reason], {"reason": reason})

    counts, sum_us = histogram
    _histogram(out, "upstream_response_seconds", counts, sum_us)
    return out.text()
