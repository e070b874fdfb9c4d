"""The HTTP API through Flask's test client: every route, status code and error code.

A Memory on a temporary database with the deterministic FakeEmbedder stands behind the app (the real
model and real sockets are covered by test_http_server.py).
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memento_edge.errors import (Busy, EmbedTimeout, ModelMismatch, StorageFull, StoreError)
from memento_edge.governor import Governor
from memento_edge.web import RateLimiter, route_template
from webfixtures import MissingModelEmbedder, WebEnv, authed_fixture, make_env, web_fixture  # noqa: F401

MB = 1024 * 1024


def error_of(resp: Any) -> Dict[str, Any]:
    """The ``error`` object of a JSON error response (asserting the one error shape)."""
    assert resp.mimetype == "application/json", resp.data[:200]
    body = resp.get_json()
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "field"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def remember(env: WebEnv, text: str, **fields: Any) -> int:
    resp = env.client.post("/v1/memories", json=dict(fields, text=text))
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["id"]


# --- health, page, schema -------------------------------------------------------------------------
def test_healthz_answers_without_auth(authed: WebEnv) -> None:
    resp = authed.client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "ok"


def test_readyz_reports_db_model_and_backend(web: WebEnv) -> None:
    body = web.client.get("/readyz").get_json()
    assert body["ready"] is True and body["db"]["writable"] is True
    assert body["model"] == {"state": "unloaded", "loaded": False, "backend": "fake"}
    remember(web, "warm the model up")
    assert web.client.get("/readyz").get_json()["model"]["state"] == "loaded"


def test_readyz_is_ready_but_says_model_missing(tmp_path) -> None:
    env = make_env(tmp_path, embedder=MissingModelEmbedder())
    try:
        resp = env.client.get("/readyz")
        assert resp.status_code == 200
        assert resp.get_json()["model"]["state"] == "missing"
        assert "model build" in resp.get_json()["model"]["error"]
    finally:
        env.close()


def test_readyz_503_when_database_unusable(web: WebEnv) -> None:
    web.memory.close()  # a closed store raises StoreError, as an unusable database would
    resp = web.client.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["ready"] is False and resp.headers["Retry-After"]


def test_index_page_is_html_with_strict_csp(web: WebEnv) -> None:
    resp = web.client.get("/")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    assert b"memento-edge" in resp.data
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["X-Frame-Options"] == "DENY"


def _token_card_tag(html: str) -> str:
    match = re.search(r'<details id="token-card"[^>]*>', html)
    assert match, "the page has no token card"
    return match.group(0)


def test_token_card_is_folded_when_no_token_is_needed(web: WebEnv, authed: WebEnv) -> None:
    """#15 finding 8: with no token configured (loopback only) the card must not fill the first screen."""
    open_card = _token_card_tag(web.client.get("/").get_data(as_text=True))
    assert " open" not in open_card and 'data-auth-required="no"' in open_card
    needed = _token_card_tag(authed.client.get("/").get_data(as_text=True))
    assert " open" in needed and 'data-auth-required="yes"' in needed


def test_index_page_placeholder_when_template_missing(web: WebEnv, tmp_path) -> None:
    web.app.template_folder = str(tmp_path / "no-templates")
    web.app.jinja_env.loader = web.app.create_global_jinja_loader()
    web.app.jinja_loader.searchpath = [str(tmp_path / "no-templates")]  # type: ignore[union-attr]
    resp = web.client.get("/")
    assert resp.status_code == 200 and b"/openapi.json" in resp.data


# --- create ---------------------------------------------------------------------------------------
def test_create_one_returns_201_id_and_location(web: WebEnv) -> None:
    resp = web.client.post("/v1/memories", json={"text": "the kettle is in the left cupboard",
                                                 "collection": "home", "tags": ["kitchen"],
                                                 "importance": 0.9, "metadata": {"room": "kitchen"},
                                                 "source": "agent", "session_id": "s1"})
    assert resp.status_code == 201
    body = resp.get_json()
    assert body["created"] is True and isinstance(body["id"], int)
    assert resp.headers["Location"] == f"/v1/memories/{body['id']}"
    got = web.client.get(resp.headers["Location"]).get_json()
    assert got["text"] == "the kettle is in the left cupboard"
    assert got["collection"] == "home" and got["tags"] == ["kitchen"]
    assert got["metadata"] == {"room": "kitchen"}


def test_create_same_text_again_returns_200_and_existing_id(web: WebEnv) -> None:
    first = remember(web, "same words")
    resp = web.client.post("/v1/memories", json={"text": "same words"})
    assert resp.status_code == 200
    assert resp.get_json() == {"id": first, "created": False, "duplicate_of": first, "embedding": "done"}


def test_create_batch_returns_ids_in_order(web: WebEnv) -> None:
    resp = web.client.post("/v1/memories", json={"items": [{"text": "one"}, {"text": "two", "tags": ["t"]}]})
    assert resp.status_code == 201
    items = resp.get_json()["items"]
    assert [web.client.get(f"/v1/memories/{i['id']}").get_json()["text"] for i in items] == ["one", "two"]


def test_a_write_body_is_not_kept_on_the_request_while_it_is_stored(web: WebEnv) -> None:
    """A 2 MiB batch would otherwise hold its raw bytes next to the parsed texts while they are embedded."""
    from flask import request

    from memento_edge.web.requests import json_body

    body = json.dumps({"items": [{"text": "one"}, {"text": "two"}]})
    with web.app.test_request_context("/v1/memories", method="POST", data=body, content_type="application/json"):
        assert json_body() == {"items": [{"text": "one"}, {"text": "two"}]}
        assert getattr(request, "_cached_data", None) is None


def test_create_batch_names_the_bad_item(web: WebEnv) -> None:
    resp = web.client.post("/v1/memories", json={"items": [{"text": "ok"}, {"text": 5}]})
    assert resp.status_code == 400
    assert error_of(resp)["field"] == "items[1].text"
    assert web.memory.count() == 0


@pytest.mark.parametrize("body, status, field", [
    ({"items": [{"text": "a"}], "text": "b"}, 400, "text"),
    ({"items": "nope"}, 400, "items"),
    ({"items": []}, 422, "items"),
    ({"items": [{"text": str(i)} for i in range(1001)]}, 422, "items"),
])
def test_create_batch_shape_errors(web: WebEnv, body: Dict[str, Any], status: int, field: str) -> None:
    resp = web.client.post("/v1/memories", json=body)
    assert resp.status_code == status
    assert error_of(resp)["field"] == field


@pytest.mark.parametrize("body, field", [
    ({"text": 5}, "text"),
    ({"text": "x", "tags": "a,b"}, "tags"),
    ({"text": "x", "tags": [1]}, "tags"),
    ({"text": "x", "importance": True}, "importance"),
    ({"text": "x", "importance": "high"}, "importance"),
    ({"text": "x", "metadata": [1, 2]}, "metadata"),
    ({"text": "x", "collection": None}, "collection"),
    ({"text": "x", "colour": "red"}, "colour"),
    ({"tags": ["x"]}, "text"),
])
def test_create_wrong_types_and_unknown_fields_are_400(web: WebEnv, body: Dict[str, Any], field: str) -> None:
    resp = web.client.post("/v1/memories", json=body)
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["code"] == "invalid_input" and err["field"] == field


@pytest.mark.parametrize("body, field", [
    ({"text": "   "}, "text"),
    ({"text": "x" * 100_001}, "text"),
    ({"text": "x", "importance": 1.5}, "importance"),
    ({"text": "x", "tags": ["t"] * 51}, "tags"),
    ({"text": "x", "tags": ["t" * 101]}, "tags"),
    ({"text": "x", "created_at": "yesterday"}, "created_at"),
])
def test_create_values_refused_by_the_engine_are_422(web: WebEnv, body: Dict[str, Any], field: str) -> None:
    resp = web.client.post("/v1/memories", json=body)
    assert resp.status_code == 422
    err = error_of(resp)
    assert err["code"] == "invalid_input" and err["field"] == field


# --- malformed requests never give a 500 ----------------------------------------------------------
@pytest.mark.parametrize("raw, code", [
    (b"{bad json", "invalid_json"),
    (b"", "invalid_input"),
    (b"[1, 2]", "invalid_json"),
    (b'"just a string"', "invalid_json"),
    (b'{"text": NaN}', "invalid_json"),
    (b'{"text": "x", "importance": Infinity}', "invalid_json"),
    (b'{"text": "x", "importance": 1e999}', "invalid_json"),
    (b'{"text": "x", "importance": ' + b"9" * 5000 + b"}", "invalid_json"),
    (b'{"text": "\xff\xfe"}', "invalid_json"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    (b'{"text": "a\\u0000b"}', "invalid_input"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_input"),
    (b'{"text": "x", "tags": ["a\\u0000"]}', "invalid_input"),
    (b'{"text": "x", "collection": "c\\u0000"}', "invalid_input"),
])
def test_malformed_bodies_are_400_with_json_error(web: WebEnv, raw: bytes, code: str) -> None:
    resp = web.client.post("/v1/memories", data=raw, content_type="application/json")
    assert resp.status_code == 400, resp.data[:300]
    assert error_of(resp)["code"] == code
    assert web.memory.count() == 0


def test_metadata_is_stored_as_json_so_nul_and_big_numbers_are_fine(web: WebEnv) -> None:
    meta = {"a\u0000b": 123456789012345678901234567890, "nested": {"x": [1, "\u0000"]}}
    resp = web.client.post("/v1/memories", json={"text": "with odd metadata", "metadata": meta})
    assert resp.status_code == 201
    assert web.client.get(resp.headers["Location"]).get_json()["metadata"] == meta


def test_huge_int_in_a_metadata_filter_is_400(web: WebEnv) -> None:
    resp = web.client.post("/v1/recall", json={"query": "x", "filters": {"metadata": {"n": 10 ** 30}}})
    assert resp.status_code == 400 and error_of(resp)["field"] == "filters.metadata.n"


@pytest.mark.parametrize("created_at", [1e300, -5, "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-05:00"])
def test_created_at_outside_1970_to_9999_is_422(web: WebEnv, created_at: Any) -> None:
    resp = web.client.post("/v1/memories", json={"text": "when?", "created_at": created_at})
    assert resp.status_code == 422 and error_of(resp)["field"] == "created_at"
    assert web.client.get("/v1/memories").status_code == 200


def test_created_at_is_kept(web: WebEnv) -> None:
    resp = web.client.post("/v1/memories", json={"text": "old note", "created_at": "2021-03-04T05:06:07Z"})
    assert resp.status_code == 201
    assert web.client.get(resp.headers["Location"]).get_json()["created_at"].startswith("2021-03-04T05:06:07")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x",
                                          "application/json; charset=latin-1"])
def test_wrong_content_type_is_415(web: WebEnv, content_type: str) -> None:
    resp = web.client.post("/v1/memories", data=b'{"text": "x"}', content_type=content_type)
    assert resp.status_code == 415
    assert error_of(resp)["code"] == "unsupported_media_type"


def test_json_suffix_content_type_is_accepted(web: WebEnv) -> None:
    resp = web.client.post("/v1/memories", data=b'{"text": "x"}',
                           content_type="application/merge-patch+json; charset=utf-8")
    assert resp.status_code == 201


def test_body_over_max_body_bytes_is_413(tmp_path) -> None:
    env = make_env(tmp_path, max_body_bytes=1000)
    try:
        resp = env.client.post("/v1/memories", json={"text": "x" * 2000})
        assert resp.status_code == 413
        assert error_of(resp)["code"] == "payload_too_large"
        ok = env.client.post("/v1/memories", json={"text": "x" * 500})
        assert ok.status_code == 201
        assert env.memory.count() == 1
    finally:
        env.close()


def test_unknown_route_is_json_404(web: WebEnv) -> None:
    resp = web.client.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert error_of(resp)["code"] == "not_found"


def test_wrong_method_is_json_405_with_allow(web: WebEnv) -> None:
    resp = web.client.put("/v1/memories", json={"text": "x"})
    assert resp.status_code == 405
    assert error_of(resp)["code"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"] and "GET" in resp.headers["Allow"]


def test_unexpected_error_is_500_without_traceback(web: WebEnv, monkeypatch) -> None:
    def boom() -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(web.memory, "stats", boom)
    resp = web.client.get("/v1/stats")
    assert resp.status_code == 500
    err = error_of(resp)
    assert err["code"] == "internal"
    assert b"Traceback" not in resp.data and b"secret internal detail" not in resp.data


@pytest.mark.parametrize("exc, status, code, retry_after", [
    (Busy("database busy", retry_after=2.5), 503, "busy", "3"),
    (EmbedTimeout("embedding took too long", retry_after=1), 503, "timeout", "1"),
    (StorageFull("disk full"), 507, "storage_full", None),
    (ModelMismatch("run reindex"), 503, "model_mismatch", None),
    (StoreError("database is corrupt"), 503, "store_error", "30"),
])
def test_domain_errors_map_to_status_and_retry_after(web: WebEnv, monkeypatch, exc: Exception, status: int,
                                                     code: str, retry_after: Any) -> None:
    def fail(*a: Any, **k: Any) -> None:
        raise exc

    monkeypatch.setattr(web.memory, "remember_many", fail)
    resp = web.client.post("/v1/memories", json={"text": "x"})
    assert resp.status_code == status
    assert error_of(resp)["code"] == code
    assert resp.headers.get("Retry-After") == retry_after


# --- get / patch / delete -------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/memories/999", "/v1/memories/0", "/v1/memories/-1",
                                  "/v1/memories/99999999999999999999999999", "/v1/memories/abc"])
def test_get_absent_or_impossible_id_is_404(web: WebEnv, path: str) -> None:
    resp = web.client.get(path)
    assert resp.status_code == 404
    assert error_of(resp)["code"] == "not_found"


def test_patch_changes_fields_and_reembeds_text(web: WebEnv) -> None:
    mid = remember(web, "old words here", tags=["a"], metadata={"k": 1})
    before = web.embedder.embed_count
    resp = web.client.patch(f"/v1/memories/{mid}", json={"text": "brand new sentence", "tags": [],
                                                         "importance": 0.1, "metadata": None})
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["text"] == "brand new sentence" and body["tags"] == [] and body["importance"] == 0.1
    assert body["metadata"] == {}
    assert web.embedder.embed_count == before + 1
    hits = web.client.post("/v1/recall", json={"query": "brand new sentence", "mode": "vector", "topk": 1})
    assert hits.get_json()["hits"][0]["id"] == mid


def test_patch_without_text_does_not_embed(web: WebEnv) -> None:
    mid = remember(web, "some text")
    before = web.embedder.embed_count
    resp = web.client.patch(f"/v1/memories/{mid}", json={"collection": "other"})
    assert resp.status_code == 200 and resp.get_json()["collection"] == "other"
    assert web.embedder.embed_count == before


@pytest.mark.parametrize("body, status, field", [
    ({}, 400, None),
    ({"text": None}, 400, "text"),
    ({"source": None}, 400, "source"),
    ({"text": 7}, 400, "text"),
    ({"created_at": "2020-01-01"}, 400, "created_at"),
    ({"importance": -1}, 422, "importance"),
])
def test_patch_errors(web: WebEnv, body: Dict[str, Any], status: int, field: Any) -> None:
    mid = remember(web, "patch me")
    resp = web.client.patch(f"/v1/memories/{mid}", json=body)
    assert resp.status_code == status
    assert error_of(resp).get("field") == field


def test_patch_absent_is_404(web: WebEnv) -> None:
    resp = web.client.patch("/v1/memories/12345", json={"importance": 0.2})
    assert resp.status_code == 404


def test_delete_then_404(web: WebEnv) -> None:
    mid = remember(web, "delete me")
    resp = web.client.delete(f"/v1/memories/{mid}")
    assert resp.status_code == 204 and resp.data == b""
    assert web.client.get(f"/v1/memories/{mid}").status_code == 404
    assert web.client.delete(f"/v1/memories/{mid}").status_code == 404


# --- list -----------------------------------------------------------------------------------------
def test_list_pages_newest_first_until_no_cursor(web: WebEnv) -> None:
    ids = [remember(web, f"memory number {i}") for i in range(5)]
    remember(web, "in another collection", collection="other")
    seen: List[int] = []
    cursor = None
    for _ in range(10):
        url = "/v1/memories?collection=default&limit=2" + (f"&cursor={cursor}" if cursor else "")
        body = web.client.get(url).get_json()
        seen += [m["id"] for m in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


@pytest.mark.parametrize("query, status, field", [
    ("limit=0", 422, "limit"),
    ("limit=1001", 422, "limit"),
    ("limit=ten", 400, "limit"),
    ("limit=", 400, "limit"),
    ("limit=" + "9" * 40, 400, "limit"),
    ("cursor=abc", 422, "cursor"),
    ("cursor=" + "9" * 30, 422, "cursor"),
    ("collection=a%00b", 400, "collection"),
])
def test_list_bad_parameters(web: WebEnv, query: str, status: int, field: str) -> None:
    resp = web.client.get("/v1/memories?" + query)
    assert resp.status_code == status
    assert error_of(resp)["field"] == field


# --- recall ---------------------------------------------------------------------------------------
def _seed(env: WebEnv) -> Dict[str, int]:
    return {
        "cat": remember(env, "the cat sleeps on the warm windowsill", tags=["pets"]),
        "car": remember(env, "the car needs new tyres before winter", tags=["car"], collection="errands"),
        "tea": remember(env, "green tea steeps for three minutes", tags=["kitchen"]),
    }


def test_recall_post_hybrid_vector_keyword(web: WebEnv) -> None:
    ids = _seed(web)
    for mode in ("hybrid", "vector", "keyword"):
        resp = web.client.post("/v1/recall", json={"query": "cat windowsill", "mode": mode, "topk": 2})
        assert resp.status_code == 200
        body = resp.get_json()
        assert body["mode"] == mode and body["note"] is None
        assert body["hits"][0]["id"] == ids["cat"] and len(body["hits"]) <= 2
        assert {"score", "vector_rank", "keyword_rank", "text"} <= set(body["hits"][0])


def test_recall_min_score_and_hit_evidence(web: WebEnv) -> None:
    ids = _seed(web)
    body = web.client.post("/v1/recall", json={"query": "cat windowsill", "topk": 3}).get_json()
    top = body["hits"][0]
    assert top["id"] == ids["cat"] and top["matched_terms"] == ["cat", "windowsill"]
    assert 0.0 <= top["score"] <= 1.0 and isinstance(top["similarity"], float)
    floor = top["score"]
    body = web.client.post("/v1/recall", json={"query": "cat windowsill", "topk": 3, "min_score": floor}).get_json()
    assert [h["id"] for h in body["hits"]] == [ids["cat"]] or all(h["score"] >= floor for h in body["hits"])
    resp = web.client.post("/v1/recall", json={"query": "cat", "min_score": "high"})
    assert resp.status_code == 400 and resp.get_json()["error"]["field"] == "min_score"
    resp = web.client.post("/v1/recall", json={"query": "cat", "min_score": 7})
    assert resp.status_code == 422 and resp.get_json()["error"]["field"] == "min_score"


def test_recall_filters(web: WebEnv) -> None:
    ids = _seed(web)
    body = web.client.post("/v1/recall", json={"query": "the", "topk": 10, "mode": "keyword",
                                               "filters": {"collection": "errands"}}).get_json()
    assert [h["id"] for h in body["hits"]] == [ids["car"]]


@pytest.mark.parametrize("body, status, field", [
    ({"query": ""}, 422, "query"),
    ({"query": "x" * 1001}, 422, "query"),
    ({"query": "x", "topk": 0}, 422, "topk"),
    ({"query": "x", "topk": 101}, 422, "topk"),
    ({"query": "x", "topk": "5"}, 400, "topk"),
    ({"query": "x", "mode": "fuzzy"}, 422, "mode"),
    ({"query": "x", "filters": {"colour": "red"}}, 400, "filters.colour"),
    ({"query": "x", "filters": {"tags_any": "a"}}, 400, "filters.tags_any"),
    ({"query": "x", "filters": {"since": "not a date"}}, 422, "filters.since"),
    ({"query": "x", "filters": []}, 400, "filters"),
    ({"topk": 3}, 400, "query"),
    ({"query": "x", "extra": 1}, 400, "extra"),
])
def test_recall_errors(web: WebEnv, body: Dict[str, Any], status: int, field: str) -> None:
    resp = web.client.post("/v1/recall", json=body)
    assert resp.status_code == status
    assert error_of(resp)["field"] == field


def test_recall_get(web: WebEnv) -> None:
    ids = _seed(web)
    body = web.client.get("/v1/recall?q=tyres%20winter&topk=1&mode=keyword").get_json()
    assert body["mode"] == "keyword" and [h["id"] for h in body["hits"]] == [ids["car"]]
    body = web.client.get("/v1/recall?q=the&topk=10&collection=errands").get_json()
    assert [h["id"] for h in body["hits"]] == [ids["car"]]


def test_recall_get_min_score_drops_weak_hits(web: WebEnv) -> None:
    ids = _seed(web)
    every = web.client.get("/v1/recall?q=cat%20windowsill&topk=3").get_json()["hits"]
    assert len(every) == 3 and every[0]["id"] == ids["cat"]
    floor = every[0]["score"]
    body = web.client.get(f"/v1/recall?q=cat%20windowsill&topk=3&min_score={floor!r}").get_json()
    assert [h["id"] for h in body["hits"]] == [h["id"] for h in every if h["score"] >= floor]
    assert body["hits"] and len(body["hits"]) < 3
    assert web.client.get("/v1/recall?q=cat&min_score=-1").get_json()["hits"]


@pytest.mark.parametrize("query, status, field", [
    ("", 400, "q"), ("q=x&topk=abc", 400, "topk"), ("q=x&topk=", 400, "topk"), ("q=x&topk=0", 422, "topk"),
    ("q=x&mode=nope", 422, "mode"), ("q=x&min_score=high", 400, "min_score"), ("q=x&min_score=", 400, "min_score"),
    ("q=x&min_score=nan", 400, "min_score"), ("q=x&min_score=inf", 400, "min_score"),
    ("q=x&min_score=1.5", 422, "min_score"), ("q=x&min_score=-2", 422, "min_score"),
])
def test_recall_get_errors(web: WebEnv, query: str, status: int, field: str) -> None:
    resp = web.client.get("/v1/recall?" + query)
    assert resp.status_code == status
    assert error_of(resp)["field"] == field


def test_recall_batch(web: WebEnv) -> None:
    ids = _seed(web)
    resp = web.client.post("/v1/recall/batch", json={"queries": [
        {"query": "cat", "mode": "keyword", "topk": 1}, {"query": "green tea", "topk": 1}]})
    assert resp.status_code == 200
    results = resp.get_json()["results"]
    assert [r["hits"][0]["id"] for r in results] == [ids["cat"], ids["tea"]]


@pytest.mark.parametrize("body, status, field", [
    ({"queries": []}, 422, "queries"),
    ({"queries": [{"query": "x"}] * 33}, 422, "queries"),
    ({"queries": [{"query": "x", "k": 1}]}, 400, "queries[0].k"),
    ({"queries": "x"}, 400, "queries"),
    ({}, 400, "queries"),
])
def test_recall_batch_errors(web: WebEnv, body: Dict[str, Any], status: int, field: str) -> None:
    resp = web.client.post("/v1/recall/batch", json=body)
    assert resp.status_code == status
    assert error_of(resp)["field"] == field


# --- model missing --------------------------------------------------------------------------------
def test_model_missing_recall_degrades_to_keyword_and_writes_503(tmp_path) -> None:
    good = make_env(tmp_path)
    _seed(good)
    db = good.settings.db
    good.close()
    env = WebEnv(tmp_path / "web-0", embedder=MissingModelEmbedder(), db=db)
    try:
        body = env.client.post("/v1/recall", json={"query": "cat windowsill"}).get_json()
        assert body["mode"] == "keyword" and "model" in body["note"] and body["hits"]
        resp = env.client.post("/v1/memories", json={"text": "new memory"})
        assert resp.status_code == 503
        err = error_of(resp)
        assert err["code"] == "model_unavailable" and "model build" in err["message"]
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        env.close()


# --- stats, export, import, backup ----------------------------------------------------------------
def test_stats(web: WebEnv) -> None:
    _seed(web)
    body = web.client.get("/v1/stats").get_json()
    assert body["memories"] == 3
    assert body["server"]["governor"]["state"] == "ok" and body["server"]["auth"] == "open"


def test_export_is_ndjson_and_import_round_trips(web: WebEnv, tmp_path) -> None:
    _seed(web)
    resp = web.client.get("/v1/export")
    assert resp.status_code == 200 and resp.mimetype == "application/x-ndjson"
    assert "attachment" in resp.headers["Content-Disposition"]
    lines = resp.data.decode("utf-8").splitlines()
    assert len(lines) == 3
    assert "green tea steeps for three minutes" in {json.loads(ln)["text"] for ln in lines}
    other = make_env(tmp_path)
    try:
        imp = other.client.post("/v1/import", data=resp.data, content_type="application/x-ndjson")
        assert imp.status_code == 200
        assert imp.get_json()["imported"] == 3 and imp.get_json()["error_count"] == 0
        assert other.memory.count() == 3
        again = other.client.post("/v1/import", data=resp.data, content_type="application/x-ndjson")
        assert again.get_json()["duplicates"] == 3 and other.memory.count() == 3
    finally:
        other.close()


def test_export_of_empty_database(web: WebEnv) -> None:
    resp = web.client.get("/v1/export")
    assert resp.status_code == 200 and resp.data == b""


def test_import_reports_bad_lines_and_keeps_good_ones(web: WebEnv) -> None:
    body = '{"text": "good one"}\n{"text": ""}\n\n{"text": "good two", "tags": ["x"]}\n'
    resp = web.client.post("/v1/import", data=body.encode(), content_type="application/x-ndjson")
    assert resp.status_code == 200
    out = resp.get_json()
    assert out["imported"] == 2 and out["error_count"] == 1 and out["errors"][0]["line"] == 2


@pytest.mark.parametrize("data, content_type, status", [
    (b'{"text": "x"}\n', "application/json", 415),
    (b'{"text": "\xff"}\n', "application/x-ndjson", 400),
    (b'{"text": "a\\u0000"}\n', "application/x-ndjson", 400),
    (b'{"text": "ok"}\n{not json\n', "application/x-ndjson", 400),
])
def test_import_errors(web: WebEnv, data: bytes, content_type: str, status: int) -> None:
    resp = web.client.post("/v1/import", data=data, content_type=content_type)
    assert resp.status_code == status
    error_of(resp)
    assert web.memory.count() == 0


def test_backup_writes_a_file_under_home(web: WebEnv) -> None:
    _seed(web)
    resp = web.client.post("/v1/backup")
    assert resp.status_code == 201
    body = resp.get_json()
    path = web.settings.home_path / "backups"
    assert body["path"].startswith(str(path)) and body["bytes"] > 0
    assert (path / body["path"].rsplit("/", 1)[1]).exists()


def test_backup_refuses_a_client_chosen_path(web: WebEnv) -> None:
    resp = web.client.post("/v1/backup", json={"dest": "/etc/passwd"})
    assert resp.status_code == 400 and error_of(resp)["field"] == "dest"


# --- idempotency ----------------------------------------------------------------------------------
def test_idempotency_key_replays_first_result(web: WebEnv) -> None:
    headers = {"Idempotency-Key": "req-123"}
    first = web.client.post("/v1/memories", json={"text": "only once please"}, headers=headers)
    # Delete it so a second *execution* would create a new memory with a new id.
    web.client.delete(f"/v1/memories/{first.get_json()['id']}")
    second = web.client.post("/v1/memories", json={"text": "only once please"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.get_json() == first.get_json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert web.memory.count() == 0  # the retry did not store it again


def test_idempotency_same_key_two_times_one_memory(web: WebEnv) -> None:
    headers = {"Idempotency-Key": "batch-1"}
    body = {"items": [{"text": "alpha"}, {"text": "beta"}]}
    a = web.client.post("/v1/memories", json=body, headers=headers)
    b = web.client.post("/v1/memories", json=body, headers=headers)
    assert a.get_json() == b.get_json() and web.memory.count() == 2


def test_idempotency_same_key_other_body_is_409(web: WebEnv) -> None:
    headers = {"Idempotency-Key": "k-1"}
    assert web.client.post("/v1/memories", json={"text": "first"}, headers=headers).status_code == 201
    resp = web.client.post("/v1/memories", json={"text": "second"}, headers=headers)
    assert resp.status_code == 409
    err = error_of(resp)
    assert err["code"] == "conflict" and err["field"] == "Idempotency-Key"
    assert web.memory.count() == 1


def test_idempotency_failed_request_is_not_remembered(web: WebEnv) -> None:
    headers = {"Idempotency-Key": "k-2"}
    bad = web.client.post("/v1/memories", json={"text": "x", "importance": 7}, headers=headers)
    assert bad.status_code == 422
    assert web.client.post("/v1/memories", json={"text": "x", "importance": 0.7},
                           headers=headers).status_code == 201


def test_idempotency_keys_are_per_token(authed: WebEnv) -> None:
    headers = {"Idempotency-Key": "shared"}
    a = authed.client.post("/v1/memories", json={"text": "from rw"}, headers={**headers, **authed.auth("rw")})
    b = authed.client.post("/v1/memories", json={"text": "from writer"},
                           headers={**headers, **authed.auth("writer")})
    assert a.status_code == b.status_code == 201 and a.get_json()["id"] != b.get_json()["id"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 201, "caf\u00e9"])
def test_idempotency_key_must_be_printable_ascii(web: WebEnv, key: str) -> None:
    resp = web.client.post("/v1/memories", json={"text": "x"},
                           headers=[("Idempotency-Key", key.encode("utf-8").decode("latin-1"))])
    assert resp.status_code == 400 and error_of(resp)["field"] == "Idempotency-Key"


# --- rate limiting --------------------------------------------------------------------------------
def test_rate_limit_429_with_retry_after(tmp_path) -> None:
    env = make_env(tmp_path, rate_limit_per_minute=3)
    try:
        codes = [env.client.get("/v1/stats").status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        resp = env.client.get("/v1/stats")
        assert resp.status_code == 429
        assert error_of(resp)["code"] == "rate_limited"
        assert resp.headers["Retry-After"] == "20"  # one token refills in 60/3 s
        assert env.client.get("/healthz").status_code == 200  # liveness is never limited
    finally:
        env.close()


def test_rate_limit_is_per_token_and_counts_bad_tokens_by_address(tmp_path) -> None:
    env = make_env(tmp_path, rate_limit_per_minute=2, tokens={"a": ["read"], "b": ["read"]})
    try:
        for _ in range(2):
            assert env.client.get("/v1/stats", headers=env.auth("a")).status_code == 200
        assert env.client.get("/v1/stats", headers=env.auth("a")).status_code == 429
        assert env.client.get("/v1/stats", headers=env.auth("b")).status_code == 200
        bad = {"Authorization": "Bearer mem_wrong"}
        assert [env.client.get("/v1/stats", headers=bad).status_code for _ in range(3)] == [401, 401, 429]
    finally:
        env.close()


def test_rate_limiter_refills_and_bounds_its_memory() -> None:
    now = [0.0]
    rl = RateLimiter(60, max_keys=3, clock=lambda: now[0])
    for _ in range(60):
        assert rl.hit("a") == 0.0
    assert rl.hit("a") == pytest.approx(1.0)
    now[0] += 2.0
    assert rl.hit("a") == 0.0 and rl.hit("a") == 0.0 and rl.hit("a") > 0
    for key in "bcdefg":
        rl.hit(key)
    assert len(rl._buckets) == 3
    assert RateLimiter(0).hit("x") == 0.0  # 0 = off


# --- DNS-rebinding guard --------------------------------------------------------------------------
def test_open_loopback_service_refuses_foreign_host_header(web: WebEnv) -> None:
    resp = web.client.get("/v1/stats", headers={"Host": "attacker.example:8077"})
    assert resp.status_code == 403 and error_of(resp)["code"] == "forbidden"
    for host in ("localhost:8077", "127.0.0.1:8077", "[::1]:8077", "localhost"):
        assert web.client.get("/v1/stats", headers={"Host": host}).status_code == 200


def test_host_header_not_checked_when_tokens_protect_the_api(authed: WebEnv) -> None:
    resp = authed.client.get("/v1/stats", headers={"Host": "memento.lan:8077", **authed.auth("reader")})
    assert resp.status_code == 200


# --- metrics --------------------------------------------------------------------------------------
def test_metrics_parse_as_prometheus_text(web: WebEnv) -> None:
    _seed(web)
    web.client.get("/v1/memories/424242")
    web.client.post("/v1/recall", json={"query": "tea"})
    resp = web.client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    assert "version=0.0.4" in resp.headers["Content-Type"]
    families = {f.name: f for f in text_string_to_metric_families(resp.data.decode("utf-8"))}
    requests = families["memento_http_requests"]
    assert requests.type == "counter"
    samples = {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
               for s in requests.samples if s.name.endswith("_total")}
    assert samples[("/v1/memories", "POST", "201")] == 3
    assert samples[("/v1/memories/{memory_id}", "GET", "404")] == 1
    hist = families["memento_http_request_duration_seconds"]
    assert hist.type == "histogram"
    inf = [s for s in hist.samples if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"
           and s.labels["route"] == "/v1/recall"]
    assert inf and inf[0].value == 1
    assert families["memento_memories"].samples[0].value == 3
    assert families["process_resident_memory_bytes"].samples[0].value > 10 * MB
    loaded = families["memento_model_loaded"].samples[0]
    assert loaded.value == 1 and loaded.labels["backend"] == "fake"
    assert families["memento_embed_cache_misses"].samples[0].value >= 3
    assert {s.labels["state"]: s.value for s in families["memento_governor_state"].samples}["ok"] == 1


def test_metrics_label_values_are_bounded(web: WebEnv) -> None:
    for i in range(20):
        web.client.get(f"/no/such/path/{i}")
        web.client.open("/v1/stats", method=f"X{i}")
    text = web.client.get("/metrics").data.decode()
    assert "/no/such" not in text and 'route="unmatched"' in text and "X1" not in text


def test_route_template() -> None:
    assert route_template("/v1/memories/<int:memory_id>") == "/v1/memories/{memory_id}"
    assert route_template("/x/<int(max=9):a>/<b>") == "/x/{a}/{b}"
    assert route_template("/v1/recall") == "/v1/recall"


# --- memory governor ------------------------------------------------------------------------------
class _FakeEmb:
    def __init__(self) -> None:
        self.loaded = True
        self.shrinks = 0
        self.unloads = 0

    def shrink_cache(self, fraction: float = 0.5) -> None:
        self.shrinks += 1

    def unload(self) -> None:
        self.loaded = False
        self.unloads += 1


def _governor(rss_mb: List[float], **kw: Any) -> Any:
    emb = _FakeEmb()
    clock = [0.0]
    reads = [0]

    def reader() -> int:
        reads[0] += 1
        return int(rss_mb[0] * MB)

    gov = Governor(100, lambda: emb, rss_reader=reader, clock=lambda: clock[0], **kw)
    return gov, emb, clock, reads


def test_governor_states_and_relief() -> None:
    rss = [50.0]
    gov, emb, clock, reads = _governor(rss)
    assert gov.check() == "ok" and emb.shrinks == 0
    rss[0] = 90.0
    assert gov.check() == "ok"  # still the cached reading: at most one /proc read per interval
    assert reads[0] == 1
    clock[0] += 1.0
    assert gov.check() == "soft"
    assert emb.shrinks == 1 and emb.unloads == 1 and not emb.loaded
    gov.admit_embedding()  # soft: still admitted
    rss[0] = 96.0
    clock[0] += 1.0
    assert gov.check() == "hard"
    with pytest.raises(Busy) as exc:
        gov.admit_embedding()
    assert exc.value.retry_after > 0 and gov.shed_count == 1


def test_governor_does_not_unload_while_an_embed_runs() -> None:
    rss = [90.0]
    gov, emb, clock, _ = _governor(rss)
    with gov.embedding():
        clock[0] += 1.0
        assert gov.check() == "soft"
    assert emb.shrinks == 1 and emb.unloads == 0 and emb.loaded


def test_governor_off_when_limit_is_zero() -> None:
    gov = Governor(0, lambda: None, rss_reader=lambda: 10 ** 12)
    assert gov.check() == "ok"
    gov.admit_embedding()


def test_governor_idle_unload_from_tick() -> None:
    rss = [10.0]
    gov, emb, clock, _ = _governor(rss, idle_unload_minutes=1)
    with gov.embedding():
        pass
    clock[0] += 30
    gov.tick()
    assert emb.loaded
    clock[0] += 31
    gov.tick()
    assert not emb.loaded and gov.idle_unloads == 1


def test_hard_memory_pressure_sheds_writes_but_serves_keyword_recall(web: WebEnv) -> None:
    ids = _seed(web)
    state = web.app.extensions["memento"]
    state.governor = Governor(100, lambda: web.embedder, rss_reader=lambda: 99 * MB)
    resp = web.client.post("/v1/memories", json={"text": "not now"})
    assert resp.status_code == 503
    assert error_of(resp)["code"] == "busy" and int(resp.headers["Retry-After"]) >= 1
    kw = web.client.post("/v1/recall", json={"query": "cat", "mode": "keyword"})
    assert kw.status_code == 200 and kw.get_json()["hits"][0]["id"] == ids["cat"]
    hy = web.client.post("/v1/recall", json={"query": "cat"}).get_json()
    assert hy["mode"] == "keyword" and "memory pressure" in hy["note"]
    batch = web.client.post("/v1/recall/batch", json={"queries": [{"query": "cat"}]}).get_json()
    assert batch["results"][0]["mode"] == "keyword"
    assert web.client.get("/healthz").status_code == 200
    assert web.client.get("/v1/memories/%d" % ids["cat"]).status_code == 200
    assert web.memory.count() == 3


# --- query parameters and ids ---------------------------------------------------------------------
@pytest.mark.parametrize("url, field", [("/v1/memories?colection=x", "colection"),
                                        ("/v1/stats?verbose=1", "verbose"),
                                        ("/v1/recall?q=x&top_k=3", "top_k")])
def test_unknown_query_parameter_is_400(web: WebEnv, url: str, field: str) -> None:
    resp = web.client.get(url)
    assert resp.status_code == 400 and error_of(resp)["field"] == field


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_id_beyond_int64_is_404_for_every_method(web: WebEnv, method: str) -> None:
    resp = web.client.open("/v1/memories/" + "9" * 40, method=method, json={"importance": 0.1})
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
