"""What each benchmark figure should reach, and whether a run reached it.

CPU per message is compared with HAProxy's in the same round (paired
rounds: the ratio of each round, then the median of those ratios), since
the machine's noise moves both. The relay paths: ``accelerated`` (the
compiled accelerator) and ``pure`` (GEVENTPROXY_PURE=1).
"""

from __future__ import annotations

import dataclasses

__all__ = ["Target", "TARGETS", "verdict"]


@dataclasses.dataclass(frozen=True)
class Target:
    scenario: str
    figure: str  # "cpu_ratio", "latency_ratio" or "kib_per_conn"
    path: str  # "accelerated" or "pure"
    limit: float
    text: str  # the row's description

    def describe(self) -> str:
        unit = " KiB" if self.figure == "kib_per_conn" else "x"
        return f"<= {self.limit:g}{unit}"


def _cpu(scenario: str, accelerated: float, pure: float, text: str) -> list[Target]:
    return [
        Target(scenario, "cpu_ratio", "accelerated", accelerated, text),
        Target(scenario, "cpu_ratio", "pure", pure, text),
    ]


_CPU_TEXT = "relay CPU per message / HAProxy's"
TARGETS: list[Target] = [
    Target("serial1", "latency_ratio", "accelerated", 1.5, "added p50 latency / HAProxy's"),
    Target("serial1", "latency_ratio", "pure", 1.5, "added p50 latency / HAProxy's"),
    *_cpu("serial50", 1.2, 1.55, _CPU_TEXT),
    *_cpu("pipe50", 1.6, 2.9, _CPU_TEXT),
    # Cost must not grow with the number of connections: the serial50 targets hold.
    *_cpu("serial1000", 1.2, 1.55, _CPU_TEXT + " (as serial50: flat)"),
    *_cpu("serial5000", 1.2, 1.55, _CPU_TEXT + " (as serial50: flat)"),
    *[
        Target(s, "kib_per_conn", p, 12.0, "RSS per idle connection")
        for s in ("idle1000", "idle10000")
        for p in ("accelerated", "pure")
    ],
]


def verdict(value: float | None, target: Target) -> str:
    if value is None:
        return "no figure"
    return "met" if value <= target.limit else "NOT MET"
