"""Property-based fuzzing of the WSGI app against its own /openapi.json (schemathesis).

For every operation schemathesis generates valid (positive) and invalid (negative) requests and runs
its checks on each response: no 5xx, status codes / content types / headers / bodies conform to the
document, invalid input is rejected, unauthenticated requests are refused. Examples per operation
and mode are bounded (``MEMENTO_FUZZ_EXAMPLES``, default 25) so the module stays well under two
minutes.

The operations are parametrized from the document itself and each test drives schemathesis'
hypothesis strategy with ``@given`` (schemathesis' own lazy-fixture loader does not work with
pytest 9, and a module-level app would be import-time state).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from memento_edge import __version__
from memento_edge.openapi import build_openapi
from webfixtures import WebEnv

EXAMPLES = int(os.environ.get("MEMENTO_FUZZ_EXAMPLES", "25"))
_DOC = build_openapi(__version__)
# (method, path, mode): negative mode only where there is something to get wrong (parameters or a JSON
# body). Without either schemathesis cannot build an invalid request at all; and the NDJSON import body
# is described as a string, which any byte sequence on the wire is.
CASES = sorted(
    (method.upper(), path, mode)
    for path, item in _DOC["paths"].items() for method, op in item.items()
    for mode in (["positive", "negative"]
                 if op.get("parameters") or "application/json" in op.get("requestBody", {}).get("content", {})
                 else ["positive"]))


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: Any, value: Any) -> bytes:
    """The import body is described as a string: send it as UTF-8 bytes."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebEnv]:
    """One app for the whole module: a token with every scope, no rate limit, small body cap."""
    env = WebEnv(Path(tmp_path_factory.mktemp("fuzz")), tokens={"fuzzer": ["admin"]},
                 rate_limit_per_minute=0, max_body_bytes=256 * 1024)
    resp = env.client.post("/v1/memories", json={"items": [{"text": f"seed memory {i}"} for i in range(5)]},
                           headers=env.auth("fuzzer"))
    assert resp.status_code == 201
    yield env
    env.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_env: WebEnv) -> Any:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_env.app)
    # An invalid body that is also over max_body_bytes is refused with 413: a rejection too.
    schema.config.checks.negative_data_rejection.expected_statuses.append("413")
    return schema


@pytest.mark.parametrize("method, path, mode", CASES)
def test_api_conforms_to_its_openapi_document(api_schema: Any, fuzz_env: WebEnv, method: str, path: str,
                                              mode: str) -> None:
    """Every schemathesis check except positive_data_acceptance.

    That one is left out on purpose: the engine refuses values an OpenAPI 3.0 schema cannot express
    (whitespace-only text, unparseable timestamps, NUL characters, a date past the year 9999), so a
    schema-valid request may rightly get a 422. The reverse check - requests that violate the schema
    must be refused (negative_data_rejection) - runs, as do not_a_server_error, status code, content
    type, header and response-body conformance, and the auth checks.
    """
    operation = api_schema[path][method]
    headers = fuzz_env.auth("fuzzer")

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

    run()
