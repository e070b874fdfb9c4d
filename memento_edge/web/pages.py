"""The routes outside /v1: the LAN page, liveness, readiness, metrics and the OpenAPI document."""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, jsonify, render_template, request
from jinja2 import TemplateNotFound

from .. import __version__
from ..device import local_view
from .access import requires
from .errors import retry_after
from .metrics import service_families
from .state import readiness, state

bp = Blueprint("pages", __name__)

_PLACEHOLDER_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>memento-edge</title>
</head><body><h1>memento-edge</h1><p>The web page is not installed; the JSON API is at <code>/v1</code>
(see <a href="/openapi.json">/openapi.json</a>).</p></body></html>"""


@bp.get("/")
@requires(None)
def index() -> Response:
    """The LAN page (``templates/index.html``); it asks for the token and sends it in a header."""
    try:
        st = state()
        html = render_template("index.html", version=__version__, auth_required=st.auth_enabled,
                               device=local_view(Path(st.settings.device_status), request.remote_addr))
    except TemplateNotFound:
        html = _PLACEHOLDER_PAGE
    return Response(html, mimetype="text/html")


@bp.get("/healthz")
@requires(None)
def healthz() -> Response:
    """Liveness: the process answers. No auth, no database access."""
    return jsonify({"status": "ok", "version": __version__})


@bp.get("/readyz")
@requires(None)
def readyz() -> Response:
    """Readiness: database writable (503 if not), model state and active embedding backend."""
    body = readiness(state())
    resp = jsonify(body)
    if not body["ready"]:
        resp.status_code = 503
        resp.headers.update(retry_after(5))
    return resp


@bp.get("/metrics")
@requires("read")
def metrics() -> Response:
    """Prometheus text exposition format 0.0.4."""
    st = state()
    text = st.metrics.render(service_families(st))
    return Response(text, mimetype="text/plain", content_type="text/plain; version=0.0.4; charset=utf-8")


@bp.get("/openapi.json")
@requires(None)
def openapi() -> Response:
    """The OpenAPI 3 description of this API."""
    st = state()
    if st.openapi_doc is None:  # built once per app: it never changes while the app runs
        from ..openapi import build_openapi

        st.openapi_doc = build_openapi(__version__)
    return jsonify(st.openapi_doc)
