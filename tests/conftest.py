"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from geventproxy.testing.launch import start_foo_server


@pytest.fixture(scope="module")
def foo_port() -> Iterator[int]:
    """One reference Foo server (a subprocess on loopback) shared by a test module."""
    with start_foo_server() as server:
        yield server.port
