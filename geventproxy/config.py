"""Command line and environment to a validated ``Config``. No I/O, no binding.

Flags are accepted in the Go style of the original task (``-listen=:8002``,
``-listen :8002``) and the GNU style (``--listen=:8002``, ``--listen :8002``).
Every flag can also come from an environment variable ``GEVENTPROXY_<NAME>``
(upper case, ``-`` as ``_``); the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NoReturn

from . import __version__, accel
from .codec import DEFAULT_MAX_LINE

__all__ = ["Address", "Config", "ConfigError", "parse_address", "load", "ENV_PREFIX"]

ENV_PREFIX = "GEVENTPROXY_"


class ConfigError(Exception):
    """A bad flag or value: reported as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Address:
    """A host and port. An empty host means every interface (IPv4 and IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Config:
    listen: Address = Address("", 8002)
    forward: Address = Address("localhost", 8001)
    max_connections: int = 10_000
    connect_timeout: float = 5.0
    idle_timeout: float = 0.0
    fin_timeout: float = 1.0
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
        "address to accept clients on; ':8002' is every interface, IPv4 and IPv6 (default :8002)",
    ),
    (
        "forward",
        _forward_address,
        "ADDR",
        "the upstream Foo server; every address a name resolves to is tried in turn "
        "(default localhost:8001)",
    ),
    (
        "max-connections",
        _count(0),
        "N",
        "clients served at once; past it a new client is accepted and closed at once, "
        "and counted in connections_refused; 0 = no limit (default 10000)",
    ),
    (
        "connect-timeout",
        _seconds,
        "SECS",
        "give up connecting to the upstream after this long (default 5s)",
    ),
    (
        "idle-timeout",
        _seconds,
        "SECS",
        "close a connection with no byte in either direction for this long; 0 = never (default 0)",
    ),
    (
        "fin-timeout",
        _seconds,
        "SECS",
        "once the upstream has closed its side, close the connection after this long "
        "without traffic (default 1s)",
    ),
    (
        "drain-timeout",
        _seconds,
        "SECS",
        "on SIGTERM/SIGINT, how long open connections may go on before they are "
        "closed (default 10s)",
    ),
    (
        "max-line",
        _count(2),
        "BYTES",
        "longest line (LF included) the parser holds; longer lines are counted "
        "invalid and still forwarded (default 65536)",
    ),
    (
        "strict",
        _boolean,
        "BOOL",
        "disconnect a client whose line is not a well-formed REQ, before that line "
        "reaches the upstream (default false)",
    ),
    (
        "log-level",
        _choice("debug", "info", "warning", "error"),
        "LEVEL",
        "debug, info, warning or error (default info)",
    ),
    ("log-format", _choice("text", "json"), "FMT", "text or json (default text)"),
    (
        "log-connections",
        _boolean,
        "BOOL",
        "log each connection's open and close at info level (default true)",
    ),
    (
        "workers",
        _count(1),
        "N",
        "processes sharing the listening socket; the parent reports their sums (default 1)",
    ),
    (
        "admin",
        _admin_address,
        "ADDR",
        "serve /metrics, /stats and /healthz over HTTP on this address (default off)",
    ),
    ("state-file", str, "PATH", "keep the totals here across restarts (default none)"),
    (
        "state-interval",
        _seconds,
        "SECS",
        "how often the state file is written while running (default 60s)",
    ),
    (
        "health-interval",
        _seconds,
        "SECS",
        "how often /healthz re-checks that the upstream accepts connections (default 2s)",
    ),
)

_EPILOG = """\
signals:
  USR1       print the statistics as one line of JSON on stdout
  TERM, INT  stop accepting, let open connections finish for --drain-timeout,
             close the rest, print a final statistics line and exit 0;
             a second TERM or INT exits at once

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

every flag can also be set as GEVENTPROXY_<FLAG> in the environment,
e.g. GEVENTPROXY_FORWARD=db1:8001 GEVENTPROXY_IDLE_TIMEOUT=300
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


def _parser() -> _Parser:
    parser = _Parser(
        prog="geventproxy",
        description="A transparent proxy for the Foo line protocol that counts what flows "
        "through it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for name, parse, metavar, text in _FLAGS:
        kwargs: dict[str, Any] = {
            "type": _wrap(name, parse),
            "metavar": metavar,
            "help": text,
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


def load(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from the environment, then the command line."""
    values: dict[str, Any] = {}
    for name, parse, _metavar, _text in _FLAGS:
        var = ENV_PREFIX + name.upper().replace("-", "_")
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
