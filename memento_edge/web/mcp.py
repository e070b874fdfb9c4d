"""``POST /mcp`` on the Flask app: the Streamable HTTP transport, answering every request with one JSON body.

The app's own hooks apply first, exactly as for REST: the cross-site check (a browser page on a foreign
``Origin`` gets 403, as the transport specification requires against DNS rebinding; requests without
``Origin`` - every non-browser client -, the service's own page and the origins in ``mcp_allowed_origins``
pass), the Host check of an open loopback service, the bearer token (401 with ``WWW-Authenticate:
Bearer``), the rate limit, and the ``read`` scope every MCP client needs (write tools also need ``write``,
checked per call). GET and DELETE answer 405: no stream and no session to open or close.
"""
from __future__ import annotations


from flask import Flask, Response, current_app, g, jsonify, request

from ..mcp.protocol import Reply, handle
from ..mcp.tools import ToolContext
from ..mcp.wire import INVALID_REQUEST, PARSE_ERROR, error_body
from .access import origins_from, requires
from .errors import ApiError
from .requests import loads, raw_body, require_media_type
from .state import EXT

PATH = "/mcp"


def _json_reply(reply: Reply) -> Response:
    if reply.body is None:
        return Response(status=reply.status)
    resp = jsonify(reply.body)
    resp.status_code = reply.status
    return resp


@requires("read")
@origins_from("mcp_allowed_origins")
def mcp_endpoint() -> Response:
    """One JSON-RPC request or notification in, one JSON-RPC response (or 202) out."""
    st = current_app.extensions[EXT]
    try:
        require_media_type(("application/json",), "one JSON-RPC message")  # the REST rule: JSON, utf-8
    except ApiError as exc:
        return _json_reply(Reply(415, error_body(INVALID_REQUEST, exc.message)))
    accept = request.accept_mimetypes
    if request.headers.get("Accept") and not accept.accept_json:
        return _json_reply(Reply(406, error_body(INVALID_REQUEST, "this server answers with application/json; "
                                                                  "list it in Accept")))
    try:
        msg = loads(raw_body())  # 413 above max_body_bytes, before parsing (also on Werkzeug 2.2)
    except (ValueError, RecursionError):  # NaN, 1e999, undecodable, too deep: as REST
        return _json_reply(Reply(400, error_body(PARSE_ERROR, "Parse error: the body is not valid JSON")))
    principal = g.principal
    # Werkzeug's headers already answer lower-case names (case-insensitive): no per-request copy.
    reply = handle(msg, request.headers, lambda: ToolContext(service=st.service, principal=principal.name,
                                                      allows=principal.allows))
    return _json_reply(reply)


def register(app: Flask) -> None:
    """Add ``POST /mcp`` to ``app``."""
    app.add_url_rule(PATH, "mcp", mcp_endpoint, methods=["POST"])
