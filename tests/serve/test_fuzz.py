"""Schemathesis fuzzes every operation in /openapi.json against a real server: valid and invalid inputs alike must
never produce a 5xx, and every answer must match the documented status codes, content types and schemas."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from sdturbo.serve.app import create_app
from sdturbo.serve.engine import Engine
from sdturbo.serve.settings import ServeSettings

from fake_pipeline import FakePipeline
from serve_helpers import running_server

EXAMPLES_PER_OPERATION = 40
pytestmark = pytest.mark.slow

schema = schemathesis.openapi.from_dict(create_app(ServeSettings(), Engine(FakePipeline())).openapi())


@pytest.fixture(scope="module")
def fuzz_server():
    # Small images keep the run fast; sizes the schema allows but the server refuses are 422s, which is the point.
    with running_server(FakePipeline(), default_side_px=64, max_side_px=128) as s:
        yield s


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,  # the same examples in every CI run
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_makes_a_server_error(case, fuzz_server):
    case.call_and_validate(
        base_url=fuzz_server.url,
        timeout=30,
        checks=[not_a_server_error, content_type_conformance, response_schema_conformance],
    )
