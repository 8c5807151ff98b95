"""Log lines: the same fields and timestamp in text and JSON; peers as operators read them."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from geventproxy import logs
from geventproxy.server import format_address

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def _restore_logger() -> Iterator[None]:
    yield
    logging.getLogger(logs.LOGGER).handlers.clear()


def _emit(capsys: pytest.CaptureFixture[str], fmt: str, context: dict | None = None) -> str:
    capsys.readouterr()
    log = logs.setup("info", fmt, context)  # a handler on the sys.stderr of this moment
    log.info("draining", extra={"fields": {"connections": 3, "worker": None, "peer": "a b"}})
    return capsys.readouterr().err


def test_text_and_json_carry_the_same_fields_and_timestamp(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _emit(capsys, "text", {"worker": 1})
    match = re.fullmatch(rf"({ISO}) info draining worker=1 connections=3 peer=\"a b\"\n", text)
    assert match, text
    record = json.loads(_emit(capsys, "json", {"worker": 1}))
    assert re.fullmatch(ISO, record.pop("ts"))
    assert isinstance(record.pop("pid"), int)  # the one field JSON adds
    assert record == {
        "level": "info",
        "msg": "draining",
        "worker": 1,
        "connections": 3,
        "peer": "a b",
    }


def test_fields_that_are_none_are_left_out(capsys: pytest.CaptureFixture[str]) -> None:
    text = _emit(capsys, "text")
    assert text and "None" not in text and "worker" not in text
    assert "worker" not in json.loads(_emit(capsys, "json"))


def test_peers_on_the_dual_stack_listener_are_printed_as_ipv4() -> None:
    assert format_address(("::ffff:127.0.0.1", 46958, 0, 0)) == "127.0.0.1:46958"
    assert format_address(("::1", 80, 0, 0)) == "[::1]:80"
    assert format_address(("2001:db8::ffff:1", 80, 0, 0)) == "[2001:db8::ffff:1]:80"
    assert format_address(("10.0.0.5", 8002)) == "10.0.0.5:8002"
