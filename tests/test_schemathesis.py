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
from typing import Any, Dict, Iterator, List

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from memento_edge import __version__
from memento_edge.openapi import build_openapi
from webfixtures import WebEnv

EXAMPLES = int(os.environ.get("MEMENTO_FUZZ_EXAMPLES", "25"))
SUMMARY: Dict[str, List[int]] = {}  # "METHOD path mode" -> statuses seen (filled by the fuzz test)
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
    config = SchemathesisConfig.from_dict({
        # Through the document's own security scheme, so schemathesis knows when a case is *meant* to
        # go without the token (negative and ignored-auth cases) instead of having it forced on.
        "auth": {"openapi": {"bearerAuth": {"bearer": fuzz_env.tokens["fuzzer"]}}},
        "checks": {
            # Left out on purpose: the engine refuses values an OpenAPI 3.0 schema cannot express
            # (whitespace-only text, unparseable timestamps, NUL characters, dates past 9999), so a
            # schema-valid request may rightly get a 422. The reverse - schema-violating requests must
            # be refused - is checked.
            "positive_data_acceptance": {"enabled": False},
            # An invalid body that is also over max_body_bytes is refused with 413: a rejection too.
            "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415,
                                                              422, 428, 429]},
        },
    })
    return schemathesis.openapi.from_wsgi("/openapi.json", fuzz_env.app, config=config)


@pytest.mark.parametrize("method, path, mode", CASES)
def test_api_conforms_to_its_openapi_document(api_schema: Any, fuzz_env: WebEnv, method: str, path: str,
                                              mode: str) -> None:
    """All default checks but positive_data_acceptance (see api_schema): no server error, documented
    status codes, content types, headers and response bodies, invalid input refused, auth enforced."""
    operation = api_schema[path][method]
    statuses: List[int] = []

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        statuses.append(case.call_and_validate().status_code)

    run()
    SUMMARY[f"{method} {path} {mode}"] = statuses
    if mode == "positive":
        # The token really was applied: valid requests got through (a fuzz run that only ever saw 401s
        # would "conform" while testing nothing). Random ids mostly name no memory: 404 is through too.
        through = (lambda c: 200 <= c < 300 or c == 404) if "{" in path else (lambda c: 200 <= c < 300)
        assert any(through(code) for code in statuses), (method, path, sorted(set(statuses)))


def test_summary() -> None:
    """Print what the fuzzing above did (visible with -s; also a guard that it ran at all)."""
    total = sum(len(v) for v in SUMMARY.values())
    by_status: Dict[int, int] = {}
    for codes in SUMMARY.values():
        for code in codes:
            by_status[code] = by_status.get(code, 0) + 1
    print(f"\nschemathesis: {len(SUMMARY)} operation/mode runs, {total} requests, "
          f"statuses {dict(sorted(by_status.items()))}")
    assert SUMMARY and total >= len(SUMMARY)


def _linked_successes(env: WebEnv) -> int:
    """2xx answers so far on /v1/memories/{memory_id}, read from the app's own /metrics."""
    text = env.client.get("/metrics", headers=env.auth("fuzzer")).data.decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith('memento_http_requests_total{route="/v1/memories/{memory_id}"')
               and 'status="2' in line)


def test_stateful_create_then_get_patch_delete(api_schema: Any, fuzz_env: WebEnv) -> None:
    """Chains along the document's links: POST /v1/memories -> GET / PATCH / DELETE that id.

    Finds what single calls cannot: an id the API hands out that it then cannot serve, update or
    delete (use_after_free, ensure_resource_availability run here too). Bounded like the rest.
    """
    before = _linked_successes(fuzz_env)
    machine = api_schema.as_state_machine()
    machine.run(settings=settings(max_examples=max(5, EXAMPLES // 2), stateful_step_count=6, deadline=None,
                                  derandomize=True, database=None, suppress_health_check=list(HealthCheck)))
    assert _linked_successes(fuzz_env) > before  # the links were followed to real memories
