"""/openapi.json is a valid OpenAPI 3 document that describes exactly the app's routes."""
from __future__ import annotations

from typing import Set, Tuple

from openapi_spec_validator import validate

from memento_edge import __version__
from memento_edge.openapi import build_openapi
from memento_edge.web import route_template
from webfixtures import WebEnv, authed_fixture, web_fixture  # noqa: F401 - fixtures

# Flask's automatic methods and the static file route (a <path:...> converter: no OpenAPI equivalent)
# are the only things in the url_map the document leaves out on purpose.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}


def _app_routes(env: WebEnv) -> Set[Tuple[str, str]]:
    out = set()
    for rule in env.app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in rule.methods - IMPLICIT_METHODS:
            out.add((route_template(rule.rule), method.lower()))
    return out


def _doc_routes(doc: dict) -> Set[Tuple[str, str]]:
    return {(path, method) for path, item in doc["paths"].items() for method in item
            if method in ("get", "put", "post", "delete", "patch", "options", "head", "trace")}


def test_served_document_is_valid_openapi(web: WebEnv) -> None:
    resp = web.client.get("/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    doc = resp.get_json()
    validate(doc)  # raises on an invalid document
    assert doc["openapi"].startswith("3.") and doc["info"]["version"] == __version__


def test_every_route_is_documented_and_vice_versa(web: WebEnv) -> None:
    doc = web.client.get("/openapi.json").get_json()
    app_routes, doc_routes = _app_routes(web), _doc_routes(doc)
    assert app_routes - doc_routes == set(), "routes missing from the document"
    assert doc_routes - app_routes == set(), "documented routes the app does not have"


def test_path_parameters_match_the_rules(web: WebEnv) -> None:
    doc = build_openapi(__version__)
    for path, item in doc["paths"].items():
        names = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (path, method)


def test_protected_operations_document_auth_errors_and_public_ones_opt_out(web: WebEnv) -> None:
    doc = build_openapi(__version__)
    public = {"/", "/healthz", "/readyz", "/openapi.json"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path in public:
                assert op["security"] == [], path
                # ... and really answer without a token when tokens are configured:
            else:
                assert "security" not in op  # the global bearerAuth applies
                assert {"401", "403", "429", "503"} <= set(op["responses"]), (path, method)


def test_public_routes_really_are_public(authed: WebEnv) -> None:
    doc = build_openapi(__version__)
    for path, item in doc["paths"].items():
        if item.get("get", {}).get("security") == []:
            assert authed.client.get(path).status_code == 200, path


def test_operation_ids_are_unique() -> None:
    doc = build_openapi(__version__)
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
