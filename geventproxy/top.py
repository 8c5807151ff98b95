"""``geventproxy top ADMIN_ADDR``: the live page's figures in a terminal.

For an operator on a server over SSH, with no browser at hand. Once a second
it reads the same three routes as the page (``/history`` for the samples it
has not seen yet, ``/stats``, ``/healthz``) and redraws: the rates and
latency of the last minute as sparklines, one column a second, and the
totals. Stdlib only (curses, http.client), no gevent: it runs anywhere the
proxy's admin address can be reached.

The layout is a pure function of the data and the terminal size
(``render``); the curses loop only paints its lines and reads keys.
"""

from __future__ import annotations

import argparse
import contextlib
import curses
import http.client
import json
import locale
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError, parse_address

__all__ = ["View", "main", "render", "sparkline"]

#: Samples drawn: the last minute, one a second.
MINUTE = 60
#: Seconds an HTTP request to the proxy may take.
TIMEOUT = 2.0
BLOCKS = "▁▂▃▄▅▆▇█"
ASCII_BLOCKS = "_.-:=+*#"

# The sparkline rows: label, sample field, scale, how the current value is printed.
ROWS: tuple[tuple[str, str, float, str], ...] = (
    ("requests/s", "requests_per_s", 1, "{:,.1f}"),
    ("responses/s", "responses_per_s", 1, "{:,.1f}"),
    ("NAK share %", "nak_share", 100, "{:.1f}"),
    ("invalid lines/s", "invalid_per_s", 1, "{:,.1f}"),
    ("latency p50 ms", "latency_p50_ms", 1, "{:,.2f}"),
    ("latency p90 ms", "latency_p90_ms", 1, "{:,.2f}"),
    ("latency p99 ms", "latency_p99_ms", 1, "{:,.2f}"),
    ("connections", "connections_active", 1, "{:,.0f}"),
)
DIRECTIONS = (("client_to_upstream", "client→upstream"), ("upstream_to_client", "upstream→client"))


def sparkline(values: Sequence[float | None], width: int, blocks: str = BLOCKS) -> str:
    """The last ``width`` values as one character each, scaled from 0 to their maximum.

    A missing value is a blank; zero is the lowest block, so an idle second
    still shows as a baseline.
    """
    values = list(values)[-width:] if width > 0 else []
    top = max((v for v in values if v is not None), default=0.0)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif top <= 0:
            out.append(blocks[0])
        else:
            out.append(blocks[min(len(blocks) - 1, int(v / top * (len(blocks) - 1) + 0.5))])
    return "".join(out).rjust(width)


@dataclass
class View:
    """What the terminal shows: the proxy's last answers, and whether it answers now."""

    address: str
    samples: deque = field(default_factory=lambda: deque(maxlen=MINUTE))
    stats: dict[str, Any] | None = None
    health: tuple[bool, str] | None = None
    version: str = ""
    instance: str | None = None
    last_seq: int = -1
    error: str = ""
    failing_since: float | None = None
    last_ok: float | None = None

    def merge(self, history: dict[str, Any]) -> None:
        if history.get("instance") != self.instance:  # a restarted proxy: start over
            self.instance = history.get("instance")
            self.samples.clear()
            self.last_seq = -1
        for sample in history.get("samples", []):
            if sample["seq"] > self.last_seq:
                self.samples.append(sample)
                self.last_seq = sample["seq"]
        self.version = history.get("version", "")


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, h, m, s = s // 86400, s % 86400 // 3600, s % 3600 // 60, s % 60
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    return f"{m}m {s:02d}s" if m else f"{s}s"


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def render(
    view: View, width: int, height: int, now: float, unicode: bool = True
) -> list[tuple[str, str]]:
    """The screen as (text, style) lines, each at most ``width`` wide, at most ``height`` of them.

    Styles: "title", "alert", "head", "" (plain). What does not fit is left
    out from the bottom up; the sparklines narrow with the terminal.
    """
    lines = _heading(view, width, now, unicode) + _sparklines(view, width, unicode)
    if view.stats is not None:
        lines += _totals(view, view.stats, width, unicode)
    footer = "q quits · refreshed every second" if unicode else "q quits | refreshed every second"
    lines = [(text[:width], style) for text, style in lines[: max(0, height - 1)]]
    if height >= 2:
        lines += [("", "")] * (height - 1 - len(lines)) + [(footer[:width], "head")]
    return lines


def _heading(view: View, width: int, now: float, unicode: bool) -> list[tuple[str, str]]:
    """The title line (a narrow terminal drops the address, then the uptime), then the alert."""
    stats = view.stats
    name = f"geventproxy {view.version}".rstrip()
    health = None
    if view.health is not None and not view.error:
        health = "health: " + ("ok" if view.health[0] else "FAILING")
    uptime = None if stats is None else f"up {_duration(stats['uptime_s'])}"
    sep = " · " if unicode else " | "
    clock = _clock(now)
    for parts in ([name, view.address, health, uptime], [name, health, uptime], [name, health]):
        title = sep.join(part for part in parts if part)
        if len(title) + len(clock) + 1 <= width:
            break
    title = title[: max(0, width - len(clock) - 1)]
    lines = [(title + " " * (width - len(title) - len(clock)) + clock, "title")]
    if view.error:
        since = _clock(view.failing_since or now)
        last = f"figures below are from {_clock(view.last_ok)}" if view.last_ok else "no data yet"
        alert = (
            f"CANNOT REACH THE PROXY at {view.address} since {since}: {view.error}. "
            f"Retrying every second; {last}."
        )
        lines += [(text, "alert") for text in textwrap.wrap(alert, max(width, 20))]
    elif view.health is not None and not view.health[0]:
        lines.append((f"unhealthy: {view.health[1]}", "alert"))
    else:
        lines.append(("", ""))
    return lines


def _sparklines(view: View, width: int, unicode: bool) -> list[tuple[str, str]]:
    """One row per ROWS entry: the current value, and the last minute if the width allows."""
    label_w, value_w = 16, 10
    spark_w = min(MINUTE, width - label_w - value_w - 2 - 10)
    samples = list(view.samples)
    head = f"{'':{label_w}}{'now':>{value_w}}"
    if spark_w >= 10:
        head += "  last minute, one column a second"
    lines = [(head, "head")]
    blocks = BLOCKS if unicode else ASCII_BLOCKS
    for label, key, scale, fmt in ROWS:
        values = [None if s[key] is None else s[key] * scale for s in samples]
        current = values[-1] if values else None
        line = f"{label:<{label_w}}{_number(current, fmt):>{value_w}}"
        if spark_w >= 10:
            top = max((v for v in values if v is not None), default=None)
            line += "  " + sparkline(values, spark_w, blocks)
            line += f" max {_number(top, fmt)}" if top is not None else ""
        lines.append((line, ""))
    return lines


def _totals(view: View, stats: dict[str, Any], width: int, unicode: bool) -> list[tuple[str, str]]:
    """The counts since start: messages by direction, bytes, connections, upstream, health."""
    arrow = "→" if unicode else "->"
    kinds = ("req", "ack", "nak", "invalid")
    cell = max(9, min(12, (width - 18) // 4))
    head = f"{'messages':<18}" + "".join(f"{k.upper():>{cell}}" for k in kinds)
    lines = [("", ""), (head, "head")]
    for direction, name in DIRECTIONS:
        cells = "".join(f"{stats[f'msg_{k}_{direction}']:>{cell},}" for k in kinds)
        lines.append((f"  {name.replace('→', arrow):<16}{cells}", ""))
    totals = "".join(f"{stats[f'msg_{k}']:>{cell},}" for k in kinds)
    lines.append((f"  {'total':<16}{totals}", ""))
    moved = (f"{name.replace('→', arrow)} {_bytes(stats[f'bytes_{d}'])}" for d, name in DIRECTIONS)
    lines.append((f"{'bytes':<18}" + "   ".join(moved), ""))
    lines.append(
        (
            f"{'connections':<18}active {stats['connections_active']:,}   "
            f"total {stats['connections_total']:,}   "
            f"refused {stats['connections_refused']:,}   "
            f"accept errors {stats['accept_errors']:,}",
            "",
        )
    )
    closed = [f"{reason} {n:,}" for reason, n in stats["connections_closed"].items()]
    lines.extend(_wrap("closed", closed, width))
    lines.append(
        (
            f"{'upstream':<18}connect failures {stats['upstream_connect_failures']:,}   "
            f"timeouts {stats['upstream_connect_timeouts']:,}   "
            f"replies timed {stats['latency_count']:,}   "
            f"unmatched {stats['latency_unmatched']:,}",
            "",
        )
    )
    if view.health is not None:
        lines.append((f"{'health':<18}{view.health[1]}", ""))
    return lines


def _wrap(label: str, items: list[str], width: int) -> list[tuple[str, str]]:
    """``label`` then the items, as many to a line as fit."""
    lines, current = [], f"{label:<18}"
    for item in items:
        if len(current) + len(item) + 3 > width and current.strip() != label:
            lines.append((current.rstrip(), ""))
            current = " " * 18
        current += item + "   "
    lines.append((current.rstrip(), ""))
    return lines


class Source:
    """The admin endpoint of one proxy, read over plain HTTP."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def poll(self, view: View, now: float, lock: threading.Lock | None = None) -> None:
        """One round: update ``view``, or note in it why the proxy cannot be read.

        The requests are made first; ``view`` changes after, under ``lock``
        (the screen reads it meanwhile). Only this round reads what it writes
        of ``view`` before the requests.
        """
        fetched = self._fetch(view)
        with lock or contextlib.nullcontext():
            if isinstance(fetched, str):
                view.error = fetched
                if view.failing_since is None:
                    view.failing_since = now
                return
            history, stats, health = fetched
            view.merge(history)
            view.stats, view.health = stats, health
            view.error, view.failing_since, view.last_ok = "", None, now

    def _fetch(self, view: View) -> tuple[dict, dict, tuple[bool, str]] | str:
        """The three routes' answers, or why they could not be read."""
        try:
            status, body = self.get(f"/history?after={view.last_seq}")
            if status != 200:
                raise OSError(f"/history answered HTTP {status}")
            history = json.loads(body)
            if history.get("instance") != view.instance and view.last_seq >= 0:
                history = json.loads(self.get("/history")[1])  # restarted: its whole history
            status, body = self.get("/stats")
            if status != 200:
                raise OSError(f"/stats answered HTTP {status}")
            stats = json.loads(body)
            status, body = self.get("/healthz")
            health = (status == 200, body.decode(errors="replace").strip() or f"HTTP {status}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return str(exc) or type(exc).__name__
        return history, stats, health


def _styles() -> dict[str, int]:
    styles = {"": curses.A_NORMAL, "head": curses.A_DIM, "title": curses.A_REVERSE}
    styles["alert"] = curses.A_BOLD | curses.A_REVERSE
    if curses.has_colors():
        curses.start_color()
        curses.use_default_colors()
        curses.init_pair(1, curses.COLOR_WHITE, curses.COLOR_RED)
        styles["alert"] = curses.color_pair(1) | curses.A_BOLD
    return styles


def _loop(screen: Any, source: Source, view: View, interval: float, unicode: bool) -> int:
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    styles = _styles()
    screen.timeout(100)  # getch() waits at most this long: keys are read ten times a second
    # The proxy is read in a thread of its own, so that a slow or hung proxy never
    # delays a key: q quits within a tenth of a second whatever the network does.
    lock, stop, polled = threading.Lock(), threading.Event(), threading.Event()

    def poll_forever() -> None:
        while not stop.is_set():
            source.poll(view, time.time(), lock)
            polled.set()
            stop.wait(interval)

    threading.Thread(target=poll_forever, name="poll", daemon=True).start()
    try:
        return _paint_until_quit(screen, view, lock, polled, styles, unicode)
    finally:
        stop.set()


def _paint_until_quit(
    screen: Any,
    view: View,
    lock: threading.Lock,
    polled: threading.Event,
    styles: dict[str, int],
    unicode: bool,
) -> int:
    while True:
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return 0
        if key == curses.KEY_RESIZE or polled.is_set():
            polled.clear()
            height, width = screen.getmaxyx()
            now = time.time()
            with lock:
                lines = render(view, width, height, now, unicode)
            screen.erase()
            for row, (text, style) in enumerate(lines):
                try:
                    # The bottom right cell cannot be written without moving the cursor off screen.
                    screen.addstr(
                        row, 0, text[: width - 1] if row == height - 1 else text, styles[style]
                    )
                except curses.error:
                    pass
            screen.refresh()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="geventproxy top",
        description="A live terminal view of a proxy, read from its -admin endpoint "
        "(the same figures as the page at http://ADMIN_ADDR/). q quits.",
    )
    parser.add_argument(
        "address", metavar="ADMIN_ADDR", help="the proxy's -admin address, e.g. 127.0.0.1:9102"
    )
    parser.add_argument(
        "-interval",
        "--interval",
        type=float,
        default=1.0,
        metavar="SECS",
        help="seconds between refreshes (default 1)",
    )
    args = parser.parse_args(argv)
    text = args.address
    for prefix in ("http://", "https://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.split("/", 1)[0]
    try:
        address = parse_address(text, allow_any_host=True, allow_port_zero=False)
    except ConfigError as exc:
        print(f"geventproxy top: error: {exc}", file=sys.stderr)
        return 2
    if args.interval <= 0:
        print("geventproxy top: error: -interval must be above 0", file=sys.stderr)
        return 2
    if not sys.stdout.isatty():
        print(
            "geventproxy top: error: needs a terminal (for a script, read /stats)", file=sys.stderr
        )
        return 2
    locale.setlocale(locale.LC_ALL, "")
    unicode = "utf" in (locale.getpreferredencoding(False) or "").lower()
    host = address.host or "localhost"
    view = View(str(address) if address.host else f"localhost:{address.port}")
    try:
        return curses.wrapper(_loop, Source(host, address.port), view, args.interval, unicode)
    except KeyboardInterrupt:
        return 0
