"""Tokens (creation, config file, verification), the scope matrix over the app, and the safe-bind policy."""
from __future__ import annotations

import hashlib
import logging
import os
import stat
from typing import Any, Dict, Optional

import pytest
import yaml

from memento_edge import auth
from memento_edge.auth import (Principal, TokenTable, add_token_to_config, bearer_token, check_bind,
                               create_token, hash_token, is_loopback, remove_token_from_config)
from memento_edge.config import Settings
from memento_edge.errors import Conflict, InvalidInput, NotFound
from memento_edge.web import serve
from webfixtures import ALL_TOKENS, WebEnv, authed_fixture, make_env  # noqa: F401 - a fixture


# --- tokens ---------------------------------------------------------------------------------------
def test_create_token_returns_plaintext_once_and_a_hashed_entry() -> None:
    token, entry = create_token("laptop", ["write", "read", "read"])
    assert token.startswith("mem_") and len(token) >= 40
    assert entry == {"name": "laptop", "sha256": hashlib.sha256(token.encode()).hexdigest(),
                     "scopes": ["read", "write"]}
    assert token not in repr(entry)
    assert create_token("laptop", ["read"])[0] != token


@pytest.mark.parametrize("name, scopes", [
    ("", ["read"]), ("has space", ["read"]), ("x" * 65, ["read"]), ("ok", []), ("ok", ["root"]),
    ("ok", "read"),
])
def test_create_token_rejects_bad_names_and_scopes(name: str, scopes: Any) -> None:
    with pytest.raises(InvalidInput):
        create_token(name, scopes)


def test_token_table_verifies_only_the_right_token() -> None:
    t1, e1 = create_token("one", ["read"])
    t2, e2 = create_token("two", ["admin"])
    table = TokenTable([e1, e2])
    assert table.enabled and len(table) == 2
    assert table.verify(t1) == Principal("one", frozenset({"read"}))
    assert table.verify(t2).name == "two"
    assert table.verify(t1 + "x") is None
    assert table.verify("") is None
    assert table.verify("a" * 10_000) is None
    assert table.verify("\ud800") is None  # not encodable as UTF-8: must not raise
    assert not TokenTable([]).enabled


def test_token_table_compares_every_entry(monkeypatch) -> None:
    """Constant time over entries: compare_digest is called for each one, even after a match."""
    tokens = [create_token(f"t{i}", ["read"]) for i in range(5)]
    table = TokenTable([e for _, e in tokens])
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert table.verify(tokens[0][0]).name == "t0"
    assert len(calls) == 5


@pytest.mark.parametrize("entries", [
    [{"name": "a", "sha256": "xyz", "scopes": ["read"]}],
    [{"name": "a", "sha256": "0" * 64, "scopes": ["superuser"]}],
    [{"name": "a", "sha256": "0" * 64, "scopes": ["read"]},
     {"name": "a", "sha256": "1" * 64, "scopes": ["read"]}],
    ["not a mapping"],
    [{"sha256": "0" * 64, "scopes": ["read"]}],
])
def test_token_table_rejects_malformed_config(entries: Any) -> None:
    with pytest.raises(InvalidInput):
        TokenTable(entries)


def test_admin_grants_every_scope_other_scopes_are_explicit() -> None:
    admin = Principal("a", frozenset({"admin"}))
    writer = Principal("w", frozenset({"write"}))
    assert admin.allows("read") and admin.allows("write") and admin.allows("admin")
    assert writer.allows("write") and not writer.allows("read") and not writer.allows("admin")


@pytest.mark.parametrize("header, expected", [
    ("Bearer abc", "abc"), ("bearer   abc ", "abc"), ("Basic abc", None), ("Bearer", None), ("", None),
    (None, None),
])
def test_bearer_token_parsing(header: Optional[str], expected: Optional[str]) -> None:
    assert bearer_token(header) == expected


def test_hash_token() -> None:
    assert hash_token("abc") == hashlib.sha256(b"abc").hexdigest()


# --- config file ----------------------------------------------------------------------------------
def test_add_token_creates_private_config_that_settings_load(tmp_path) -> None:
    path = tmp_path / "etc" / "config.yaml"
    token, entry = create_token("agent", ["read", "write"])
    add_token_to_config(path, entry)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    settings = Settings.load(config_file=str(path), env={})
    assert TokenTable(settings.tokens).verify(token).name == "agent"
    assert token not in path.read_text()


def test_add_token_keeps_comments_when_appending(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("# my device\nport: 9000  # not the default\n")
    os.chmod(path, 0o640)
    _, entry = create_token("one", ["read"])
    add_token_to_config(path, entry)
    text = path.read_text()
    assert "# my device" in text and "# not the default" in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    _, entry2 = create_token("two", ["admin"])
    add_token_to_config(path, entry2)
    data = yaml.safe_load(path.read_text())
    assert data["port"] == 9000 and [t["name"] for t in data["tokens"]] == ["one", "two"]


def test_add_token_refuses_duplicate_name_and_bad_entry(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    add_token_to_config(path, create_token("dup", ["read"])[1])
    with pytest.raises(Conflict):
        add_token_to_config(path, create_token("dup", ["write"])[1])
    with pytest.raises(InvalidInput):
        add_token_to_config(path, {"name": "x", "sha256": "nothex", "scopes": ["read"]})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InvalidInput):
        add_token_to_config(tmp_path / "list.yaml", create_token("x", ["read"])[1])


def test_remove_token(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    add_token_to_config(path, create_token("a", ["read"])[1])
    add_token_to_config(path, create_token("b", ["read"])[1])
    remove_token_from_config(path, "a")
    assert [t["name"] for t in yaml.safe_load(path.read_text())["tokens"]] == ["b"]
    with pytest.raises(NotFound):
        remove_token_from_config(path, "a")


# --- the scope matrix over the app ----------------------------------------------------------------
ROUTES = [
    # (method, path, body, scope needed)
    ("GET", "/v1/memories", None, "read"),
    ("GET", "/v1/memories/1", None, "read"),
    ("GET", "/v1/recall?q=hello", None, "read"),
    ("POST", "/v1/recall", {"query": "hello"}, "read"),
    ("POST", "/v1/recall/batch", {"queries": [{"query": "hello"}]}, "read"),
    ("GET", "/v1/stats", None, "read"),
    ("GET", "/v1/export", None, "read"),
    ("GET", "/metrics", None, "read"),
    ("POST", "/v1/memories", {"text": "hello there"}, "write"),
    ("PATCH", "/v1/memories/1", {"importance": 0.3}, "write"),
    ("POST", "/v1/import", "ndjson", "write"),
    ("DELETE", "/v1/memories/1", None, "write"),
    ("POST", "/v1/backup", None, "admin"),
]
PUBLIC = ["/healthz", "/readyz", "/openapi.json", "/"]


def _call(env: WebEnv, method: str, path: str, body: Any, headers: Dict[str, str]) -> Any:
    if body == "ndjson":
        return env.client.open(path, method=method, data=b'{"text": "imported"}\n',
                               content_type="application/x-ndjson", headers=headers)
    return env.client.open(path, method=method, json=body, headers=headers)


@pytest.fixture
def seeded(authed: WebEnv) -> WebEnv:
    resp = authed.client.post("/v1/memories", json={"text": "hello world"}, headers=authed.auth("rw"))
    assert resp.status_code == 201 and resp.get_json()["id"] == 1
    return authed


@pytest.mark.parametrize("method, path, body, scope", ROUTES)
def test_no_token_is_401(seeded: WebEnv, method: str, path: str, body: Any, scope: str) -> None:
    resp = _call(seeded, method, path, body, {})
    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("method, path, body, scope", ROUTES)
@pytest.mark.parametrize("header", ["Bearer mem_not-a-real-token", "Basic dXNlcjpwYXNz", "Bearer "])
def test_bad_token_is_401(seeded: WebEnv, method: str, path: str, body: Any, scope: str, header: str) -> None:
    resp = _call(seeded, method, path, body, {"Authorization": header})
    assert resp.status_code == 401


@pytest.mark.parametrize("method, path, body, scope", ROUTES)
@pytest.mark.parametrize("token", sorted(ALL_TOKENS))
def test_scope_matrix(seeded: WebEnv, method: str, path: str, body: Any, scope: str, token: str) -> None:
    scopes = set(ALL_TOKENS[token])
    allowed = scope in scopes or "admin" in scopes
    resp = _call(seeded, method, path, body, seeded.auth(token))
    if allowed:
        assert resp.status_code < 400, (token, path, resp.get_json())
    else:
        assert resp.status_code == 403, (token, path)
        err = resp.get_json()["error"]
        assert err["code"] == "forbidden" and scope in err["message"]


@pytest.mark.parametrize("path", PUBLIC)
def test_public_routes_need_no_token(authed: WebEnv, path: str) -> None:
    assert authed.client.get(path).status_code == 200


def test_open_service_without_tokens_needs_no_auth(tmp_path) -> None:
    env = make_env(tmp_path)
    try:
        for method, path, body, _ in ROUTES:
            if path == "/v1/memories/1" and method != "DELETE":
                continue
            resp = _call(env, method, path, body, {})
            assert resp.status_code in (200, 201, 204, 404), (path, resp.get_json())
    finally:
        env.close()


def test_tokens_never_reach_the_logs(authed: WebEnv, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    authed.client.get("/v1/stats", headers=authed.auth("reader"))
    authed.client.get("/v1/stats", headers={"Authorization": "Bearer mem_wrong-guess"})
    authed.client.get("/v1/recall?q=private%20words", headers=authed.auth("reader"))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "reader" in logged  # the access log names the token...
    assert authed.tokens["reader"] not in logged and "mem_wrong-guess" not in logged  # ...never the secret
    assert "private" not in logged  # nor the query string


# --- the bind policy ------------------------------------------------------------------------------
@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.5", False), ("memento.lan", False),
])
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_check_bind_matrix(caplog) -> None:
    _, entry = create_token("t", ["read"])
    assert check_bind(Settings(host="0.0.0.0", tokens=[entry])) == "tokens"
    assert check_bind(Settings(host="127.0.0.1")) == "loopback-open"
    with pytest.raises(InvalidInput) as exc:
        check_bind(Settings(host="0.0.0.0"))
    assert "token create" in exc.value.message and "--insecure-no-auth" in exc.value.message
    caplog.set_level(logging.WARNING)
    assert check_bind(Settings(host="0.0.0.0", insecure_no_auth=True)) == "insecure-open"
    assert "NO authentication" in caplog.text


def test_serve_refuses_unsafe_bind_before_opening_anything(tmp_path) -> None:
    settings = Settings(home=str(tmp_path / "home"), host="0.0.0.0", port=1)
    with pytest.raises(InvalidInput):
        serve(settings)
    assert not (tmp_path / "home").exists()  # nothing opened, nothing bound
