"""geventproxy command line: argv -> Config -> run; `geventproxy top ADDR`, the terminal view."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

# Before anything slow: a USR1 that arrives during start-up must not kill us.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from .config import ConfigError, load

    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["top"]:  # geventproxy top ADMIN_ADDR: the terminal view
        from .top import main as top

        return top(args[1:])
    try:
        config = load(args, os.environ)
    except ConfigError as exc:
        print(f"geventproxy: error: {exc} (see --help)", file=sys.stderr)
        return 2
    if config.workers > 1:
        from .workers import supervise

        return supervise(config)
    from .runner import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
