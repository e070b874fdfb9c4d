"""``memento-edge mcp``: an MCP server on stdin/stdout (newline-delimited JSON-RPC), for clients that launch
a local command instead of calling a URL with headers (Claude Desktop, most IDE agents).

* **Relay** (``--url`` or ``MEMENTO_URL``): every message is POSTed to the appliance's ``/mcp`` with the
  bearer token (``--token-file`` or ``MEMENTO_TOKEN``) and the transport headers the HTTP binding requires
  (``MCP-Protocol-Version``, ``Mcp-Method``, ``Mcp-Name``, mirrored from the body; for the handshake
  generation the version ``initialize`` negotiated). Standard library only (``urllib``): this path imports
  neither numpy nor the model, so the bridge starts in a few tens of milliseconds on a laptop.
  Without the package's dependencies installed: ``python3 -m memento_edge.mcp.stdio --url ...``.
* **Local** (no URL): the same dispatcher as ``POST /mcp`` over a local database, with every scope (the
  user who can start the process can read the file anyway).

stdout carries protocol messages only; logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import IO, Any, Callable, Dict, Optional

from .wire import INTERNAL_ERROR, PARSE_ERROR, PV_KEY, encode_header, error_body

Handler = Callable[[Any], Optional[Dict[str, Any]]]


def serve_lines(handler: Handler, stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """Read one JSON-RPC message per line until EOF; write each answer as one line."""
    for raw in stdin:
        line = raw.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:  # includes UnicodeDecodeError
            answer: Optional[Dict[str, Any]] = error_body(PARSE_ERROR, "Parse error: the line is not valid JSON")
        else:
            answer = handler(msg)
        if answer is not None:
            stdout.write(json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
            stdout.flush()


class Relay:
    """Forward messages to ``url`` (the appliance's ``/mcp``), one POST each."""

    def __init__(self, url: str, token: Optional[str], timeout: float = 60.0) -> None:
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/mcp") else url.rstrip("/") + "/mcp"
        self.token = token
        self.timeout = timeout
        self.legacy_version: Optional[str] = None  # what initialize negotiated (handshake generation)

    def _headers(self, msg: Dict[str, Any]) -> Dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "User-Agent": "memento-edge-mcp-relay"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        method = msg.get("method")
        params: Dict[str, Any] = msg["params"] if isinstance(msg.get("params"), dict) else {}
        meta: Dict[str, Any] = params["_meta"] if isinstance(params.get("_meta"), dict) else {}
        if isinstance(meta.get(PV_KEY), str):  # 2026-07-28: mirror the body into the routing headers
            headers["MCP-Protocol-Version"] = meta[PV_KEY]
            if isinstance(method, str):
                headers["Mcp-Method"] = method
            if method == "tools/call" and isinstance(params.get("name"), str):
                headers["Mcp-Name"] = encode_header(params["name"])
        elif method != "initialize" and self.legacy_version:
            headers["MCP-Protocol-Version"] = self.legacy_version
        return headers

    def _post(self, msg: Any) -> "tuple[int, bytes]":
        headers = self._headers(msg) if isinstance(msg, dict) else {"Content-Type": "application/json"}
        if not isinstance(msg, dict) and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url, data=json.dumps(msg).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:  # 4xx/5xx still carry a body worth passing on
            return exc.code, exc.read()

    def __call__(self, msg: Any) -> Optional[Dict[str, Any]]:
        msg_id = msg.get("id") if isinstance(msg, dict) else None
        try:
            status, body = self._post(msg)
        except (OSError, ValueError) as exc:  # unreachable, refused, timed out, bad URL
            return None if msg_id is None else error_body(
                INTERNAL_ERROR, f"memento-edge at {self.url} is unreachable: {exc}", msg_id)
        try:
            answer = json.loads(body) if body else None
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("jsonrpc") == "2.0":
            if answer.get("id") is None and msg_id is not None:
                answer["id"] = msg_id
            result = answer.get("result")
            if isinstance(msg, dict) and msg.get("method") == "initialize" and isinstance(result, dict):
                self.legacy_version = result.get("protocolVersion")
            return answer
        if msg_id is None or status == 202:
            return None
        # The REST error shape (401, 403, 429, 503 from the app's hooks): say what the appliance said.
        detail = answer.get("error", {}) if isinstance(answer, dict) else {}
        message = detail.get("message") if isinstance(detail, dict) else None
        return error_body(INTERNAL_ERROR, f"memento-edge answered HTTP {status}: {message or 'no details'}",
                          msg_id, {"status": status, "error": detail or None})


def local_handler(settings: Any) -> "tuple[Handler, Callable[[], None]]":
    """A handler over a local database (and a function that closes it)."""
    from ..governor import Governor
    from ..memory import Memory
    from ..service import Service
    from .protocol import handle
    from .tools import ToolContext

    memory = Memory(settings)
    # A governor without a ceiling (it only reports RSS): the local bridge runs for one agent like the
    # CLI, not as the appliance's shared service, so it sheds nothing.
    service = Service(memory, Governor(0, lambda: memory.embedder))
    ctx = ToolContext(service=service, principal="local", allows=lambda scope: True)
    return (lambda msg: handle(msg, None, lambda: ctx).body), memory.close


def run(url: Optional[str], token: Optional[str], settings_loader: Callable[[], Any],
        stdin: Optional[IO[bytes]] = None, stdout: Optional[IO[bytes]] = None) -> None:
    """Serve stdio until EOF: relay to ``url`` when given, else serve the local database."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    if url:
        serve_lines(Relay(url, token), stdin, stdout)
        return
    handler, close = local_handler(settings_loader())
    try:
        serve_lines(handler, stdin, stdout)
    finally:
        close()


def main(argv: Optional[list] = None) -> None:
    """``python3 -m memento_edge.mcp.stdio --url URL``: the relay with nothing but the standard library."""
    parser = argparse.ArgumentParser(prog="python3 -m memento_edge.mcp.stdio", description=main.__doc__)
    parser.add_argument("--url", default=os.environ.get("MEMENTO_URL"), help="the appliance (env MEMENTO_URL)")
    parser.add_argument("--token-file", help="file holding the API token (or set MEMENTO_TOKEN)")
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("--url (or MEMENTO_URL) is required; `memento-edge mcp` also serves a local database")
    token = os.environ.get("MEMENTO_TOKEN")
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    run(args.url, token, lambda: None)


if __name__ == "__main__":
    main()
