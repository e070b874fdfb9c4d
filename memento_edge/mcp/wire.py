"""The MCP wire facts both the server and the stdio relay need - standard library only, so that
``memento-edge mcp --url`` relays without importing numpy, Flask or the model code."""
from __future__ import annotations

import base64
import binascii
from typing import Any, Dict, Optional

MODERN_VERSIONS = ("2026-07-28",)
LEGACY_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")
HANDSHAKE_ERA = ("2024-11-05",) + LEGACY_VERSIONS  # versions that use initialize (2024-11-05: not served)
SUPPORTED_VERSIONS = MODERN_VERSIONS + LEGACY_VERSIONS
PV_KEY = "io.modelcontextprotocol/protocolVersion"
CAPS_KEY = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
HEADER_MISMATCH, UNSUPPORTED_VERSION = -32020, -32022
_SENTINEL = ("=?base64?", "?=")


def error_body(code: int, message: str, msg_id: Any = None, data: Any = None) -> Dict[str, Any]:
    """A JSON-RPC error response (``id`` null when the request's id could not be read)."""
    err: Dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": msg_id, "error": err}


def encode_header(value: str) -> str:
    """A header value as the specification's Base64 sentinel when it is not plain visible ASCII."""
    plain = all(0x20 <= ord(c) <= 0x7E for c in value) and value == value.strip()
    if plain and not (value.startswith(_SENTINEL[0]) and value.endswith(_SENTINEL[1])):
        return value
    return _SENTINEL[0] + base64.b64encode(value.encode("utf-8")).decode("ascii") + _SENTINEL[1]


def decode_header(value: Optional[str]) -> Optional[str]:
    """A ``Mcp-Name`` value with the Base64 sentinel decoded (None when it does not decode)."""
    if value and value.startswith(_SENTINEL[0]) and value.endswith(_SENTINEL[1]):
        try:
            return base64.b64decode(value[len(_SENTINEL[0]):-len(_SENTINEL[1])], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return value
