"""geventproxy command line: argv -> Config -> run.

Three subcommands come before any flag: ``top ADDR`` is the terminal view,
``deploy-files DIR`` copies the deployment files out of the package,
``demo`` runs the demo.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

# Before anything slow: a USR1 that arrives during start-up must not kill us.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["deploy-files"]:
        from . import deployfiles

        return deployfiles.main(args[1:])
    if args == ["demo"]:
        from . import demo

        return demo.main()

    from . import process
    from .config import ConfigError, load, unknown_environment
    from .logs import setup
    from .state import check_path

    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["top"]:  # geventproxy top ADMIN_ADDR: the terminal view
        from .top import main as top

        return top(args[1:])
    try:
        config = load(args, os.environ)
    except ConfigError as exc:
        print(f"geventproxy: error: {exc} (see --help)", file=sys.stderr)
        return 2
    problem = config.state_file and check_path(config.state_file)
    if problem:
        print(f"geventproxy: error: -state-file: {problem}", file=sys.stderr)
        return 2
    log = setup(config.log_level, config.log_format)
    for variable, known in unknown_environment(os.environ):
        log.warning(
            "unknown environment variable, ignored",
            extra={"fields": {"variable": variable, "did_you_mean": known}},
        )
    process.set_name("geventproxy")
    if config.workers > 1:
        from .workers import supervise

        return supervise(config)
    from .runner import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
