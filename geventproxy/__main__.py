"""geventproxy command line: argv -> Config -> the parent process and its workers."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

# Before anything slow: a USR1 that arrives during start-up must not kill us, and a
# HUP (a reload) waits until the parent can carry it out.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from .config import ConfigError
    from .workers import read_settings, supervise

    flags = list(sys.argv[1:] if argv is None else argv)
    try:
        config, env = read_settings(flags, os.environ)
    except ConfigError as exc:
        print(f"geventproxy: error: {exc} (see --help)", file=sys.stderr)
        return 2
    return supervise(config, env, flags)


if __name__ == "__main__":
    sys.exit(main())
