"""POST /mcp through the Flask test client: both protocol generations, the tools, and every way to get it
wrong (never a 500). The official SDK clients against a real server are in test_mcp_conformance.py."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, Optional, Tuple

import jsonschema
import pytest

from memento_edge.governor import Governor
from memento_edge.mcp.protocol import MODERN_VERSIONS, SUPPORTED_VERSIONS
from memento_edge.mcp.tools import TOOLS
from memento_edge.mcp.when import resolve_time
from webfixtures import ALL_TOKENS, MissingModelEmbedder, WebEnv, make_env

MODERN = MODERN_VERSIONS[0]
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "0"}}
MB = 1024 * 1024


@pytest.fixture(name="env")
def env_fixture(tmp_path: Any) -> Iterator[WebEnv]:
    """Tokens configured (reader, writer, rw, admin); no rate limit."""
    env = make_env(tmp_path, tokens=ALL_TOKENS, rate_limit_per_minute=0)
    yield env
    env.close()


def post(env: WebEnv, body: Any, *, who: Optional[str] = "rw", headers: Optional[Dict[str, str]] = None,
         raw: Optional[bytes] = None) -> Tuple[int, Any, Any]:
    """POST /mcp; returns (status, JSON body or None, response)."""
    hdrs = dict(env.auth(who)) if who else {}
    hdrs.update(headers or {})
    data = raw if raw is not None else json.dumps(body).encode()
    resp = env.client.post("/mcp", data=data, headers=hdrs, content_type="application/json")
    return resp.status_code, (resp.get_json() if resp.data else None), resp


def modern(env: WebEnv, method: str, params: Optional[Dict[str, Any]] = None, **kw: Any) -> Tuple[int, Any, Any]:
    """A 2026-07-28 request with the envelope and the matching headers."""
    params = dict(params or {}, _meta=META)
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if method == "tools/call":
        headers["Mcp-Name"] = params["name"]
    headers.update(kw.pop("headers", {}))
    return post(env, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, headers=headers, **kw)


def legacy(env: WebEnv, method: str, params: Optional[Dict[str, Any]] = None, version: str = "2025-06-18",
           **kw: Any) -> Tuple[int, Any, Any]:
    """A handshake-era request (after initialize) with its MCP-Protocol-Version header."""
    body = {"jsonrpc": "2.0", "id": 7, "method": method}
    if params is not None:
        body["params"] = params
    headers = {"MCP-Protocol-Version": version, **kw.pop("headers", {})}
    return post(env, body, headers=headers, **kw)


def call(env: WebEnv, name: str, args: Dict[str, Any], **kw: Any) -> Dict[str, Any]:
    """tools/call in the modern generation; the CallToolResult."""
    status, body, _ = modern(env, "tools/call", {"name": name, "arguments": args}, **kw)
    assert status == 200, body
    return body["result"]


# --- both generations ------------------------------------------------------------------------------
def test_discover_names_every_served_version_and_the_tools_capability(env: WebEnv) -> None:
    status, body, _ = modern(env, "server/discover")
    result = body["result"]
    assert status == 200 and result["supportedVersions"] == list(SUPPORTED_VERSIONS)
    assert result["capabilities"] == {"tools": {}} and result["resultType"] == "complete"
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "memento-edge"


def test_initialize_negotiates_a_legacy_version_and_ping_answers(env: WebEnv) -> None:
    for asked, got in [("2025-06-18", "2025-06-18"), ("2025-11-25", "2025-11-25"), ("2024-11-05", "2025-11-25")]:
        status, body, resp = post(env, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": asked, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}})
        assert status == 200 and body["result"]["protocolVersion"] == got
        assert body["result"]["capabilities"]["tools"] == {"listChanged": False}
        assert "Mcp-Session-Id" not in resp.headers  # stateless: no session is minted
    status, body, _ = post(env, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert status == 202 and body is None
    assert legacy(env, "ping")[1]["result"] == {}


def test_tools_list_is_the_same_in_both_generations_and_has_output_schemas(env: WebEnv) -> None:
    new = modern(env, "tools/list")[1]["result"]
    old = legacy(env, "tools/list", {})[1]["result"]
    assert [t["name"] for t in new["tools"]] == [t["name"] for t in old["tools"]] == list(TOOLS)
    assert new["ttlMs"] > 0 and new["cacheScope"] == "public" and "resultType" not in old
    for tool in new["tools"]:
        jsonschema.Draft202012Validator.check_schema(tool["inputSchema"])
        jsonschema.Draft202012Validator.check_schema(tool["outputSchema"])
        assert tool["inputSchema"]["type"] == "object" and tool["description"]


def test_tool_schemas_follow_the_field_table(env: WebEnv) -> None:
    from memento_edge import schema

    store = TOOLS["memory_store"].input_schema["properties"]
    assert set(schema.CREATE_FIELDS) <= set(store) and store["text"]["maxLength"] == schema.MAX_TEXT_CHARS
    assert store["importance"]["default"] == schema.DEFAULT_IMPORTANCE
    search = TOOLS["memory_search"].input_schema["properties"]
    assert set(schema.FILTER_FIELDS) <= set(search) and search["topk"]["maximum"] == schema.MAX_TOPK
    assert "yesterday" in search["since"]["description"]
    update = TOOLS["memory_update"].input_schema["properties"]
    assert "default" not in update["importance"]  # omitted means "keep", not 0.5
    hit = TOOLS["memory_search"].output_schema["properties"]["hits"]["items"]["properties"]
    assert set(hit) == set(schema.HIT_FIELDS) - {"content_hash", "vector_rank", "keyword_rank"}


def test_discovery_and_tools_list_do_not_need_the_model(tmp_path: Any) -> None:
    env = make_env(tmp_path, embedder=MissingModelEmbedder())
    try:
        assert modern(env, "server/discover", who=None)[0] == 200
        assert len(modern(env, "tools/list", who=None)[1]["result"]["tools"]) == len(TOOLS)
        result = call(env, "memory_store", {"text": "no model here"}, who=None)
        assert result["isError"] and result["structuredContent"]["error"]["code"] == "model_unavailable"
    finally:
        env.close()


# --- the tools -------------------------------------------------------------------------------------
def _validate_output(name: str, result: Dict[str, Any]) -> Dict[str, Any]:
    assert result["isError"] is False, result
    schema = TOOLS[name].output_schema
    jsonschema.validate(result["structuredContent"], schema)
    assert set(result["structuredContent"]) == set(schema["properties"])  # keys are the schema's, exactly
    assert result["content"][0]["type"] == "text" and result["content"][0]["text"]
    return result["structuredContent"]


def test_every_tool_round_trip_matches_its_output_schema(env: WebEnv) -> None:
    stored = _validate_output("memory_store", call(env, "memory_store", {
        "text": "get groceries after work", "tags": ["todo"], "importance": 0.8, "metadata": {"by": "t"}}))
    mid = stored["id"]
    found = _validate_output("memory_search", call(env, "memory_search", {"query": "groceries", "tags_any": ["todo"]}))
    assert found["hits"][0]["id"] == mid and found["truncated"] is False
    assert _validate_output("memory_get", call(env, "memory_get", {"id": mid}))["tags"] == ["todo"]
    updated = _validate_output("memory_update", call(env, "memory_update", {"id": mid, "text": "buy milk"}))
    assert updated["text"] == "buy milk"
    assert _validate_output("memory_recent", call(env, "memory_recent", {"limit": 5}))["items"][0]["id"] == mid
    assert _validate_output("memory_stats", call(env, "memory_stats", {}))["memories"] == 1
    assert _validate_output("memory_delete", call(env, "memory_delete", {"id": mid})) == {"id": mid, "deleted": True}
    gone = call(env, "memory_get", {"id": mid})
    assert gone["isError"] and gone["structuredContent"]["error"] == {
        "code": "not_found", "message": f"no memory with id {mid}", "field": "id"}


def test_results_are_capped_by_max_chars_and_say_so(env: WebEnv) -> None:
    for n in range(30):
        call(env, "memory_store", {"text": f"note {n} about the garden: " + "tomatoes and beans " * 40})
    for name, args in [("memory_search", {"query": "garden tomatoes", "topk": 30}),
                       ("memory_recent", {"limit": 30})]:
        result = call(env, name, dict(args, max_chars=1500))
        out = _validate_output(name, result)
        assert out["truncated"] is True and out["omitted"] > 0
        assert len(json.dumps(out, ensure_ascii=False, separators=(",", ":"))) <= 1500
        assert len(result["content"][0]["text"]) <= 1500 and "truncated" in result["content"][0]["text"]
    big = call(env, "memory_store", {"text": "long " * 2000})["structuredContent"]["id"]
    got = _validate_output("memory_get", call(env, "memory_get", {"id": big, "max_chars": 600}))
    assert got["truncated"] is True and got["text"].endswith("…") and len(got["text"]) < 600
    updated = _validate_output("memory_update", call(env, "memory_update", {"id": big, "text": "new " * 20_000,
                                                                          "max_chars": 600}))
    assert updated["truncated"] is True and len(json.dumps(updated)) < 1000
    short = _validate_output("memory_update", call(env, "memory_update", {"id": big, "text": "short again"}))
    assert short["truncated"] is False and short["text"] == "short again"


def test_idempotency_key_returns_the_first_answer_and_refuses_other_arguments(env: WebEnv) -> None:
    first = call(env, "memory_store", {"text": "once", "idempotency_key": "k-1"})["structuredContent"]
    again = call(env, "memory_store", {"text": "once", "idempotency_key": "k-1"})["structuredContent"]
    assert again == first and first["created"] is True
    other = call(env, "memory_store", {"text": "twice", "idempotency_key": "k-1"})
    assert other["isError"] and other["structuredContent"]["error"]["code"] == "conflict"
    assert other["structuredContent"]["error"]["field"] == "idempotency_key"
    assert env.memory.count() == 1


def test_idempotency_key_is_shared_with_rest(env: WebEnv) -> None:
    """One rule, one key space: a retry through REST finds the answer MCP gave, and the other way round."""
    first = call(env, "memory_store", {"text": "once", "idempotency_key": "k-2"})["structuredContent"]
    resp = env.client.post("/v1/memories", json={"text": "once"},
                           headers={**env.auth("rw"), "Idempotency-Key": "k-2"})
    assert resp.status_code == 201 and resp.headers["Idempotent-Replayed"] == "true"
    assert resp.get_json() == first
    rest = env.client.post("/v1/memories", json={"text": "via rest"},
                           headers={**env.auth("rw"), "Idempotency-Key": "k-3"}).get_json()
    again = call(env, "memory_store", {"text": "via rest", "idempotency_key": "k-3"})["structuredContent"]
    assert again == rest and env.memory.count() == 2


def test_since_until_accept_relative_phrases(env: WebEnv) -> None:
    now = datetime(2026, 12, 3, 15, 30, tzinfo=timezone.utc)
    clock = lambda: now  # noqa: E731
    midnight = datetime(2026, 12, 3, tzinfo=timezone.utc).timestamp()
    assert resolve_time("yesterday", "since", clock) == midnight - 86400
    assert resolve_time("yesterday", "until", clock) == midnight
    assert resolve_time("last week", "since", clock) == now.timestamp() - 7 * 86400
    assert resolve_time("3 days ago", "since", clock) == now.timestamp() - 3 * 86400
    assert resolve_time("past 2 hours", "since", clock) == now.timestamp() - 7200
    assert resolve_time("2026-12-01", "since", clock) == "2026-12-01"  # the engine parses ISO-8601
    call(env, "memory_store", {"text": "old note", "created_at": "2020-01-01T00:00:00Z"})
    call(env, "memory_store", {"text": "new note"})
    hits = call(env, "memory_search", {"query": "note", "since": "yesterday"})["structuredContent"]["hits"]
    assert [h["text"] for h in hits] == ["new note"]
    hits = call(env, "memory_search", {"query": "note", "until": "last week"})["structuredContent"]["hits"]
    assert [h["text"] for h in hits] == ["old note"]
    call(env, "memory_store", {"text": "note for the day", "collection": "today"})
    hits = call(env, "memory_search", {"query": "note", "collection": "today"})["structuredContent"]["hits"]
    assert [h["text"] for h in hits] == ["note for the day"]  # only since/until are read as times
    bad = call(env, "memory_search", {"query": "note", "since": "the day after the party"})
    assert bad["isError"] and bad["structuredContent"]["error"]["field"] == "filters.since"


def test_min_score_drops_weak_hits(env: WebEnv) -> None:
    call(env, "memory_store", {"text": "the cat sleeps on the sofa"})
    call(env, "memory_store", {"text": "quarterly budget review"})
    hits = call(env, "memory_search", {"query": "cat sofa", "min_score": 0.99})["structuredContent"]["hits"]
    assert all(h["score"] >= 0.99 for h in hits) and len(hits) == 1


def test_memory_pressure_sheds_store_and_answers_search_by_keyword(env: WebEnv) -> None:
    call(env, "memory_store", {"text": "the cat sleeps on the sofa"})
    env.app.extensions["memento"].governor = Governor(100, lambda: env.embedder, rss_reader=lambda: 99 * MB)
    shed = call(env, "memory_store", {"text": "not now"})
    assert shed["isError"] and shed["structuredContent"]["error"]["code"] == "busy"
    assert shed["structuredContent"]["error"]["retry_after"] >= 1
    found = call(env, "memory_search", {"query": "cat"})["structuredContent"]
    assert found["mode"] == "keyword" and "memory pressure" in found["note"] and found["hits"]


def test_background_store_answers_pending_and_is_not_shed_under_memory_pressure(tmp_path: Any) -> None:
    env = make_env(tmp_path, tokens=ALL_TOKENS, rate_limit_per_minute=0, embed_mode="background")
    try:
        env.app.extensions["memento"].governor = Governor(100, lambda: env.embedder, rss_reader=lambda: 99 * MB)
        stored = call(env, "memory_store", {"text": "the spare fuse is in the blue box"})
        assert not stored["isError"] and stored["structuredContent"]["embedding"] == "pending"
        assert "Embedding pending" in stored["content"][0]["text"]
        jsonschema.validate(stored["structuredContent"], TOOLS["memory_store"].output_schema)
        mid = stored["structuredContent"]["id"]
        found = call(env, "memory_search", {"query": "spare fuse", "mode": "keyword"})["structuredContent"]
        assert [(h["id"], h["embedding"]) for h in found["hits"]] == [(mid, "pending")]
        got = call(env, "memory_get", {"id": mid})["structuredContent"]
        assert got["embedding"] == "pending"
        env.memory.embed_pending()
        assert call(env, "memory_get", {"id": mid})["structuredContent"]["embedding"] == "done"
    finally:
        env.close()


# --- auth, origin, limits --------------------------------------------------------------------------
@pytest.mark.parametrize("who, headers", [(None, {}), (None, {"Authorization": "Bearer mem_wrong"})])
def test_missing_or_wrong_token_is_401_with_www_authenticate(env: WebEnv, who: Any, headers: Any) -> None:
    status, _, resp = modern(env, "tools/list", who=who, headers=headers)
    assert status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_read_token_cannot_call_write_tools(env: WebEnv) -> None:
    assert call(env, "memory_search", {"query": "x"}, who="reader")["isError"] is False
    for name, args in [("memory_store", {"text": "x"}), ("memory_delete", {"id": 1}),
                       ("memory_update", {"id": 1, "text": "y"})]:
        result = call(env, name, args, who="reader")
        assert result["isError"] and result["structuredContent"]["error"]["code"] == "forbidden", name
    assert env.memory.count() == 0
    assert modern(env, "tools/list", who="writer")[0] == 403  # MCP needs read: every client lists tools


def test_foreign_origin_is_403_own_and_allowlisted_origins_pass(tmp_path: Any) -> None:
    env = make_env(tmp_path, tokens=ALL_TOKENS, mcp_allowed_origins=["https://chat.example"])
    try:
        status, body, _ = modern(env, "tools/list", headers={"Origin": "http://evil.example"})
        assert status == 403 and body["error"]["code"] == "cross_site"
        assert modern(env, "tools/list", headers={"Origin": "https://chat.example",
                                                  "Sec-Fetch-Site": "cross-site"})[0] == 200
        assert modern(env, "tools/list", who=None, headers={"Origin": "http://evil.example"})[0] == 403
        assert modern(env, "tools/list", headers={"Origin": "http://localhost"})[0] == 200  # the test host
        assert modern(env, "tools/list", headers={"Origin": "https://chat.example"})[0] == 200
    finally:
        env.close()


def test_rate_limit_applies_as_for_rest(tmp_path: Any) -> None:
    env = make_env(tmp_path, tokens=ALL_TOKENS, rate_limit_per_minute=2)
    try:
        assert [modern(env, "tools/list")[0] for _ in range(3)] == [200, 200, 429]
    finally:
        env.close()


# --- malformed and unknown -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT"])
def test_other_http_methods_are_405(env: WebEnv, method: str) -> None:
    resp = env.client.open("/mcp", method=method, headers=env.auth("rw"))
    assert resp.status_code == 405 and "POST" in resp.headers["Allow"]


@pytest.mark.parametrize("raw, code", [
    (b"{not json", -32700), (b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', -32600),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', -32600), (b'{"jsonrpc": "2.0", "id": 1}', -32600),
    (b'{"jsonrpc": "2.0", "id": null, "method": "ping"}', -32600),
    (b'{"jsonrpc": "2.0", "id": 1.5, "method": "ping"}', -32600), (b'"ping"', -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}', -32602), (b"NaN", -32700)])
def test_malformed_json_rpc_is_400_with_an_error_object(env: WebEnv, raw: bytes, code: int) -> None:
    status, body, _ = post(env, None, raw=raw)
    assert status == 400 and body["error"]["code"] == code


def test_wrong_content_type_is_415(env: WebEnv) -> None:
    resp = env.client.post("/mcp", data=b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}',
                           headers=dict(env.auth("rw"), **{"Content-Type": "text/plain"}))
    assert resp.status_code == 415


def test_unknown_method_is_404_modern_and_an_error_body_legacy(env: WebEnv) -> None:
    status, body, _ = modern(env, "resources/list")
    assert status == 404 and body["error"]["code"] == -32601 and body["id"] == 1
    assert modern(env, "ping")[0] == 404  # removed in 2026-07-28
    status, body, _ = legacy(env, "prompts/list", {})
    assert status == 200 and body["error"]["code"] == -32601 and body["id"] == 7


def test_unknown_tool_and_non_object_arguments_are_invalid_params(env: WebEnv) -> None:
    status, body, _ = modern(env, "tools/call", {"name": "memory_forget", "arguments": {}})
    assert status == 400 and body["error"]["code"] == -32602 and "memory_forget" in body["error"]["message"]
    status, body, _ = legacy(env, "tools/call", {"name": "memory_store", "arguments": ["text"]})
    assert status == 200 and body["error"]["code"] == -32602


@pytest.mark.parametrize("name, args, field", [
    ("memory_store", {}, "text"), ("memory_store", {"text": 5}, "text"),
    ("memory_store", {"text": "x", "colour": "red"}, "colour"), ("memory_store", {"text": ""}, "text"),
    ("memory_store", {"text": "x", "importance": 2}, "importance"),
    ("memory_search", {"query": "x", "topk": 0}, "topk"), ("memory_search", {"query": "x", "mode": "psychic"}, "mode"),
    ("memory_search", {"query": "x", "tags_any": [1]}, "tags_any"),
    ("memory_get", {"id": "one"}, "id"), ("memory_get", {"id": 1, "max_chars": 5}, "max_chars"),
    ("memory_update", {"id": 1}, "id"), ("memory_recent", {"limit": 0}, "limit"),
    ("memory_recent", {"cursor": "zz"}, "cursor")])
def test_bad_arguments_are_tool_errors_naming_the_field(env: WebEnv, name: str, args: Any, field: str) -> None:
    result = call(env, name, args)
    assert result["isError"] is True and result["structuredContent"]["error"]["field"] == field, result
    assert field in result["content"][0]["text"]


def test_modern_envelope_and_header_checks(env: WebEnv) -> None:
    no_meta = post(env, {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
                   headers={"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list"})
    assert no_meta[0] == 400 and no_meta[1]["error"]["code"] == -32602
    mismatch = modern(env, "tools/list", headers={"Mcp-Method": "tools/call"})
    assert mismatch[0] == 400 and mismatch[1]["error"]["code"] == -32020
    wrong_name = modern(env, "tools/call", {"name": "memory_stats", "arguments": {}},
                        headers={"Mcp-Name": "memory_store"})
    assert wrong_name[0] == 400 and wrong_name[1]["error"]["code"] == -32020
    encoded = modern(env, "tools/call", {"name": "memory_stats", "arguments": {}},
                     headers={"Mcp-Name": "=?base64?bWVtb3J5X3N0YXRz?="})
    assert encoded[0] == 200
    future = dict(META, **{"io.modelcontextprotocol/protocolVersion": "2099-01-01"})
    status, body, _ = post(env, {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": future}},
                           headers={"MCP-Protocol-Version": "2099-01-01", "Mcp-Method": "tools/list"})
    assert status == 400 and body["error"]["code"] == -32022
    assert body["error"]["data"] == {"supported": list(SUPPORTED_VERSIONS), "requested": "2099-01-01"}


def test_legacy_request_with_an_unserved_version_header_is_400(env: WebEnv) -> None:
    assert legacy(env, "tools/list", {}, version="2024-11-05")[0] == 400


def test_web_page_shows_the_mcp_url_and_ready_commands(env: WebEnv) -> None:
    page = env.client.get("/", base_url="http://memento-pi.local:8077").get_data(as_text=True)
    assert "<code id=\"mcp-url\">http://memento-pi.local:8077/mcp</code>" in page
    assert "claude mcp add --transport http memento http://memento-pi.local:8077/mcp --header" in page
    assert '"args": ["mcp", "--url", "http://memento-pi.local:8077"]' in page


# --- fuzzing: whatever arrives, the answer is a JSON-RPC answer, never a 500 or an internal error --------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def _arguments(tool: str) -> Any:
    props = list(TOOLS[tool].input_schema["properties"])
    keys = st.sampled_from(props) | st.text(max_size=8) if props else st.text(max_size=8)
    return st.dictionaries(keys, _JSON, max_size=5)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tool=st.sampled_from(list(TOOLS)), args=st.data())
def test_fuzzed_tool_arguments_get_a_result_or_a_tool_error(env: WebEnv, tool: str, args: Any) -> None:
    arguments = args.draw(_arguments(tool))
    status, body, _ = modern(env, "tools/call", {"name": tool, "arguments": arguments})
    assert status == 200, body
    result = body["result"]
    if result["isError"]:
        assert result["structuredContent"]["error"]["code"] in ("invalid_input", "not_found", "conflict"), result
    else:
        jsonschema.validate(result["structuredContent"], TOOLS[tool].output_schema)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_JSON, version=st.sampled_from([None, MODERN, "2025-06-18", "1999-01-01"]),
       method=st.sampled_from(["tools/call", "tools/list", "initialize", "server/discover", "x"]))
def test_fuzzed_messages_never_fail_internally(env: WebEnv, body: Any, version: Any, method: str) -> None:
    if isinstance(body, dict) and body:
        body = dict(body, jsonrpc="2.0", method=method)  # near-valid envelopes reach the dispatcher
    headers = {"MCP-Protocol-Version": version, "Mcp-Method": method} if version else {}
    status, answer, _ = post(env, body, headers=headers)
    assert status in (200, 202, 400, 404), (status, answer)
    if answer is not None:
        assert answer["jsonrpc"] == "2.0" and answer.get("error", {}).get("code") != -32603, answer


# --- abuse: whatever a client sends, a JSON answer with the right status, never a 500 or a traceback ------
def _no_traceback(resp: Any) -> None:
    text = resp.get_data(as_text=True)
    assert resp.status_code < 500 and "Traceback" not in text and 'File "' not in text, text[:300]


def test_oversized_body_is_413_before_it_is_parsed(tmp_path: Any) -> None:
    env = make_env(tmp_path, tokens=ALL_TOKENS, rate_limit_per_minute=0, max_body_bytes=4096)
    try:
        big = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "memory_store", "arguments": {"text": "x" * 5000}, "_meta": META}}
        status, body, resp = post(env, big, headers={"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call",
                                                     "Mcp-Name": "memory_store"})
        assert status == 413 and body["error"]["code"] == "payload_too_large"
        _no_traceback(resp)
        assert env.memory.count() == 0
    finally:
        env.close()


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000])
def test_deeply_nested_json_is_a_parse_error(env: WebEnv, raw: bytes) -> None:
    status, body, resp = post(env, None, raw=raw)
    assert status == 400 and body["error"]["code"] == -32700
    _no_traceback(resp)


def test_deeply_nested_arguments_are_a_tool_error(env: WebEnv) -> None:
    deep: Any = "leaf"
    for _ in range(500):  # parses, but is deeper than any metadata or filter the engine takes
        deep = {"k": deep}
    for name, args in [("memory_store", {"text": "x", "metadata": deep}),
                       ("memory_search", {"query": "x", "metadata": deep})]:
        result = call(env, name, args)
        assert result["isError"] and result["structuredContent"]["error"]["code"] == "invalid_input", result
    assert env.memory.count() == 0


@pytest.mark.parametrize("raw", [b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "x": 1e999}',
                                 b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "x": Infinity}',
                                 b'\xff\xfe{"jsonrpc"', b"", b"   "])
def test_numbers_out_of_range_and_undecodable_bodies_are_parse_errors(env: WebEnv, raw: bytes) -> None:
    status, body, resp = post(env, None, raw=raw, headers={"MCP-Protocol-Version": MODERN})
    assert status == 400 and body["error"]["code"] == -32700, body
    _no_traceback(resp)


@pytest.mark.parametrize("value", ["nul\x00byte", "lone \ud800 surrogate"])
def test_strings_sqlite_cannot_hold_are_tool_errors(env: WebEnv, value: str) -> None:
    for name, args, field in [("memory_store", {"text": value}, "text"),
                              ("memory_store", {"text": "x", "tags": ["ok", value]}, "tags[1]"),
                              ("memory_search", {"query": value}, "query"),
                              ("memory_search", {"query": "x", "collection": value}, "collection"),
                              ("memory_search", {"query": "x", "metadata": {"k": value}}, "metadata.k")]:
        status, body, resp = modern(env, "tools/call", {"name": name, "arguments": args})
        _no_traceback(resp)
        error = body["result"]["structuredContent"].get("error")
        assert status == 200 and body["result"]["isError"] and error["code"] == "invalid_input", (name, body)
        assert error["field"] == field
    assert env.memory.count() == 0


def test_integers_beyond_64_bits_are_tool_errors_except_inside_stored_metadata(env: WebEnv) -> None:
    for name, args, field in [("memory_search", {"query": "x", "metadata": {"n": 2 ** 70}}, "metadata.n"),
                              ("memory_store", {"text": "x", "created_at": 2 ** 70}, "created_at"),
                              ("memory_recent", {"limit": -(2 ** 70)}, "limit")]:
        result = call(env, name, args)
        assert result["isError"] and result["structuredContent"]["error"]["field"] == field, (name, result)
    # A memory's own metadata is stored as JSON text: big numbers and NULs there are harmless (as REST).
    stored = call(env, "memory_store", {"text": "x", "metadata": {"n": 2 ** 70, "s": "a\x00b"}})
    assert not stored["isError"]
    got = call(env, "memory_get", {"id": stored["structuredContent"]["id"]})["structuredContent"]
    assert got["metadata"] == {"n": 2 ** 70, "s": "a\x00b"}


def test_batch_arrays_are_refused_in_both_generations(env: WebEnv) -> None:
    one = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
    for headers in ({"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list"},
                    {"MCP-Protocol-Version": "2025-06-18"}, {}):
        status, body, _ = post(env, [one, dict(one, id=2)], headers=headers)
        assert status == 400 and body["error"]["code"] == -32600 and body["id"] is None
        assert "batch" in body["error"]["message"]
    assert post(env, [], headers={})[0] == 400


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json; charset=latin-1", ""])
def test_wrong_content_types_are_refused(env: WebEnv, content_type: str) -> None:
    resp = env.client.post("/mcp", data=b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}',
                           headers=dict(env.auth("rw"), **{"Content-Type": content_type,
                                                           "MCP-Protocol-Version": "2025-06-18"}))
    assert resp.status_code == 415, resp.get_data(as_text=True)
    _no_traceback(resp)
    ok = env.client.post("/mcp", data=b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}',
                         headers=dict(env.auth("rw"), **{"Content-Type": "application/json; charset=utf-8",
                                                         "MCP-Protocol-Version": "2025-06-18"}))
    assert ok.status_code == 200 and ok.get_json()["result"] == {}


def test_accept_without_json_is_406(env: WebEnv) -> None:
    status, body, _ = legacy(env, "ping", headers={"Accept": "text/event-stream"})
    assert status == 406 and body["error"]["code"] == -32600
    assert legacy(env, "ping", headers={"Accept": "application/json, text/event-stream"})[0] == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost.evil.example",
                                    "http://127.0.0.1.nip.io:8077"])
def test_foreign_origins_are_403_even_with_a_valid_token(env: WebEnv, origin: str) -> None:
    status, body, resp = modern(env, "tools/call", {"name": "memory_store", "arguments": {"text": "planted"}},
                                headers={"Origin": origin})
    assert status == 403 and body["error"]["code"] == "cross_site"
    _no_traceback(resp)
    assert env.memory.count() == 0


def test_protocol_version_header_missing_or_invalid(env: WebEnv) -> None:
    # Modern body without the header: the header is required in 2026-07-28.
    status, body, _ = post(env, {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}},
                           headers={"Mcp-Method": "tools/list"})
    assert status == 400 and body["error"]["code"] == -32020
    # Handshake-era request without the header: the transport spec says assume 2025-03-26 - served.
    status, body, _ = post(env, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert status == 200 and "tools" in body["result"]
    for bad in ["garbage", "", "2026-07-28\x7f", "1999-01-01", "2025-06-18, 2026-07-28"]:
        status, body, resp = post(env, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                  headers={"MCP-Protocol-Version": bad})
        assert status == 400 and body["error"]["code"] in (-32600, -32602, -32020, -32022), (bad, body)
        _no_traceback(resp)


def test_unknown_methods_and_tools_in_every_generation_are_json_rpc_errors(env: WebEnv) -> None:
    for method in ["tools/unknown", "resources/read", "", "rpc.discover", "initialize/x", "a" * 5000]:
        status, body, resp = legacy(env, method, {})
        assert status == 200 and body["error"]["code"] == -32601, (method, body)
        _no_traceback(resp)
    for name in ["", "memory_forget", "x" * 10_000, "memory_store\x00"]:
        status, body, resp = legacy(env, "tools/call", {"name": name, "arguments": {}})
        assert status == 200 and body["error"]["code"] == -32602, (name, body)
        assert len(json.dumps(body)) < 2000  # the unknown name is not echoed back at length
        _no_traceback(resp)


@pytest.mark.parametrize("args, field", [
    ({"query": "x", "topk": 10 ** 9}, "topk"), ({"query": "x", "topk": 2 ** 70}, "topk"),
    ({"query": "x", "topk": -1}, "topk"), ({"query": "x", "topk": 1.5}, "topk"), ({"query": "x", "topk": True}, "topk"),
    ({"query": "x", "max_chars": 10 ** 12}, "max_chars"), ({"query": "q" * 100_000}, "query"),
    ({"query": "x", "min_score": 1e308}, "min_score"),
    ({"query": "x", "tags_any": ["t"] * 10_000}, "filters.tags_any"),
    ({"query": "x", "since": "9" * 400}, "filters.since")])
def test_huge_values_are_tool_errors_naming_the_field(env: WebEnv, args: Dict[str, Any], field: str) -> None:
    status, body, resp = modern(env, "tools/call", {"name": "memory_search", "arguments": args})
    _no_traceback(resp)
    result = body["result"]
    assert status == 200 and result["isError"] and result["structuredContent"]["error"]["field"] == field, result


def test_huge_ids_are_tool_errors(env: WebEnv) -> None:
    for name in ("memory_get", "memory_delete"):
        for value in (2 ** 63, 2 ** 70, 0, -5):
            status, body, resp = modern(env, "tools/call", {"name": name, "arguments": {"id": value}})
            _no_traceback(resp)
            assert body["result"]["isError"], (name, value, body)
            assert body["result"]["structuredContent"]["error"]["code"] in ("invalid_input", "not_found")


def test_no_token_is_401_for_every_method_when_tokens_are_configured(env: WebEnv) -> None:
    for method in ["tools/list", "tools/call", "server/discover"]:
        params = {"name": "memory_store", "arguments": {"text": "x"}} if method == "tools/call" else {}
        status, _, resp = modern(env, method, params, who=None)
        assert status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer"), method
    for raw in [{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, [], "x", {}]:
        status, _, resp = post(env, raw, who=None)
        assert status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    status, _, resp = modern(env, "tools/list", who=None, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert status == 401 and env.memory.count() == 0


def test_rate_limit_is_one_budget_shared_with_rest(tmp_path: Any) -> None:
    env = make_env(tmp_path, tokens=ALL_TOKENS, rate_limit_per_minute=3)
    try:
        assert env.client.get("/v1/stats", headers=env.auth("rw")).status_code == 200
        assert modern(env, "tools/list")[0] == 200
        assert env.client.post("/v1/recall", json={"query": "x"}, headers=env.auth("rw")).status_code == 200
        status, _, resp = modern(env, "tools/call", {"name": "memory_search", "arguments": {"query": "x"}})
        assert status == 429 and int(resp.headers["Retry-After"]) >= 1
        assert env.client.get("/v1/stats", headers=env.auth("rw")).status_code == 429
        assert modern(env, "tools/list", who="reader")[0] == 200  # budgets are per token
    finally:
        env.close()


def test_stats_text_names_the_largest_collections_only(env: WebEnv) -> None:
    for i in range(25):
        call(env, "memory_store", {"text": f"note {i}", "collection": f"c{i:02d}"})
    call(env, "memory_store", {"text": "one more", "collection": "c24"})
    result = call(env, "memory_stats", {})
    text = result["content"][0]["text"]
    assert text.index("c24 (2)") < text.index("c00 (1)") and "and 5 more" in text and "c19" not in text
    assert len(result["structuredContent"]["collections"]) == 25
