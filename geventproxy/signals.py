"""Signal handlers that only hand off.

The callbacks run in the event loop; each one only sets a flag or an event.
The real work (writing a report, draining) happens in greenlets that wait
for those events.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import gevent

__all__ = ["install", "ignore_report_signal"]


def ignore_report_signal() -> None:
    """USR1 must never kill the process: ignored before its handler is in place and after."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def install(
    stop: Callable[[], None],
    force: Callable[[], None],
    report: Callable[[], None] | None,
    interrupt: bool = True,
) -> list[object]:
    """USR1 asks for a report; the first TERM (or INT) asks for a drain, the second forces.

    Without ``report`` USR1 stays ignored; without ``interrupt`` so does INT
    (a worker leaves both to its parent).
    """
    terms = 0

    def on_term() -> None:
        nonlocal terms
        terms += 1
        (stop if terms == 1 else force)()

    handlers = [gevent.signal_handler(signal.SIGTERM, on_term)]
    if interrupt:
        handlers.append(gevent.signal_handler(signal.SIGINT, on_term))
    if report is not None:
        handlers.append(gevent.signal_handler(signal.SIGUSR1, report))
    return handlers
