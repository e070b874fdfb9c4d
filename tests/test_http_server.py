"""The HTTP service as a real process: Waitress on 127.0.0.1, real sockets, real SQLite file.

1. Eight client threads mix remember and recall for a bounded time: no request fails, and every id the
   server acknowledged can be read back afterwards.
2. The server is SIGKILLed in the middle of a write burst and restarted on the same database: every
   acknowledged id is still there and ``PRAGMA integrity_check`` is ``ok``.

The server runs in a subprocess (so it can be killed) through :data:`RUNNER`, which calls ``web.serve``
(the production entry point) on a free loopback port.
It uses the real int8 model when ``$MEMENTO_TEST_MODEL_DIR`` (or ``models/minilm-int8``) exists, since
concurrent ONNX inference is part of what is under test, and the deterministic FakeEmbedder otherwise.
Every loop is bounded in time and count; traffic goes to loopback only.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKEN = "mem_test-http-server-token"
LOAD_SECONDS = float(os.environ.get("MEMENTO_TEST_HTTP_SECONDS", "10"))
START_TIMEOUT = 60.0

# The server process: the production entry point ``web.serve`` (Waitress, SIGTERM handling, governor) around
# a Memory whose embedder the test chooses. argv[1]: "fake" | "real". Everything else comes from MEMENTO_*.
RUNNER = r"""
import sys
from memento_edge.config import Settings
from memento_edge.memory import Memory
from memento_edge.web import serve

settings = Settings.load()
embedder = None
if sys.argv[1] == "fake":
    from memento_edge.embedder import FakeEmbedder
    embedder = FakeEmbedder(settings)
elif sys.argv[1] == "slow-fake":  # 50 ms a text: a backlog that takes a while to drain
    import time
    from memento_edge.embedder import FakeEmbedder

    class SlowFake(FakeEmbedder):
        def embed_batch(self, texts):
            time.sleep(0.05 * len(texts))
            return super().embed_batch(texts)

    embedder = SlowFake(settings)
memory = Memory(settings, embedder=embedder)
try:
    serve(settings, memory=memory)
finally:
    memory.close()
"""


def _model_dir() -> Optional[Path]:
    """The real model directory if one is available for tests, else None."""
    env = os.environ.get("MEMENTO_TEST_MODEL_DIR")
    cand = Path(env) if env else REPO / "models" / "minilm-int8"
    return cand if (cand / "manifest.json").is_file() else None


# --- a tiny keep-alive JSON client ---------------------------------------------------------------------
class Client:
    """One keep-alive HTTP/1.1 connection to the server (one per thread: http.client is not thread-safe)."""

    def __init__(self, port: int, token: str = TOKEN, timeout: float = 30.0) -> None:
        self.port = port
        self.token = token
        self.timeout = timeout
        self.conn: Optional[http.client.HTTPConnection] = None

    def request(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        """Send one request; returns (status, parsed JSON body or None). Raises OSError on socket errors."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()  # the next request opens a fresh connection
            raise
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return resp.status, parsed

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --- the server process --------------------------------------------------------------------------------
class Server:
    """A memento-edge server subprocess on 127.0.0.1 with its own MEMENTO_HOME."""

    def __init__(self, home: Path, embedder: str, **settings: str) -> None:
        self.home = home
        self.embedder = embedder
        self.settings = settings  # extra MEMENTO_* settings, by lower-case name
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.log_path = home / f"server-{int(time.time() * 1000)}.log"

    def env(self) -> Dict[str, str]:
        config = self.home / "config.yaml"
        if not config.exists():
            import yaml

            config.write_text(yaml.safe_dump({
                "tokens": [{"name": "test", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                            "scopes": ["read", "write"]}],
                # The load test sends far more than a person would; the limiter has its own tests.
                "rate_limit_per_minute": 0,
                "threads": 4,
            }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMENTO_")}
        env.update({"MEMENTO_HOME": str(self.home), "MEMENTO_CONFIG": str(config),
                    "MEMENTO_HOST": "127.0.0.1", "MEMENTO_LOG_LEVEL": "WARNING",
                    "PYTHONUNBUFFERED": "1"})
        md = _model_dir()
        if md is not None:
            env["MEMENTO_MODEL_DIR"] = str(md)
        env.update({f"MEMENTO_{k.upper()}": v for k, v in self.settings.items()})
        return env

    def start(self) -> "Server":
        """Start the process and wait until /healthz answers; retries if the chosen port was taken."""
        for _attempt in range(3):
            self.port = _free_port()
            env = self.env()
            env["MEMENTO_PORT"] = str(self.port)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, self.embedder], cwd=str(REPO),
                                             env=env, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_healthy():
                return self
            if self.proc.poll() is None:
                break  # alive but not answering: not a port race
        self.kill()
        pytest.fail(f"server did not become healthy:\n{self.log_text()}")

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        client = Client(self.port, timeout=5)
        try:
            while time.monotonic() < deadline and self.proc is not None and self.proc.poll() is None:
                try:
                    status, _ = client.request("GET", "/healthz")
                    if status == 200:
                        return True
                except (OSError, http.client.HTTPException):
                    pass
                time.sleep(0.1)
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no flush, no checkpoint - what a power cut looks like to SQLite."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (web.serve closes the database on the way out); SIGKILL if it does not exit in 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"


def _free_port() -> int:
    """An unused loopback port (the tiny window before the server binds it is covered by retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def embedder_kind() -> str:
    return "real" if _model_dir() is not None else "fake"


def _integrity(db: Path) -> str:
    """``PRAGMA integrity_check`` of the database file, with sqlite-vec loaded so vec0 tables are checked."""
    conn = sqlite3.connect(str(db))
    try:
        try:
            import sqlite_vec

            conn.enable_load_extension(True)
            sqlite_vec.load(conn)
        except (ImportError, AttributeError, sqlite3.OperationalError):
            pass  # armv6 builds have no sqlite-vec; the core tables are still checked
        return ";".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


TOPICS = ["groceries", "dentist", "birthday", "deadline", "holiday", "garden", "bicycle", "concert",
          "library", "plumber", "passport", "recipe"]


# --- 1. concurrency ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eight_clients_mixing_remember_and_recall_lose_nothing(home: Path, embedder_kind: str) -> None:
    server = Server(home, embedder_kind).start()
    acked: Dict[int, str] = {}
    errors: List[str] = []
    lock = threading.Lock()
    counts = {"remember": 0, "recall": 0}
    stop_at = time.monotonic() + LOAD_SECONDS

    def worker(n: int) -> None:
        rnd = random.Random(n)
        client = Client(server.port)
        try:
            for i in range(5000):  # hard bound on top of the time bound
                if time.monotonic() >= stop_at:
                    break
                topic = rnd.choice(TOPICS)
                try:
                    if rnd.random() < 0.5:
                        text = f"client {n} note {i} about the {topic}: marker zq{n}x{i}"
                        status, body = client.request("POST", "/v1/memories", {
                            "text": text, "collection": f"c{n % 3}", "tags": [topic, f"t{n}"],
                            "importance": round(rnd.random(), 2), "metadata": {"n": n, "i": i}})
                        if status != 201 or not isinstance(body, dict) or not isinstance(body.get("id"), int):
                            raise AssertionError(f"remember -> {status} {body!r}")
                        with lock:
                            acked[body["id"]] = text
                            counts["remember"] += 1
                    else:
                        mode = rnd.choice(["hybrid", "vector", "keyword"])
                        status, body = client.request("POST", "/v1/recall", {
                            "query": f"what about the {topic}", "topk": 5, "mode": mode,
                            "filters": {"collection": f"c{rnd.randrange(3)}"} if rnd.random() < 0.3 else {}})
                        if status != 200 or not isinstance(body, dict) \
                                or not isinstance(body.get("hits"), list):
                            raise AssertionError(f"recall -> {status} {body!r}")
                        with lock:
                            counts["recall"] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
                    with lock:
                        errors.append(f"client {n} op {i}: {type(exc).__name__}: {exc}")
                    if len(errors) > 50:
                        return
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(n,), name=f"client-{n}") for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(LOAD_SECONDS + 120)
        assert not any(t.is_alive() for t in threads), "a client thread hung"
        assert errors == [], f"{len(errors)} failed requests, first: {errors[:5]}\n{server.log_text()}"
        assert counts["remember"] > 0 and counts["recall"] > 0, counts
        print(f"\n{embedder_kind} embedder, {LOAD_SECONDS:g} s: {counts}")  # shown with -s / in CI logs

        # Every acknowledged write is readable, with the text that was sent.
        client = Client(server.port)
        missing = []
        for mid, text in sorted(acked.items()):
            status, body = client.request("GET", f"/v1/memories/{mid}")
            if status != 200 or body.get("text") != text:
                missing.append((mid, status))
        assert missing == [], f"{len(missing)} acknowledged ids not readable: {missing[:10]}"
        assert len(set(acked)) == counts["remember"], "the server handed out the same id twice"

        # And findable by its words (the FTS index was written in the same transaction).
        for mid, text in random.Random(0).sample(sorted(acked.items()), min(20, len(acked))):
            marker = text.rsplit(" ", 1)[1]
            status, body = client.request("POST", "/v1/recall",
                                          {"query": marker, "mode": "keyword", "topk": 5})
            assert status == 200, body
            assert mid in [h["id"] for h in body["hits"]], f"keyword recall of {marker} missed #{mid}"
        client.close()
    finally:
        server.stop()
    assert _integrity(home / "memento.db") == "ok"


# --- 2. crash ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_write_burst_keeps_every_acknowledged_memory(home: Path, embedder_kind: str) -> None:
    acked: Dict[int, str] = {}
    lock = threading.Lock()

    for round_no in range(2):  # kill twice: the second crash lands on a database recovered from the first
        server = Server(home, embedder_kind).start()
        killed = threading.Event()
        first_error: List[str] = []

        def writer(n: int, port: int = server.port, rnd_no: int = round_no,
                   killed: threading.Event = killed, first_error: List[str] = first_error) -> None:
            client = Client(port, timeout=10)
            try:
                for i in range(100_000):  # bounded; the kill ends it long before
                    text = f"round {rnd_no} writer {n} item {i}: buy milk and eggs"
                    try:
                        status, body = client.request("POST", "/v1/memories",
                                                      {"text": text, "tags": ["crash"]})
                    except (OSError, http.client.HTTPException):
                        if killed.is_set():
                            return  # expected: the server died under us
                        raise
                    if status != 201:
                        first_error.append(f"{status} {body!r}")
                        return
                    with lock:
                        acked[body["id"]] = text
            finally:
                client.close()

        threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(4)]
        before = len(acked)
        for t in threads:
            t.start()
        # Kill once the burst is well under way (some writes acknowledged), at a random moment.
        deadline = time.monotonic() + 60
        while len(acked) - before < 30 and time.monotonic() < deadline and not first_error:
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.3))
        killed.set()
        server.kill()
        for t in threads:
            t.join(30)
        server.stop()
        assert not first_error, f"write failed before the kill: {first_error[0]}\n{server.log_text()}"
        assert len(acked) - before >= 30, f"too few writes acknowledged before the kill\n{server.log_text()}"
        print(f"\nround {round_no}: killed after {len(acked) - before} acknowledged writes")

    assert _integrity(home / "memento.db") == "ok"
    server = Server(home, embedder_kind).start()
    try:
        client = Client(server.port)
        lost = []
        for mid, text in sorted(acked.items()):
            status, body = client.request("GET", f"/v1/memories/{mid}")
            if status != 200 or body.get("text") != text:
                lost.append((mid, status))
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged memories lost: {lost[:10]}"
        # The recovered store still answers searches and takes writes.
        status, body = client.request("POST", "/v1/recall", {"query": "milk and eggs", "topk": 3})
        assert status == 200 and body["hits"], body
        status, body = client.request("POST", "/v1/memories", {"text": "written after recovery"})
        assert status == 201, body
        client.close()
    finally:
        server.stop()
    assert _integrity(home / "memento.db") == "ok"


def _backlog(client: Client) -> Dict[str, Any]:
    status, body = client.request("GET", "/readyz")
    assert status == 200, body
    return dict(body["backlog"])


@pytest.mark.slow
def test_sigkill_mid_backlog_then_the_restarted_service_drains_it(home: Path) -> None:
    """embed_mode background: writes are acknowledged pending, the service is SIGKILLed while its worker
    is part-way through the backlog, and the restarted service (web.serve starts the worker) embeds the
    rest by itself: nothing acknowledged is lost, every memory ends with its vector."""
    server = Server(home, "slow-fake", embed_mode="background").start()
    acked: Dict[int, str] = {}
    try:
        client = Client(server.port)
        for i in range(60):
            text = f"backlog note {i}: the {i}th jar of jam is on shelf {i % 7}"
            status, body = client.request("POST", "/v1/memories", {"text": text})
            assert status == 201 and body["embedding"] == "pending", body
            acked[body["id"]] = text
        deadline = time.monotonic() + 60
        while _backlog(client)["pending"] > 45 and time.monotonic() < deadline:
            time.sleep(0.02)
        pending = _backlog(client)["pending"]
        server.kill()
        client.close()
    finally:
        server.stop()
    assert 0 < pending <= 45, f"the worker was not part-way through the backlog ({pending} pending)"

    server = Server(home, "slow-fake", embed_mode="background").start()
    try:
        client = Client(server.port)
        deadline = time.monotonic() + 60
        while _backlog(client)["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _backlog(client)["pending"] == 0, server.log_text()
        for mid, text in acked.items():
            status, body = client.request("GET", f"/v1/memories/{mid}")
            assert status == 200 and body["text"] == text and body["embedding"] == "done", (mid, body)
        status, body = client.request("POST", "/v1/recall", {"query": "jar of jam shelf", "mode": "vector",
                                                             "topk": 100})
        assert status == 200 and {h["id"] for h in body["hits"]} == set(acked), body
        client.close()
    finally:
        server.stop()
    assert _integrity(home / "memento.db") == "ok"
