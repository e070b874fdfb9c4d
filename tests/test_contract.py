"""One contract: live answers have exactly their OpenAPI schema's properties, and every limit the engine
enforces is stated in the document - probed with a value one past it.

The limits are read from the field tables of memento_edge.schema, so a field added there with a limit
the service does not enforce (or does not document) fails here.
"""
from __future__ import annotations

from dataclasses import fields as dataclass_fields
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from memento_edge import __version__
from memento_edge.memory import Hit, MemoryRecord, RememberResult
from memento_edge.openapi import build_openapi
from memento_edge.schema import (CREATE_FIELDS, FILTER_FIELDS, HIT_FIELDS, MAX_BATCH_ITEMS, MAX_BATCH_QUERIES,
                                 MAX_CURSOR_DIGITS, MAX_IDEMPOTENCY_KEY, MAX_LIST_LIMIT, RECALL_FIELDS,
                                 RECORD_FIELDS, REMEMBER_FIELDS, Field)
from webfixtures import WebEnv, web_fixture  # noqa: F401 - fixture

DOC = build_openapi(__version__)
SCHEMAS = DOC["components"]["schemas"]


def _props(name: str) -> set:
    return set(SCHEMAS[name]["properties"])


# --- answers and their schemas ----------------------------------------------------------------------
def test_live_answers_have_exactly_their_schema_properties(web: WebEnv) -> None:
    created = web.client.post("/v1/memories", json={"text": "the boiler was serviced in March",
                                                    "tags": ["house"], "metadata": {"by": "Ana"}})
    assert created.status_code == 201
    assert set(created.get_json()) == _props("RememberResult")
    batch = web.client.post("/v1/memories", json={"items": [{"text": "the gutter leaks"}]}).get_json()
    assert set(batch) == _props("RememberBatchResult")
    assert set(batch["items"][0]) == _props("RememberResult")

    got = web.client.get(f"/v1/memories/{created.get_json()['id']}")
    assert got.status_code == 200 and set(got.get_json()) == _props("Memory")
    page = web.client.get("/v1/memories").get_json()
    assert set(page) == _props("Page") and set(page["items"][0]) == _props("Memory")
    patched = web.client.patch(f"/v1/memories/{created.get_json()['id']}", json={"importance": 0.9})
    assert set(patched.get_json()) == _props("Memory")

    for mode in ("hybrid", "vector", "keyword"):
        result = web.client.post("/v1/recall", json={"query": "boiler serviced", "mode": mode}).get_json()
        assert set(result) == _props("RecallResult"), mode
        assert result["hits"], mode
        assert set(result["hits"][0]) == _props("Hit"), mode


def test_schema_tables_match_the_engine_result_types() -> None:
    """The tables describe the dataclasses the engine returns (so every face answers the same keys)."""
    assert [f.name for f in dataclass_fields(MemoryRecord)] == list(RECORD_FIELDS)
    assert [f.name for f in dataclass_fields(Hit)] == list(HIT_FIELDS)
    assert [f.name for f in dataclass_fields(RememberResult)] == list(REMEMBER_FIELDS)


def test_answer_schemas_require_every_property() -> None:
    for name in ("Memory", "Hit", "RememberResult", "RecallResult"):
        assert set(SCHEMAS[name]["required"]) == _props(name), name


# --- limits: stated in the document, enforced by the service ------------------------------------------
# Where a field of each table goes in a request, and the schema that describes it.
_PLACES = {"MemoryInput": CREATE_FIELDS, "RecallRequest": RECALL_FIELDS, "Filters": FILTER_FIELDS}


def _request(schema: str, name: str, value: Any) -> Tuple[str, Dict[str, Any]]:
    if schema == "MemoryInput":
        return "/v1/memories", {"text": "a memory", name: value} if name != "text" else {"text": value}
    if schema == "RecallRequest":
        return "/v1/recall", {"query": "a memory", name: value} if name != "query" else {"query": value}
    return "/v1/recall", {"query": "a memory", "filters": {name: value}}


def _past(f: Field) -> Iterator[Tuple[str, Any, Any]]:
    """``(OpenAPI keyword, stated value, a value one past it)`` for each limit of ``f``."""
    step = 1 if f.type in ("int", "time", "str") else 0.001
    if f.type == "object":
        if f.max_length is not None:
            yield "x-max-json-length", f.max_length, {"k": "x" * f.max_length}
        if f.max_key_length is not None:
            yield "x-max-key-length", f.max_key_length, {"k" * (f.max_key_length + 1): 1}
        return
    if f.max_length is not None:
        yield "maxLength", f.max_length, "x" * (f.max_length + 1)
    if f.min_length is not None:
        yield "minLength", f.min_length, "x" * (f.min_length - 1)
        yield "pattern", r"\S", " " * max(1, f.min_length)
    if f.max_items is not None:
        yield "maxItems", f.max_items, [f"t{i}" for i in range(f.max_items + 1)]
    if f.item_max_length is not None:
        yield "items.maxLength", f.item_max_length, ["x" * (f.item_max_length + 1)]
        yield "items.minLength", 1, [""]
    if f.enum is not None:
        yield "enum", list(f.enum), "not-" + f.enum[0]
    if f.type == "str" and f.minimum is not None and f.maximum is not None:  # an ISO-8601 time
        yield "x-earliest", "1970-01-01T00:00:00Z", "1969-12-31T23:59:59Z"
    elif f.minimum is not None:
        yield "minimum", f.minimum, f.minimum - step
    if f.maximum is not None and f.type != "str":
        yield "maximum", f.maximum, f.maximum + step


def _stated(schema: Dict[str, Any], keyword: str) -> Any:
    if keyword.startswith("items."):
        return schema["items"][keyword[len("items."):]]
    if "oneOf" in schema and keyword in ("minimum", "maximum"):  # a time: the Unix-seconds branch
        return next(s[keyword] for s in schema["oneOf"] if s.get("type") == "number")
    return schema[keyword]


LIMITS = [(schema, name, keyword, stated, past)
          for schema, table in _PLACES.items() for name, f in table.items()
          for keyword, stated, past in _past(f)]


def test_the_limit_probes_cover_every_field_with_a_limit() -> None:
    limited = {(s, n) for s, n, *_ in LIMITS}
    for schema, table in _PLACES.items():
        for name, f in table.items():
            has_limit = any(v is not None for v in (f.max_length, f.min_length, f.minimum, f.maximum,
                                                     f.max_items, f.item_max_length, f.enum, f.max_key_length))
            assert has_limit == ((schema, name) in limited), (schema, name)
    assert len(LIMITS) >= 30


@pytest.mark.parametrize("schema, name, keyword, stated, past", LIMITS,
                         ids=[f"{s}.{n}.{k}" for s, n, k, *_ in LIMITS])
def test_each_limit_is_stated_and_one_past_it_is_refused(web: WebEnv, schema: str, name: str, keyword: str,
                                                         stated: Any, past: Any) -> None:
    assert _stated(SCHEMAS[schema]["properties"][name], keyword) == stated
    path, body = _request(schema, name, past)
    resp = web.client.post(path, json=body)
    assert resp.status_code == 422, (resp.status_code, resp.get_json())
    assert name in resp.get_json()["error"].get("field", ""), resp.get_json()


def _param(path: str, method: str, name: str) -> Dict[str, Any]:
    params: List[Dict[str, Any]] = DOC["paths"][path][method]["parameters"]
    return next(p["schema"] for p in params if p["name"] == name)


def test_count_and_parameter_limits_are_stated_and_enforced(web: WebEnv) -> None:
    items = SCHEMAS["MemoryBatch"]["properties"]["items"]
    assert items["maxItems"] == MAX_BATCH_ITEMS and items["minItems"] == 1
    resp = web.client.post("/v1/memories", json={"items": [{"text": "x"}] * (MAX_BATCH_ITEMS + 1)})
    assert resp.status_code == 422 and resp.get_json()["error"]["field"] == "items"
    assert web.client.post("/v1/memories", json={"items": []}).status_code == 422

    queries = SCHEMAS["RecallBatch"]["properties"]["queries"]
    assert queries["maxItems"] == MAX_BATCH_QUERIES and queries["minItems"] == 1
    resp = web.client.post("/v1/recall/batch", json={"queries": [{"query": "x"}] * (MAX_BATCH_QUERIES + 1)})
    assert resp.status_code == 422 and resp.get_json()["error"]["field"] == "queries"

    limit = _param("/v1/memories", "get", "limit")
    assert (limit["minimum"], limit["maximum"]) == (1, MAX_LIST_LIMIT)
    assert web.client.get(f"/v1/memories?limit={MAX_LIST_LIMIT + 1}").status_code == 422
    assert web.client.get("/v1/memories?limit=0").status_code == 422
    assert web.client.get(f"/v1/memories?limit={MAX_LIST_LIMIT}").status_code == 200

    assert _param("/v1/memories", "get", "cursor")["pattern"] == f"^[0-9]{{1,{MAX_CURSOR_DIGITS}}}$"
    assert web.client.get("/v1/memories?cursor=" + "9" * (MAX_CURSOR_DIGITS + 1)).status_code == 422

    collection = _param("/v1/memories", "get", "collection")["maxLength"]
    assert web.client.get("/v1/memories?collection=" + "c" * (collection + 1)).status_code == 422

    topk = _param("/v1/recall", "get", "topk")
    assert (topk["minimum"], topk["maximum"]) == (RECALL_FIELDS["topk"].minimum, RECALL_FIELDS["topk"].maximum)
    assert web.client.get(f"/v1/recall?q=x&topk={topk['maximum'] + 1}").status_code == 422
    floor = _param("/v1/recall", "get", "min_score")
    assert (floor["type"], floor["minimum"], floor["maximum"]) == (
        "number", RECALL_FIELDS["min_score"].minimum, RECALL_FIELDS["min_score"].maximum)
    assert web.client.get(f"/v1/recall?q=x&min_score={floor['maximum'] + 0.5}").status_code == 422
    assert web.client.get(f"/v1/recall?q=x&min_score={floor['maximum']}").status_code == 200
    assert _param("/v1/recall", "get", "q")["maxLength"] == RECALL_FIELDS["query"].max_length
    assert web.client.get("/v1/recall?q=" + "x" * (RECALL_FIELDS["query"].max_length + 1)).status_code == 422

    key = _param("/v1/memories", "post", "Idempotency-Key")
    assert key["maxLength"] == MAX_IDEMPOTENCY_KEY
    resp = web.client.post("/v1/memories", json={"text": "x"},
                           headers={"Idempotency-Key": "k" * (MAX_IDEMPOTENCY_KEY + 1)})
    assert resp.status_code == 400 and resp.get_json()["error"]["field"] == "Idempotency-Key"


def test_values_at_the_limits_are_accepted(web: WebEnv) -> None:
    at_limit = {"text": "x" * CREATE_FIELDS["text"].max_length, "collection": "c" * 200,
                "tags": ["t" * 100] + [f"t{i}" for i in range(49)], "importance": 1.0,
                "metadata": {"k": "x" * (CREATE_FIELDS["metadata"].max_length - 9)},
                "created_at": CREATE_FIELDS["created_at"].maximum}
    assert web.client.post("/v1/memories", json=at_limit).status_code == 201
    recall = {"query": "x" * RECALL_FIELDS["query"].max_length, "topk": RECALL_FIELDS["topk"].maximum,
              "filters": {"min_importance": 1.0, "since": "1970-01-01T00:00:00Z", "metadata": {"k" * 100: 1}}}
    assert web.client.post("/v1/recall", json=recall).status_code == 200
