"""Who may call what: scope marks on views, bearer-token auth, rate limiting, the loopback Host check,
and the after-request bookkeeping (metrics, security headers, access log).

Security: bearer tokens from the config (see :mod:`memento_edge.auth`), per-principal token-bucket rate
limiting, a body size cap, and - when no token is configured and the service is bound to loopback - a
Host-header check that stops DNS-rebinding pages in the local browser from reaching the open API.
Tokens never appear in logs or URLs: only the token's *name* is logged.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, FrozenSet, Optional

from flask import Flask, Response, current_app, g, request

from .. import logs
from ..auth import ANONYMOUS, Principal, bearer_token, is_loopback
from .crosssite import check_cross_site
from .errors import ApiError, bad, retry_after
from .state import AppState, state

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

View = Callable[..., Any]


def requires(scope: Optional[str]) -> Callable[[View], View]:
    """Mark a view as needing ``scope`` (read/write/admin); None = public (no auth)."""
    def mark(fn: View) -> View:
        fn.required_scope = scope  # type: ignore[attr-defined]
        return fn
    return mark


def origins_from(setting: str) -> Callable[[View], View]:
    """Let browser pages on the origins listed in ``setting`` call this view besides the service's own page
    (``mcp_allowed_origins`` for ``POST /mcp``, as the MCP transport asks for an Origin allowlist)."""
    def mark(fn: View) -> View:
        fn.origins_setting = setting  # type: ignore[attr-defined]
        return fn
    return mark


def query_params(*names: str) -> Callable[[View], View]:
    """Declare the query parameters a /v1 view takes; any other one is refused (400), like unknown body
    fields: a misspelt ``?colection=`` must not silently widen a query."""
    def mark(fn: View) -> View:
        fn.query_params = frozenset(names)  # type: ignore[attr-defined]
        return fn
    return mark


def client_address() -> str:
    """The peer address (Waitress clears untrusted proxy headers)."""
    return request.remote_addr or "unknown"


def _authenticate(st: AppState, scope: str) -> Principal:
    principal: Optional[Principal] = ANONYMOUS
    token = None
    if st.auth_enabled:
        token = bearer_token(request.headers.get("Authorization"))
        principal = st.tokens.verify(token) if token else None
    # Rate limit before rejecting bad tokens too, so token guessing is throttled per address.
    wait = st.limiter.hit(f"token:{principal.name}" if principal and st.auth_enabled
                          else f"addr:{client_address()}")
    if wait:
        raise ApiError(429, "rate_limited", "too many requests; slow down", headers=retry_after(wait))
    if principal is None:
        raise ApiError(401, "unauthorized", "missing bearer token" if not token else "invalid token",
                       headers={"WWW-Authenticate": 'Bearer realm="memento-edge"'})
    if not principal.allows(scope):
        raise ApiError(403, "forbidden", f"token {principal.name!r} lacks the {scope!r} scope")
    return principal


def _before() -> Optional[Response]:
    g.t0 = time.perf_counter()
    g.principal = ANONYMOUS
    st = state()
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    if view is None or request.endpoint == "static":
        return None  # 404/405 and static files: nothing to protect
    setting = getattr(view, "origins_setting", None)
    # Every state-changing route, before anything reads the body.
    check_cross_site(request, getattr(st.settings, setting) if setting else ())
    if st.check_host and not _host_is_loopback(request.host):
        raise ApiError(403, "forbidden", "this service has no token configured and answers only to "
                       "localhost host names (DNS-rebinding protection)")
    scope = getattr(view, "required_scope", None)
    if scope is None:
        return None  # public: health, readiness, page, schema
    g.principal = _authenticate(st, scope)
    if request.blueprint == "v1":
        allowed: FrozenSet[str] = getattr(view, "query_params", frozenset())
        for name in request.args:
            if name not in allowed:
                raise bad(f"unknown query parameter {name!r}", name)
    return None


def _after(resp: Response) -> Response:
    st = state()
    elapsed = time.perf_counter() - g.get("t0", time.perf_counter())
    rule = route_template(request.url_rule.rule) if request.url_rule is not None else "unmatched"
    st.metrics.observe(rule, request.method, resp.status_code, elapsed)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Cache-Control", "no-store")
    if resp.mimetype == "text/html":
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
    principal = g.get("principal", ANONYMOUS)
    if principal is not ANONYMOUS:
        resp.headers["X-Memento-Token"] = principal.name  # the page shows which token is in use
    # The route template (never the path's ids or the query string, which may hold search text) and the
    # token's *name*, never the token.
    logs.request(request.method, rule, resp.status_code, elapsed * 1000, principal.name, client_address())
    return resp


def register_hooks(app: Flask) -> None:
    """Install the access checks (before every request) and the bookkeeping (after it)."""
    app.before_request(_before)
    app.after_request(_after)


_CONVERTER_RE = re.compile(r"<(?:[^:<>]+:)?([^:<>]+)>")


def route_template(rule: str) -> str:
    """A Werkzeug rule as an OpenAPI path: ``/v1/memories/<int:memory_id>`` -> ``.../{memory_id}``."""
    return _CONVERTER_RE.sub(r"{\1}", rule)


def _host_is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    if name.startswith("[") and "]" in name:
        name = name[1:name.index("]")]
    return is_loopback(name)
