"""Command line and environment to a validated ``Config``. No I/O, no binding.

Flags are accepted in the Go style of the original task (``-listen=:8002``,
``-listen :8002``) and the GNU style (``--listen=:8002``, ``--listen :8002``).
Every flag can also come from an environment variable ``GEVENTPROXY_<NAME>``
(upper case, ``-`` as ``_``); the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NoReturn

from . import __version__, accel
from .codec import DEFAULT_MAX_LINE

__all__ = [
    "Address",
    "Config",
    "ConfigError",
    "format_address",
    "ENV_PREFIX",
    "load",
    "load_with_file",
    "parse_address",
    "parse_env_file",
    "unknown_environment",
]

ENV_PREFIX = "GEVENTPROXY_"


class ConfigError(Exception):
    """A bad flag or value: reported as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Address:
    """A host and port. An empty host means every interface (IPv4 and IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address((self.host, self.port))


def format_address(address: Any) -> str:
    """A socket address as host:port, [v6]:port for IPv6, IPv4-mapped IPv6 as IPv4.

    The one place an address is written out: flags, logs, the admin endpoint.
    """
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if isinstance(host, str) and host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on the dual-stack listener: print it as IPv4
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


@dataclasses.dataclass(frozen=True)
class Config:
    listen: Address = Address("", 8002)
    forward: Address = Address("localhost", 8001)
    max_connections: int = 10_000
    connect_timeout: float = 5.0
    idle_timeout: float = 0.0
    fin_timeout: float = 1.0
    client_fin_timeout: float = 5.0
    drain_timeout: float = 10.0
    max_line: int = DEFAULT_MAX_LINE
    strict: bool = False
    log_level: str = "info"
    log_format: str = "text"
    log_connections: bool = True
    workers: int = 1
    admin: Address | None = None
    state_file: str | None = None
    state_interval: float = 60.0
    health_interval: float = 2.0
    report_interval: float = 0.0
    env_file: str | None = None
    worker_timeout: float = 30.0


def parse_address(text: str, *, allow_any_host: bool, allow_port_zero: bool) -> Address:
    """``host:port``, ``[v6]:port`` or ``:port``."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{text!r} is not HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"{text!r}: unclosed '[' in the IPv6 address")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{text!r}: write an IPv6 address in brackets, as [{host}]:PORT")
    if not host and not allow_any_host:
        raise ConfigError(f"{text!r}: a host is needed")
    if any(c.isspace() for c in host):
        raise ConfigError(f"{text!r}: the host contains white space")
    if not port_text.isdigit() or not port_text.isascii():
        raise ConfigError(f"{text!r}: the port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ConfigError(f"{text!r}: the port must be 1 to 65535")
    return Address(host, port)


def _listen_address(text: str) -> Address:
    return parse_address(text, allow_any_host=True, allow_port_zero=True)


def _forward_address(text: str) -> Address:
    return parse_address(text, allow_any_host=False, allow_port_zero=False)


def _admin_address(text: str) -> Address | None:
    if text.lower() in ("", "off", "none"):
        return None
    return parse_address(text, allow_any_host=True, allow_port_zero=True)


def _count(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{text!r} is not a whole number") from None
        if value < low:
            raise ConfigError(f"{value} is below the minimum {low}")
        return value

    return parse


def _seconds(text: str) -> float:
    """Seconds as a number, with an optional unit suffix: 500ms, 5s, 2m."""
    scale = 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            text, scale = text[: -len(suffix)], factor
            break
    try:
        value = float(text) * scale
    except ValueError:
        raise ConfigError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{text!r}: seconds must be zero or more")
    return value


#: The shortest --report-interval: a line of about 1.5 KiB and a snapshot every 100 ms at most.
MIN_REPORT_INTERVAL = 0.1


def _report_interval(text: str) -> float:
    value = _seconds(text)
    if 0 < value < MIN_REPORT_INTERVAL:
        raise ConfigError(f"{text!r}: use 0 (off) or at least {MIN_REPORT_INTERVAL * 1000:.0f}ms")
    return value


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{text!r} is not true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ConfigError(f"{text!r} is not one of {', '.join(choices)}")
        return text.lower()

    return parse


# name, parser, metavar, help. The name is the flag (with - or --), the
# Config field (with _) and the environment variable.
_FLAGS: tuple[tuple[str, Callable[[str], Any], str, str], ...] = (
    (
        "listen",
        _listen_address,
        "ADDR",
        "address to accept clients on; ':8002' is every interface, IPv4 and IPv6",
    ),
    (
        "forward",
        _forward_address,
        "ADDR",
        "the upstream Foo server; every address a name resolves to is tried in turn",
    ),
    (
        "max-connections",
        _count(0),
        "N",
        "clients served at once; past it a new client is accepted and closed at once, "
        "and counted in connections_refused; 0 = no limit",
    ),
    (
        "connect-timeout",
        _seconds,
        "SECS",
        "give up connecting to the upstream after this long",
    ),
    (
        "idle-timeout",
        _seconds,
        "SECS",
        "close a connection with no byte in either direction for this long; 0 = never",
    ),
    (
        "fin-timeout",
        _seconds,
        "SECS",
        "once the upstream has closed its side, close the connection after this long "
        "without traffic",
    ),
    (
        "client-fin-timeout",
        _seconds,
        "SECS",
        "once the client has closed its side, wait this long without an upstream byte "
        "for the replies it is still owed, then close (reason client_fin_timeout); "
        "0 = wait for ever",
    ),
    (
        "drain-timeout",
        _seconds,
        "SECS",
        "on SIGTERM/SIGINT, how long open connections may go on before they are closed",
    ),
    (
        "max-line",
        _count(2),
        "BYTES",
        "longest line (LF included) the parser holds; longer lines are counted "
        "invalid and still forwarded",
    ),
    (
        "strict",
        _boolean,
        "BOOL",
        "disconnect a client whose line is not a well-formed REQ, before that line "
        "reaches the upstream",
    ),
    (
        "log-level",
        _choice("debug", "info", "warning", "error"),
        "LEVEL",
        "debug, info, warning or error",
    ),
    ("log-format", _choice("text", "json"), "FMT", "text or json"),
    (
        "log-connections",
        _boolean,
        "BOOL",
        "log each connection's open and close at info level",
    ),
    (
        "workers",
        _count(1),
        "N",
        "worker processes sharing the listening socket, under one parent that reports "
        "their sums and replaces them on SIGHUP",
    ),
    (
        "worker-timeout",
        _seconds,
        "SECS",
        "a worker whose event loop has not run for this long is killed and replaced; 0 = never",
    ),
    (
        "admin",
        _admin_address,
        "ADDR",
        "serve the live page (/), /history, /metrics, /stats and /healthz over HTTP "
        "on this address",
    ),
    ("state-file", str, "PATH", "keep the totals here across restarts"),
    (
        "state-interval",
        _seconds,
        "SECS",
        "how often the state file is written while running",
    ),
    (
        "health-interval",
        _seconds,
        "SECS",
        "how often /healthz re-checks that the upstream accepts connections",
    ),
    (
        "report-interval",
        _report_interval,
        "SECS",
        "also print the statistics line (as on USR1) every SECS; 0 = only on USR1 and at exit",
    ),
    (
        "env-file",
        str,
        "PATH",
        "read GEVENTPROXY_<FLAG>=VALUE lines from this file at start and again on every "
        "SIGHUP; the file wins over the environment, a flag over both",
    ),
)

_EPILOG = """\
signals:
  USR1       print the statistics as one line of JSON on stdout
  TERM, INT  stop accepting, let open connections finish for --drain-timeout,
             close the rest, print a final statistics line and exit 0;
             a second TERM or INT exits at once
  HUP        reload: read --env-file again (over the flags and environment the
             process started with), start new workers from the code now on disk
             on the same socket, and let the old ones finish their connections
             (--drain-timeout) and exit; a configuration that does not validate
             is logged and the running workers carry on

statistics (the JSON object; the README says more of each):
  msg_total          msg_req + msg_ack + msg_nak: well-formed messages, both directions
  msg_req, msg_ack, msg_nak  well-formed messages of each type
  msg_invalid        lines that are not well-formed Foo (forwarded all the same)
  request_rate_1s, request_rate_10s    REQ per second over the last 1 s / 10 s
  response_rate_1s, response_rate_10s  ACK+NAK per second over the last 1 s / 10 s
  msg_<type>_<direction>     the counts by direction (client_to_upstream,
                             upstream_to_client), type req, ack, nak or invalid
  bytes_client_to_upstream, bytes_upstream_to_client  bytes forwarded each way
  connections_total, connections_active, connections_refused
  connections_closed         closed connections by reason
  upstream_connect_failures, upstream_connect_timeouts, accept_errors
  latency_p50_ms, latency_p90_ms, latency_p99_ms  upstream response time, last 10 s
  latency_count, latency_unmatched, latency_dropped
  uptime_s

commands:
  geventproxy top ADMIN_ADDR  live terminal view of a proxy's -admin endpoint
                              (the same figures as the page at http://ADMIN_ADDR/)

every flag can also be set as GEVENTPROXY_<FLAG> in the environment,
e.g. GEVENTPROXY_FORWARD=db1:8001 GEVENTPROXY_IDLE_TIMEOUT=300

exit status: 0 after TERM/INT, 1 if it cannot listen, 2 for a bad flag,
3 if the workers fail at every start
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _wrap(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            # argparse turns ArgumentTypeError into "argument -x: message".
            raise argparse.ArgumentTypeError(str(exc)) from None

    typed.__name__ = name
    return typed


def _shown_default(name: str) -> str:
    """A flag's default for --help, from the Config field itself (never written twice)."""
    value = getattr(Config(), name.replace("-", "_"))
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:g}s" if value >= 1 else f"{value * 1000:g}ms"
    return str(value)


def _parser() -> _Parser:
    parser = _Parser(
        prog="geventproxy",
        description="A transparent proxy for the Foo line protocol that counts what flows "
        "through it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        add_help=False,
    )
    # -help as well: the Go-style binaries of the task accept it.
    parser.add_argument(
        "-h", "-help", "--help", action="help", help="show this help message and exit"
    )
    for name, parse, metavar, text in _FLAGS:
        kwargs: dict[str, Any] = {
            "type": _wrap(name, parse),
            "metavar": metavar,
            "help": f"{text} (default {_shown_default(name)})",
            "default": argparse.SUPPRESS,  # absent flags leave the environment's value alone
        }
        if parse is _boolean:
            kwargs.update(nargs="?", const=True)  # -strict, or -strict=false
        parser.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"), **kwargs)
    parser.add_argument(
        "-version",
        "--version",
        action="version",
        version=f"geventproxy {__version__} (counting: {accel.DESCRIPTION})",
    )
    return parser


def _variable(name: str) -> str:
    return ENV_PREFIX + name.upper().replace("-", "_")


#: GEVENTPROXY_* variables that are not flags: PURE (accel.PURE_ENV) chooses the
#: pure-Python counting code, read once at import.
NOT_FLAGS = ["PURE"]


def unknown_environment(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each GEVENTPROXY_* variable that names no flag (a typo is silently ignored
    otherwise), with the known variable it most resembles, if any."""
    known = [_variable(name).removeprefix(ENV_PREFIX) for name, *_ in _FLAGS]
    known += NOT_FLAGS
    unknown = []
    for var in sorted(env):
        name = var.removeprefix(ENV_PREFIX)
        if var.startswith(ENV_PREFIX) and name not in known:
            like = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            unknown.append((var, ENV_PREFIX + like[0] if like else None))
    return unknown


def load(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from the environment, then the command line."""
    values: dict[str, Any] = {}
    for name, parse, _metavar, _text in _FLAGS:
        var = _variable(name)
        if env and var in env:
            try:
                values[name.replace("-", "_")] = parse(env[var])
            except ConfigError as exc:
                raise ConfigError(f"{var}: {exc}") from None
    namespace = _parser().parse_args(list(argv))
    values.update(vars(namespace))  # only the flags given: -admin=off overrides the environment
    config = Config(**values)
    if config.admin is not None and config.admin == config.listen and config.admin.port:
        raise ConfigError("--admin must differ from --listen")
    return config


def parse_env_file(text: str, name: str) -> dict[str, str]:
    """The settings of an --env-file: ``GEVENTPROXY_<FLAG>=VALUE`` lines.

    The syntax of systemd's EnvironmentFile, kept simple: blank lines and
    lines starting with # or ; are skipped, white space around the name and
    the value is dropped, and one pair of matching quotes around the value
    is removed. Unlike the environment, which belongs to everyone, the file
    is the proxy's own: a name that is not a flag is an error (a typo must
    not pass silently), and so is a file that names another file.
    """
    known = {_variable(flag) for flag, *_ in _FLAGS}
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        where = f"{name}, line {number}"
        if not sep or not key:
            raise ConfigError(f"{where}: not NAME=VALUE")
        if key not in known:
            raise ConfigError(f"{where}: {key} is not a GEVENTPROXY_<FLAG> setting")
        if key == ENV_PREFIX + "ENV_FILE":
            raise ConfigError(f"{where}: an env file cannot name another one")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load_with_file(
    argv: Sequence[str], env: Mapping[str, str], read: Callable[[str], str]
) -> tuple[Config, dict[str, str]]:
    """``load``, with the settings of --env-file (read through ``read``) over ``env``.

    Also returns the environment that gives the same Config to ``load``
    alone: the one a worker gets, so that it never reads the file itself
    (it might have changed since).
    """
    config = load(argv, env)
    if config.env_file is None:
        return config, dict(env)
    try:
        text = read(config.env_file)
    except OSError as exc:
        raise ConfigError(f"--env-file {config.env_file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--env-file {config.env_file}: not UTF-8 text") from None
    merged = {**env, **parse_env_file(text, config.env_file)}
    return load(argv, merged), merged
