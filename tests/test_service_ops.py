"""The service as an operator runs it: `memento-edge serve` in a real process (#15, findings 1, 3, 4, 7).

One server per test module, started through the CLI (so logging is configured exactly as in
production) with a config file holding two tokens and no model. Checked against its stderr and over
real sockets: the start line, one access line per request, the stop line, an honest /readyz without a
model, token revoke/rotate taking effect while it runs, SIGHUP reloading, the token name on responses.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from click.testing import CliRunner

from memento_edge.auth import create_token
from memento_edge.cli import main

START_TIMEOUT = 60.0


def _free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ipv6_loopback() -> bool:
    try:
        _free_port(socket.AF_INET6, "::1")
        return True
    except OSError:
        return False


class Service:
    """``python -m memento_edge --config CFG serve`` with stderr in a file."""

    def __init__(self, tmp: Path, config: Dict[str, Any], host: str = "127.0.0.1") -> None:
        import yaml

        self.tmp = tmp
        self.host = host
        self.cfg = tmp / "config.yaml"
        self.cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = tmp / "serve.log"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.port = _free_port(family, host)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMENTO_")}
        env.update({"MEMENTO_HOME": str(tmp / "home"), "MEMENTO_MODEL_DIR": str(tmp / "no-model"),
                    "PYTHONUNBUFFERED": "1"})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memento_edge", "--config", str(self.cfg), "serve", "--host", host,
                 "--port", str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"service did not start:\n{self.log()}")

    def request(self, method: str, path: str, token: Optional[str] = None,
                body: Any = None) -> Tuple[int, Any, Dict[str, str]]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None), {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    def wait_status(self, path: str, token: str, want: int, timeout: float = 5.0) -> float:
        """Seconds until ``path`` answers ``want`` with ``token`` (fails after ``timeout``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.request("GET", path, token)[0] == want:
                return time.monotonic() - t0
            time.sleep(0.1)
        pytest.fail(f"{path} never answered {want} within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def lines(self, needle: str) -> List[str]:
        return [line for line in self.log().splitlines() if needle in line]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


@pytest.fixture(scope="module")
def tokens() -> Dict[str, Tuple[str, Dict[str, Any]]]:
    return {name: create_token(name, ["read", "write"]) for name in ("agent-7", "laptop")}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tokens) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("svc"), {"tokens": [e for _, e in tokens.values()],
                                                    "rate_limit_per_minute": 0})
    try:
        yield svc
    finally:
        svc.stop()


def test_start_line_names_address_auth_model_and_database(service: Service) -> None:
    (line,) = service.lines("listening on")
    assert f"listening on http://127.0.0.1:{service.port}" in line
    assert "auth=tokens tokens=2" in line and "model=missing" in line
    assert f"database={service.tmp / 'home' / 'memento.db'}" in line
    assert "vectors=sqlite-vec" in line


def test_no_model_warns_at_start_and_readyz_is_honest(service: Service) -> None:
    assert any("no embedding model" in line and "WARNING" in line for line in service.lines("model"))
    status, body, _ = service.request("GET", "/readyz")
    # Reads still work (recall answers by keyword), so the service stays in rotation - and says that
    # writes do not, and why.
    assert status == 200 and body["ready"] is True
    assert body["model"]["state"] == "missing" and body["writes"] is False
    assert "memento-edge model build" in body["reason"]
    assert body["vectors"]["backend"] == "sqlite-vec" and body["vectors"]["sqlite_extensions"] is True


def test_one_access_line_per_request_with_token_name(service: Service, tokens) -> None:
    secret = tokens["laptop"][0]
    status, _, headers = service.request("GET", "/v1/memories?limit=3&collection=secret-words", secret)
    assert status == 200 and headers["x-memento-token"] == "laptop"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not service.lines("GET /v1/memories 200"):
        time.sleep(0.05)
    (line,) = service.lines("GET /v1/memories 200")
    assert "INFO memento_edge.access:" in line and "token=laptop client=127.0.0.1" in line
    assert "secret-words" not in service.log() and secret not in service.log()


def test_revoke_and_rotate_take_effect_on_the_running_service(service: Service, tokens) -> None:
    agent, laptop = tokens["agent-7"][0], tokens["laptop"][0]
    assert service.request("GET", "/v1/stats", agent)[0] == 200
    r = CliRunner().invoke(main, ["--config", str(service.cfg), "token", "revoke", "agent-7"])
    assert r.exit_code == 0, r.output
    took = service.wait_status("/v1/stats", agent, 401)
    assert took < 3.0
    assert service.request("GET", "/v1/stats", laptop)[0] == 200
    r = CliRunner().invoke(main, ["--config", str(service.cfg), "token", "rotate", "laptop"])
    assert r.exit_code == 0, r.output
    new = r.stdout.strip()
    service.wait_status("/v1/stats", laptop, 401)
    assert service.request("GET", "/v1/stats", new)[0] == 200
    assert service.lines("tokens reloaded")


def test_sighup_reloads_the_tokens(service: Service) -> None:
    import yaml

    secret, entry = create_token("hup", ["read"])
    data = yaml.safe_load(service.cfg.read_text())
    data["tokens"].append(entry)
    st = service.cfg.stat()
    service.cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
    os.utime(service.cfg, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only SIGHUP can tell
    before = len(service.lines("tokens reloaded"))
    os.kill(service.proc.pid, signal.SIGHUP)
    assert service.wait_status("/v1/stats", secret, 200) < 3.0
    assert len(service.lines("tokens reloaded")) == before + 1


def test_stop_line_on_sigterm(tmp_path: Path) -> None:
    svc = Service(tmp_path, {"log_format": "json"})
    assert svc.stop() == 0
    events = [json.loads(line) for line in svc.log().splitlines() if line.startswith("{")]
    kinds = [e.get("event") for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop"
    assert events[0]["auth"] == "loopback-open" and events[0]["address"] == f"http://127.0.0.1:{svc.port}"


def test_ipv6_address_is_bracketed(tmp_path: Path) -> None:
    if not _ipv6_loopback():
        pytest.fail("no IPv6 loopback on this machine (::1)")
    svc = Service(tmp_path, {}, host="::1")
    try:
        assert svc.lines(f"listening on http://[::1]:{svc.port}")
    finally:
        svc.stop()


def test_appliance_unit_reload_sends_sighup() -> None:
    """`systemctl reload memento-edge` on the appliance is the SIGHUP that re-reads the tokens."""
    unit = (Path(__file__).resolve().parents[1] / "ansible" / "roles" / "memento_edge" / "templates"
            / "memento-edge.service.j2").read_text(encoding="utf-8")
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.splitlines()
