"""One worker process, as the parent starts it.

``python -m geventproxy.worker HANDOFF... -- FLAGS...`` runs in a fresh
interpreter, so a reload runs the code that is on disk now. It inherits
from the parent the listening socket, the admin socket (worker 0 only), the
shared statistics and a pipe on which it tells the parent it is ready, and
when it has frozen its statistics for a report; the HANDOFF options give
their descriptor numbers. FLAGS are the parent's command line
as given, and the environment the parent passes it holds the settings of
its --env-file: the worker parses them with its own code and never reads
the file (it may have changed since the parent read it).

Exit status: 0 after a drain; 2 if its code rejects the configuration;
3 if its code cannot add into the parent's statistics (another layout).
"""

from __future__ import annotations

import signal

# USR1, HUP and INT are the parent's: one sent to the whole process group (a
# closed terminal, Ctrl-C, `systemctl kill`) must not end a worker. The parent
# started this interpreter with them blocked: ignore them before unblocking.
# (Once it serves, a worker answers USR1 from the parent: see runner.py.)
for _sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGINT):
    signal.signal(_sig, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGHUP, signal.SIGINT})

import logging  # noqa: E402 - after the signals, which must come first
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

from .config import ConfigError, load  # noqa: E402
from .logs import LOGGER, event, setup  # noqa: E402
from .sharedstats import IncompatibleLayout, SharedStats  # noqa: E402

__all__ = ["HANDOFF", "main"]

#: The options the parent passes before ``--``, all integers (descriptors, indexes).
HANDOFF = ("listen-fd", "admin-fd", "stats-fd", "notify-fd", "block", "worker")
EXIT_CONFIG = 2
EXIT_INCOMPATIBLE = 3


def _handoff(argv: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """The parent's handoff options and the flags after ``--``."""
    argv = list(argv)
    split = argv.index("--")
    options = dict(arg.lstrip("-").split("=", 1) for arg in argv[:split])
    return {name: int(options[name]) for name in HANDOFF}, argv[split + 1 :]


def _notifier(fd: int) -> Callable[..., None]:
    """Tell the parent something, as one short line: atomic on a pipe."""

    def notify(kind: str, text: str = "") -> None:
        os.write(fd, f"{kind} {os.getpid()} {text}\n".encode())

    return notify


def main(argv: Sequence[str] | None = None) -> int:
    handoff, flags = _handoff(sys.argv[1:] if argv is None else argv)
    try:
        config = load(flags, os.environ)
    except ConfigError as exc:
        print(f"geventproxy worker: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup(config.log_level, config.log_format, {"worker": handoff["worker"]})
    try:
        shared = SharedStats.attach(handoff["stats-fd"])
    except IncompatibleLayout as exc:
        event(logging.ERROR, "worker cannot start", error=str(exc))
        return EXIT_INCOMPATIBLE
    import gevent

    from .runner import run  # imports gevent: only once the worker is sure to run

    # Greenlets need not record who spawned them (gevent's debugging aid): that
    # record costs a held connection about 0.4 KiB, and every spawn its capture.
    gevent.config.track_greenlet_tree = False

    admin_fd = handoff["admin-fd"]
    return run(
        config,
        socket.socket(fileno=handoff["listen-fd"]),
        shared,
        handoff["block"],
        worker=handoff["worker"],
        admin_listener=socket.socket(fileno=admin_fd) if admin_fd >= 0 else None,
        notify=_notifier(handoff["notify-fd"]),
    )


if __name__ == "__main__":
    try:
        status = main()
    except Exception:
        logging.getLogger(LOGGER).exception("worker crashed")
        status = 1
    sys.exit(status)
