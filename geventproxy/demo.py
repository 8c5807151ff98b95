"""The proxy's main job on a built-in default, end to end, on loopback.

1. Start the reference Foo server.
2. Start the proxy in front of it.
3. Run the reference client through the proxy: once alone, as in the task,
   then 20 connections at once, then 5 pipelined connections.
4. Send SIGUSR1 and show the JSON statistics the proxy prints.
5. Stop both with SIGTERM (the proxy drains and prints a final line).

Usage: geventproxy demo (or python -m geventproxy demo; in a checkout,
python scripts/demo.py)
"""

from __future__ import annotations

import json
import sys

from .testing.launch import run_foo_client, start_foo_server, start_proxy

#: The reference client's runs through the proxy: a title, its flags.
RUNS = (
    ("one client, as in the task", []),
    ("20 clients at once", ["-connections=20"]),
    ("5 pipelined clients, 50 requests in flight each", ["-connections=5", "-window=50"]),
)
#: The REQs those runs send: 100 for each of their connections.
EXPECTED_REQS = 100 + 20 * 100 + 5 * 100
#: The statistics shown again one to a line after the JSON.
READABLE = (
    "msg_total",
    "msg_req",
    "msg_ack",
    "msg_nak",
    "msg_invalid",
    "request_rate_1s",
    "request_rate_10s",
    "response_rate_1s",
    "response_rate_10s",
    "connections_total",
    "latency_p50_ms",
    "latency_p99_ms",
)


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    _step("starting the reference Foo server")
    with start_foo_server() as server:
        print(f"server listening on 127.0.0.1:{server.port}")
        _step("starting geventproxy in front of it")
        with start_proxy(server.port, "-log-connections=false") as proxy:
            print(
                f"$ python -m geventproxy -listen=127.0.0.1:{proxy.port} "
                f"-forward=127.0.0.1:{server.port}"
            )
            ok = True
            for title, args in RUNS:
                _step(f"reference client through the proxy: {title}")
                result = run_foo_client(f"-connect=127.0.0.1:{proxy.port}", *args)
                print(result.stdout, end="")
                print(result.stderr, end="", file=sys.stderr)
                ok = ok and result.returncode == 0
            _step("kill -USR1 <proxy>: the statistics, one JSON line on stdout")
            report = proxy.report()
            print(json.dumps(report, separators=(",", ":")))
            print("\nthe same, readable:")
            for key in READABLE:
                print(f"  {key:20} {report[key]}")
            ok = ok and report["msg_req"] == EXPECTED_REQS
            _step("kill -TERM <proxy>: drain and exit")
            status = proxy.stop()
            print(f"proxy exited with status {status}")
    return 0 if ok and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
