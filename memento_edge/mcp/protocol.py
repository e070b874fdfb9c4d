"""JSON-RPC 2.0 dispatch for MCP, transport-free: the HTTP endpoint and the stdio server both call
:func:`handle` with one decoded message and get a :class:`Reply` (HTTP status and body).

Two protocol generations are served side by side (a "dual-era" server in the specification's words):

* **2026-07-28** (modern, stateless): every request carries ``_meta["io.modelcontextprotocol/protocolVersion"]``
  and ``clientCapabilities``; on HTTP the ``MCP-Protocol-Version``, ``Mcp-Method`` and (for ``tools/call``)
  ``Mcp-Name`` headers must match the body (else 400 ``HeaderMismatch`` -32020). ``server/discover`` names the
  versions; results carry ``resultType``; errors map to HTTP 400 / 404. There is no ``initialize`` and no ``ping``.
* **2025-11-25 / 2025-06-18 / 2025-03-26** (legacy): ``initialize`` negotiates a version, notifications get
  202, ``ping`` answers ``{}``, errors travel in a 200 body. No session is minted: every request stands alone,
  so an ``Mcp-Session-Id`` a client sends is ignored.

A request belongs to the modern era when its ``MCP-Protocol-Version`` header is not a handshake-era version,
or (with no header, e.g. on stdio) when its ``_meta`` names a protocol version; ``initialize`` is always
legacy. Batches are refused (neither generation has them since 2025-06-18).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Protocol

from .. import __version__
from .tools import TOOLS, ToolContext, call_tool
from .wire import (CAPS_KEY, HANDSHAKE_ERA, HEADER_MISMATCH, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST,
                   LEGACY_VERSIONS, METHOD_NOT_FOUND, MODERN_VERSIONS, PARSE_ERROR, PV_KEY, SERVER_INFO_KEY,
                   SUPPORTED_VERSIONS, UNSUPPORTED_VERSION, decode_header, error_body)

log = logging.getLogger(__name__)

SERVER_INFO = {"name": "memento-edge", "title": "memento-edge memory", "version": __version__}
INSTRUCTIONS = ("Persistent semantic memory. Use memory_search before answering questions about the user, "
                "earlier sessions or decisions; use memory_store for facts worth keeping (one fact per memory). "
                "Search works by meaning, so paraphrases match.")
TOOLS_TTL_MS = 3_600_000  # the tool list only changes with a software update
# Modern HTTP status of each JSON-RPC error code (streamable-http: 400 for malformed / mismatched /
# unsupported, 404 for an unknown method); anything else is a 200 with the error in the body.
_MODERN_STATUS = {PARSE_ERROR: 400, INVALID_REQUEST: 400, INVALID_PARAMS: 400, HEADER_MISMATCH: 400,
                  UNSUPPORTED_VERSION: 400, METHOD_NOT_FOUND: 404}
__all__ = ["Reply", "RpcError", "handle", "error_body", "SUPPORTED_VERSIONS", "MODERN_VERSIONS", "LEGACY_VERSIONS"]


class HeaderLookup(Protocol):
    """The request headers, looked up by lower-case name (a dict, or Werkzeug's case-insensitive headers)."""

    def get(self, key: str) -> Optional[str]:
        """The header's value, or None."""


class RpcError(Exception):
    """A JSON-RPC error object to answer with (``status`` overrides the era's HTTP status)."""

    def __init__(self, code: int, message: str, data: Any = None, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data, self.status = code, message, data, status


@dataclass
class Reply:
    """What to send back: an HTTP status and a JSON body (None = no body, e.g. 202 for a notification)."""

    status: int
    body: Optional[Dict[str, Any]]


def is_modern(msg: Mapping[str, Any], headers: Optional[HeaderLookup]) -> bool:
    """Which generation a request speaks (see the module docstring)."""
    if msg.get("method") == "initialize":
        return False
    header = headers.get("mcp-protocol-version") if headers is not None else None
    if header is not None:
        return header not in HANDSHAKE_ERA
    params = msg.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and PV_KEY in meta


def _check_modern(method: str, params: Dict[str, Any], headers: Optional[HeaderLookup]) -> None:
    """The 2026-07-28 request ladder: envelope keys, header/body agreement, a served version."""
    meta = params.get("_meta")
    if not isinstance(meta, dict) or PV_KEY not in meta or CAPS_KEY not in meta:
        raise RpcError(INVALID_PARAMS, f"params._meta must carry {PV_KEY!r} and {CAPS_KEY!r}")
    version = meta[PV_KEY]
    if headers is not None:
        if headers.get("mcp-protocol-version") != version:
            raise RpcError(HEADER_MISMATCH, "MCP-Protocol-Version header does not match the request's "
                                            "protocol version")
        if headers.get("mcp-method") != method:
            raise RpcError(HEADER_MISMATCH, "Mcp-Method header does not match the request's method")
        if method == "tools/call" and decode_header(headers.get("mcp-name")) != params.get("name"):
            raise RpcError(HEADER_MISMATCH, "Mcp-Name header does not match the request's tool name")
    if not isinstance(version, str):
        raise RpcError(INVALID_PARAMS, "the protocol version must be a string")
    if version not in MODERN_VERSIONS:
        raise RpcError(UNSUPPORTED_VERSION, "Unsupported protocol version",
                       {"supported": list(SUPPORTED_VERSIONS), "requested": version})


def _check_legacy(method: str, params: Dict[str, Any], headers: Optional[HeaderLookup]) -> None:
    header = headers.get("mcp-protocol-version") if headers is not None else None
    if method != "initialize" and header is not None and header not in LEGACY_VERSIONS:
        raise RpcError(INVALID_REQUEST, f"unsupported MCP-Protocol-Version {header!r}; supported: "
                                        f"{', '.join(SUPPORTED_VERSIONS)}", status=400)


def _initialize(params: Dict[str, Any]) -> Dict[str, Any]:
    requested = params.get("protocolVersion")
    version = requested if requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
    return {"protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": SERVER_INFO, "instructions": INSTRUCTIONS}


def _discover(params: Dict[str, Any]) -> Dict[str, Any]:
    return {"supportedVersions": list(SUPPORTED_VERSIONS), "capabilities": {"tools": {}},
            "instructions": INSTRUCTIONS, "ttlMs": TOOLS_TTL_MS, "cacheScope": "public"}


def _list_tools(params: Dict[str, Any]) -> Dict[str, Any]:
    return {"tools": [t.listing() for t in TOOLS.values()], "ttlMs": TOOLS_TTL_MS, "cacheScope": "public"}


def _call(params: Dict[str, Any], ctx: Callable[[], ToolContext]) -> Dict[str, Any]:
    name = params.get("name")
    if not isinstance(name, str):
        raise RpcError(INVALID_PARAMS, "params.name must be the tool's name")
    tool = TOOLS.get(name)
    if tool is None:
        raise RpcError(INVALID_PARAMS, f"Unknown tool: {name[:100]}", {"known": list(TOOLS)})
    arguments = params.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise RpcError(INVALID_PARAMS, f"Invalid arguments for tool {name}: arguments must be an object")
    return call_tool(ctx(), tool, arguments)


def _dispatch(method: str, params: Dict[str, Any], modern: bool, ctx: Callable[[], ToolContext]) -> Dict[str, Any]:
    if method == "tools/call":
        return _call(params, ctx)
    handlers: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
        "server/discover": _discover, "tools/list": _list_tools}
    if not modern:  # removed in 2026-07-28
        handlers.update({"initialize": _initialize, "ping": lambda p: {}})
    handler = handlers.get(method)
    if handler is None:
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method[:100]}")  # never echoed at length
    return handler(params)


def _envelope(msg: Any) -> Dict[str, Any]:
    """The request object, or RpcError for a batch / a non-request (id readable or not)."""
    if isinstance(msg, list):
        raise RpcError(INVALID_REQUEST, "batches are not supported: send one JSON-RPC message per request",
                       status=400)
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or not isinstance(msg.get("method"), str):
        raise RpcError(INVALID_REQUEST, "body must be one JSON-RPC 2.0 request or notification", status=400)
    return msg


def handle(msg: Any, headers: Optional[HeaderLookup], ctx: Callable[[], ToolContext]) -> Reply:
    """Answer one decoded JSON-RPC message. ``headers`` (lower-case names) is None off HTTP."""
    msg_id: Any = msg.get("id") if isinstance(msg, dict) else None
    if isinstance(msg_id, bool) or not isinstance(msg_id, (str, int)):
        msg_id = None
    modern = isinstance(msg, dict) and is_modern(msg, headers)
    try:
        request = _envelope(msg)
        if "id" not in request:
            return Reply(202, None)  # notifications (initialized, cancelled, ...) need no answer
        if msg_id is None:
            raise RpcError(INVALID_REQUEST, "id must be a string or an integer", status=400)
        params = request.get("params", {})
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "params must be an object", status=400)
        method = request["method"]
        (_check_modern if modern else _check_legacy)(method, params, headers)
        result = _dispatch(method, params, modern, ctx)
    except RpcError as exc:
        status = exc.status or (_MODERN_STATUS.get(exc.code, 200) if modern else 200)
        return Reply(status, error_body(exc.code, exc.message, msg_id, exc.data))
    except Exception:  # a bug: logged with its traceback, answered without one
        log.exception("MCP %s failed", msg.get("method") if isinstance(msg, dict) else "message")
        return Reply(200, error_body(INTERNAL_ERROR, "internal error (see the service log)", msg_id))
    if modern:
        result = dict(result, resultType="complete", _meta={SERVER_INFO_KEY: SERVER_INFO})
    return Reply(200, {"jsonrpc": "2.0", "id": msg_id, "result": result})
