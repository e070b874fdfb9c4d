"""``/mcp`` in the service's OpenAPI document: enough for schemathesis to fuzz it and for a reader to find it.

The JSON-RPC payloads themselves are MCP's (the tools and their schemas are listed by ``tools/list``); the
document states the envelope, the HTTP statuses and which bodies come in the REST error shape (auth, scope
and rate limit, answered by the app's hooks before MCP sees the request) and which in JSON-RPC's.
"""
from __future__ import annotations

from typing import Any, Dict

_ID = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
REQUEST = {"type": "object", "required": ["jsonrpc", "method"], "properties": {
    "jsonrpc": {"type": "string", "enum": ["2.0"]}, "id": _ID,
    # Not an enum: an unknown method is answered by JSON-RPC (-32601), with 200 in the 2025 generation.
    "method": {"type": "string", "description": "server/discover, tools/list, tools/call; 2025 generation "
                                                "also initialize, ping, notifications/*."},
    "params": {"type": "object"}}}
RESPONSE = {"type": "object", "required": ["jsonrpc"], "properties": {
    "jsonrpc": {"type": "string", "enum": ["2.0"]}, "id": {"description": "The request's id (null when unreadable)."},
    "result": {"type": "object"},
    "error": {"type": "object", "required": ["code", "message"],
              "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "data": {}}}}}


def _json(schema: Dict[str, Any], description: str) -> Dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def mcp_path() -> Dict[str, Any]:
    """The path item of ``/mcp`` (POST only; GET and DELETE answer 405)."""
    rpc = {"$ref": "#/components/schemas/McpMessage"}
    ref = lambda name: {"$ref": f"#/components/responses/{name}"}  # noqa: E731
    return {"post": {
        "operationId": "mcp", "summary": "Model Context Protocol endpoint (JSON-RPC 2.0)",
        "description": "MCP Streamable HTTP, protocol 2026-07-28 (stateless, `_meta` + `MCP-Protocol-Version`, "
                       "`server/discover`) and 2025-11-25 / 2025-06-18 / 2025-03-26 (`initialize`). One "
                       "request or notification per POST; always answered with application/json.\n\n"
                       "Scope: `read` (write tools also need `write`).",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/McpRequest"}}}},
        "responses": {
            "200": _json(rpc, "A JSON-RPC response (a result, or an error in the 2025 generation)."),
            "202": {"description": "A notification was accepted (no body)."},
            "400": _json(rpc, "Malformed JSON-RPC, header mismatch, unsupported protocol version."),
            "401": ref("Unauthorized"),
            "403": ref("Forbidden"),
            "404": _json(rpc, "Unknown method (2026-07-28)."),
            "406": _json(rpc, "Accept does not allow application/json."),
            "413": ref("PayloadTooLarge"),
            "415": _json(rpc, "Content-Type is not application/json."),
            "429": ref("TooManyRequests"),
            "503": ref("Unavailable"),
        }}}


def mcp_schemas() -> Dict[str, Any]:
    """The component schemas ``mcp_path`` refers to."""
    return {"McpRequest": REQUEST, "McpMessage": RESPONSE}
