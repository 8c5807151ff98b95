"""The scenarios by name: loads for the load generator, idle connection counts, titles."""

from __future__ import annotations

__all__ = ["IDLE", "LOADS", "SCENARIOS", "TITLES"]

#: name -> (loadgen mode, connections, requests in flight per connection)
LOADS = {
    "serial1": ("serial", 1, 1),
    "serial50": ("serial", 50, 1),
    "pipe50": ("pipe", 50, 100),
    "serial1000": ("serial", 1000, 1),
    "serial5000": ("serial", 5000, 1),
    "pipe200": ("pipe", 200, 25),  # --workers-compare only
}
#: name -> idle connections held
IDLE = {"idle1000": 1000, "idle10000": 10000}
#: What a plain run measures, in order.
SCENARIOS = (
    "chunks",
    "serial1",
    "serial50",
    "pipe50",
    "serial1000",
    "serial5000",
    "idle1000",
    "idle10000",
)
TITLES = {
    "chunks": "the per-chunk accounting alone, in-process (no sockets)",
    "serial1": "1 connection, serial (one request in flight)",
    "serial50": "50 connections, serial",
    "pipe50": "50 connections x 100 pipelined requests",
    "serial1000": "1,000 connections, serial",
    "serial5000": "5,000 connections, serial",
    "pipe200": "200 connections x 25 pipelined requests",
    "idle1000": "1,000 idle connections: resident memory",
    "idle10000": "10,000 idle connections: resident memory",
}
