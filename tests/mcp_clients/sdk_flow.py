"""Drive memento-edge through the official MCP Python SDK and print one JSON report (run as a script).

    python sdk_flow.py http  URL TOKEN MODE     MODE: auto (mcp 2.x default, 2026-07-28), legacy (mcp 2.x
                                                 initialize handshake) or v1 (mcp 1.x, initialize)
    python sdk_flow.py stdio COMMAND_JSON MODE   the stdio bridge, launched by the SDK's stdio client

The flow is the issue's acceptance list: list tools, store a memory, find it by a paraphrase, get it,
update it, delete it (and see it gone). It runs in a subprocess of the test because mcp 1.x and 2.x cannot
share one environment: the 1.x run uses the interpreter scripts/setup --test put in .cache/mcp1-venv.
"""
from __future__ import annotations

import asyncio
import json
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict

from importlib.metadata import version

MAJOR = int(version("mcp").split(".")[0])
STORED = "get groceries after work"
PARAPHRASE = "buy food"
UPDATED = "buy milk and bread after work"
DISTRACTORS = ["the cat sleeps on the sofa", "quarterly budget meeting with Anna on Tuesday",
               "the wifi password is on the fridge", "book a dentist appointment for March"]


def _structured(result: Any) -> Dict[str, Any]:
    return getattr(result, "structured_content", None) or getattr(result, "structuredContent", None) or {}


def _is_error(result: Any) -> bool:
    return bool(getattr(result, "is_error", None) or getattr(result, "isError", None))


@asynccontextmanager
async def _session_v2(kind: str, target: Any, mode: str) -> AsyncIterator[Any]:
    from mcp import Client

    if kind == "http":
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        url, token = target
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        server: Any = streamable_http_client(url, http_client=http)
    else:
        from mcp.client.stdio import StdioServerParameters

        server = StdioServerParameters(command=target["command"], args=target["args"], env=target.get("env"))
    async with Client(server, mode=mode) as client:
        yield client, client.protocol_version


@asynccontextmanager
async def _session_v1(kind: str, target: Any) -> AsyncIterator[Any]:
    from mcp import ClientSession

    if kind == "http":
        from mcp.client.streamable_http import streamablehttp_client

        url, token = target
        transport: Any = streamablehttp_client(url, headers={"Authorization": f"Bearer {token}"})
    else:
        from mcp.client.stdio import StdioServerParameters, stdio_client

        transport = stdio_client(StdioServerParameters(command=target["command"], args=target["args"],
                                                       env=target.get("env")))
    async with transport as streams:
        async with ClientSession(streams[0], streams[1]) as session:
            init = await session.initialize()
            yield session, init.protocolVersion


async def flow(kind: str, target: Any, mode: str) -> Dict[str, Any]:
    report: Dict[str, Any] = {"sdk": version("mcp"), "mode": mode}
    opened = _session_v2(kind, target, mode) if MAJOR >= 2 else _session_v1(kind, target)
    async with opened as (client, proto):
        report["protocol"] = proto
        tools = await client.list_tools()
        report["tools"] = sorted(t.name for t in tools.tools)
        for text in DISTRACTORS:  # so that finding the paraphrase means something
            await client.call_tool("memory_store", {"text": text})
        stored = await client.call_tool("memory_store", {"text": STORED, "tags": ["todo"]})
        memory_id = _structured(stored)["id"]
        report["store"] = {"id": memory_id, "created": _structured(stored)["created"]}
        found = await client.call_tool("memory_search", {"query": PARAPHRASE, "topk": 3})
        hits = _structured(found)["hits"]
        report["search"] = {"top_id": hits[0]["id"] if hits else None, "mode": _structured(found)["mode"],
                            "text": found.content[0].text}
        got = await client.call_tool("memory_get", {"id": memory_id})
        report["get"] = {"text": _structured(got)["text"]}
        updated = await client.call_tool("memory_update", {"id": memory_id, "text": UPDATED})
        report["update"] = {"text": _structured(updated)["text"]}
        deleted = await client.call_tool("memory_delete", {"id": memory_id})
        report["delete"] = _structured(deleted)
        gone = await client.call_tool("memory_get", {"id": memory_id})
        report["get_after_delete"] = {"is_error": _is_error(gone), "error": _structured(gone).get("error")}
    return report


def main(argv: list) -> None:
    kind = argv[1]
    if kind == "http":
        target: Any = (argv[2], argv[3])
        mode = argv[4]
    else:
        target = json.loads(argv[2])
        mode = argv[3]
    print(json.dumps(asyncio.run(flow(kind, target, mode))))


if __name__ == "__main__":
    main(sys.argv)
