"""The proxy says at start which counting implementation it runs, and both count alike."""

from __future__ import annotations

import pytest

from geventproxy import accel
from geventproxy.testing.launch import run_foo_client, start_proxy
from tests.unit.implementations import COMPILED


@pytest.mark.parametrize(
    "pure,expected",
    [
        ("1", "pure Python (GEVENTPROXY_PURE=1)"),
        pytest.param(
            "",
            "compiled accelerator",
            marks=pytest.mark.skipif(COMPILED is None, reason="the extension is not built"),
        ),
    ],
    ids=["pure", "compiled"],
)
def test_start_line_names_the_implementation(foo_port: int, pure: str, expected: str) -> None:
    """1. Start the proxy with GEVENTPROXY_PURE set or empty.
    2. Its worker's `serving` line names the implementation; one such line, not one
       per client.
    3. The reference client passes through it and the counts are exact."""
    with start_proxy(foo_port, env={accel.PURE_ENV: pure}) as p:
        line = p.wait_log(" serving ")
        assert f'counting="{expected}"' in line, line
        done = run_foo_client("-connect", f"127.0.0.1:{p.port}", "-requests", "50")
        assert done.returncode == 0, done.stdout + done.stderr
        report = p.report()
        assert report["msg_req"] == 50 and report["msg_ack"] + report["msg_nak"] == 50
        assert report["msg_invalid"] == 0
        assert sum("counting=" in x for x in p.stderr_lines) == 1
