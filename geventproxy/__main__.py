"""geventproxy command line: argv -> Config -> the parent process and its workers.

Three subcommands come before any flag: ``top ADDR`` is the terminal view,
``deploy-files DIR`` copies the deployment files out of the package,
``demo`` runs the demo.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

# Before anything slow: a USR1 that arrives during start-up must not kill us, and a
# HUP (a reload) waits until the parent can carry it out.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def _command(args: list[str]) -> int | None:
    """Run a subcommand, if ``args`` name one; its exit status."""
    if args[:1] not in (["deploy-files"], ["demo"], ["top"]):
        return None
    # Not a proxy: a HUP (a closed terminal) ends it as it ends any command.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    if args[0] == "deploy-files":
        from . import deployfiles

        return deployfiles.main(args[1:])
    if args[0] == "top":  # geventproxy top ADMIN_ADDR: the terminal view
        from .top import main as top

        return top(args[1:])
    if args == ["demo"]:
        from . import demo

        return demo.main()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    status = _command(args)
    if status is not None:
        return status

    from . import process
    from .config import ConfigError, unknown_environment
    from .logs import setup
    from .state import check_path
    from .workers import read_settings, supervise

    try:
        config, env = read_settings(args, os.environ)
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
    return supervise(config, env, args)


if __name__ == "__main__":
    sys.exit(main())
