"""The official MCP SDK clients against a real server: Waitress on loopback, the real int8 model.

Matrix (client x protocol): mcp 2.x default mode (2026-07-28, discovered), mcp 2.x ``legacy`` mode
(initialize, 2025-11-25) and mcp 1.x (initialize, 2025-11-25); each lists the tools, stores a memory among
distractors, finds it by a paraphrase, gets, updates and deletes it (tests/mcp_clients/sdk_flow.py). The
SDKs are test extras only: 2.x in the project's venv, 1.x in .cache/mcp1-venv (two majors cannot share
one environment; scripts/setup --test creates it, MEMENTO_TEST_MCP1_PYTHON points elsewhere).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import yaml

from test_http_server import TOKEN, Server

REPO = Path(__file__).resolve().parents[1]
FLOW = Path(__file__).resolve().parent / "mcp_clients" / "sdk_flow.py"
READER_TOKEN = "mem_test-mcp-reader-token"
pytestmark = pytest.mark.real_model


def mcp1_python() -> str:
    """The interpreter of the mcp 1.x venv (fails with the command that creates it)."""
    path = os.environ.get("MEMENTO_TEST_MCP1_PYTHON") or str(REPO / ".cache" / "mcp1-venv" / "bin" / "python")
    if not Path(path).exists():
        pytest.fail(f"mcp 1.x client missing at {path}: run scripts/setup --test")
    return path


def start_server(home: Path) -> Server:
    """A real server (web.serve on Waitress) with a read+write token (TOKEN) and a read-only one."""
    import hashlib

    home.mkdir(parents=True, exist_ok=True)
    digest = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731
    (home / "config.yaml").write_text(yaml.safe_dump({
        "tokens": [{"name": "agent", "sha256": digest(TOKEN), "scopes": ["read", "write"]},
                   {"name": "reader", "sha256": digest(READER_TOKEN), "scopes": ["read"]}],
        "rate_limit_per_minute": 0}))
    return Server(home, "real").start()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("mcp-server"))
    yield srv
    srv.stop()


def run_flow(python: str, *args: str) -> Dict[str, Any]:
    """Run sdk_flow.py with ``python``; its JSON report."""
    proc = subprocess.run([python, str(FLOW), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_report(report: Dict[str, Any], protocol: str) -> None:
    """The acceptance flow, step by step."""
    assert report["protocol"] == protocol, report
    assert report["tools"] == sorted(["memory_store", "memory_search", "memory_get", "memory_update",
                                      "memory_delete", "memory_recent", "memory_stats"])
    mid = report["store"]["id"]
    assert report["store"]["created"] is True
    assert report["search"]["top_id"] == mid and report["search"]["mode"] == "hybrid", report["search"]
    assert "get groceries after work" in report["search"]["text"]
    assert report["get"]["text"] == "get groceries after work"
    assert report["update"]["text"] == "buy milk and bread after work"
    assert report["delete"] == {"id": mid, "deleted": True}
    assert report["get_after_delete"]["is_error"] and report["get_after_delete"]["error"]["code"] == "not_found"


CASES: List[Any] = [pytest.param("2.x", "auto", "2026-07-28", id="mcp2-default-2026-07-28"),
                    pytest.param("2.x", "legacy", "2025-11-25", id="mcp2-legacy-2025-11-25"),
                    pytest.param("1.x", "v1", "2025-11-25", id="mcp1-2025-11-25")]


@pytest.mark.parametrize("sdk, mode, protocol", CASES)
def test_sdk_client_over_http(server: Server, sdk: str, mode: str, protocol: str) -> None:
    python = sys.executable if sdk == "2.x" else mcp1_python()
    report = run_flow(python, "http", f"http://127.0.0.1:{server.port}/mcp", TOKEN, mode)
    assert report["sdk"].startswith(sdk[0] + ".")
    check_report(report, protocol)


def _rpc(port: int, body: Dict[str, Any], headers: Dict[str, str]) -> Dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/mcp", data=json.dumps(body).encode(), method="POST",
                                 headers=dict(headers, **{"Authorization": f"Bearer {TOKEN}",
                                                          "Content-Type": "application/json"}))
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_discovery_and_tools_list_leave_the_model_cold(tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path / "cold")
    try:
        meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}
        for method in ("server/discover", "tools/list"):
            body = _rpc(srv.port, {"jsonrpc": "2.0", "id": 1, "method": method, "params": {"_meta": meta}},
                        {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method})
            assert "result" in body, body
        req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/v1/stats",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["model_state"] == "cold"
    finally:
        srv.stop()


# --- the stdio bridge ------------------------------------------------------------------------------
STDIO_CASES: List[Any] = [pytest.param("2.x", "auto", "2026-07-28", "token-file", id="mcp2-default-2026-07-28"),
                          pytest.param("2.x", "legacy", "2025-11-25", "env", id="mcp2-legacy-2025-11-25"),
                          pytest.param("1.x", "v1", "2025-11-25", "token-file", id="mcp1-2025-11-25")]


@pytest.mark.parametrize("sdk, mode, protocol, how", STDIO_CASES)
def test_sdk_stdio_client_through_the_relay(server: Server, tmp_path: Path, sdk: str, mode: str, protocol: str,
                                            how: str) -> None:
    """The SDK's stdio client launches the bridge (`memento-edge mcp` or `python -m memento_edge.mcp.stdio`),
    which relays to the real server."""
    url = f"http://127.0.0.1:{server.port}"
    args = ["-m", "memento_edge", "mcp"]
    env = {"MEMENTO_CONFIG": ""}
    if how == "token-file":
        (tmp_path / "token").write_text(TOKEN + "\n")
        args += ["--url", url, "--token-file", str(tmp_path / "token")]
    else:  # the standard-library entry point, configured by the environment
        args = ["-m", "memento_edge.mcp.stdio"]
        env.update({"MEMENTO_URL": url, "MEMENTO_TOKEN": TOKEN})
    target = json.dumps({"command": sys.executable, "args": args, "env": env})
    report = run_flow(sys.executable if sdk == "2.x" else mcp1_python(), "stdio", target, mode)
    check_report(report, protocol)


def test_sdk_stdio_client_on_a_local_database(tmp_path: Path, model_dir: Path) -> None:
    """Without a URL the bridge serves a local database directly."""
    target = json.dumps({"command": sys.executable,
                         "args": ["-m", "memento_edge", "--model-dir", str(model_dir), "mcp"],
                         "env": {"MEMENTO_CONFIG": "", "MEMENTO_HOME": str(tmp_path / "local")}})
    check_report(run_flow(sys.executable, "stdio", target, "auto"), "2026-07-28")
    assert (tmp_path / "local" / "memento.db").exists()


def test_relay_reports_auth_errors_and_an_unreachable_appliance(server: Server) -> None:
    from memento_edge.mcp.stdio import Relay

    listing = {"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {}}
    bad = Relay(f"http://127.0.0.1:{server.port}", "mem_wrong-token")(listing)
    assert bad is not None and bad["id"] == 3 and "HTTP 401" in bad["error"]["message"]
    down = Relay("http://127.0.0.1:9", TOKEN, timeout=5)(listing)
    assert down is not None and "unreachable" in down["error"]["message"]
    assert Relay("http://127.0.0.1:9", TOKEN, timeout=5)({"jsonrpc": "2.0", "method": "notifications/x"}) is None


def test_relay_path_imports_only_the_standard_library() -> None:
    code = ("import sys, memento_edge.cli, memento_edge.mcp.stdio; "
            "print([m for m in ('numpy', 'flask', 'onnxruntime', 'tokenizers', 'yaml', 'memento_edge.memory') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
