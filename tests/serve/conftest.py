"""Fixtures for the server tests: real uvicorn servers on loopback around the fake (or tiny real) pipeline."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from fake_pipeline import FakePipeline
from serve_helpers import running_server


@pytest.fixture
def start_server():
    """start_server(pipeline=None, **settings) -> RunningServer, stopped at the end of the test."""
    with ExitStack() as stack:
        yield lambda pipeline=None, **settings: stack.enter_context(
            running_server(pipeline or FakePipeline(), **settings)
        )


@pytest.fixture(scope="module")
def server():
    """One fake-pipeline server with default settings, shared by a module's tests."""
    with running_server(FakePipeline()) as s:
        yield s
