"""The service log (#15, finding 1): configured from the settings, structured, quiet where it should be."""
from __future__ import annotations

import io
import json
import logging

import pytest

from memento_edge import logs
from memento_edge.config import Settings
from memento_edge.errors import InvalidInput


@pytest.mark.parametrize("host,expected", [("127.0.0.1", "http://127.0.0.1:8079"), ("::1", "http://[::1]:8079"),
                                           ("[::1]", "http://[::1]:8079"), ("::", "http://[::]:8079"),
                                           ("pi.local", "http://pi.local:8079")])
def test_url_brackets_ipv6(host: str, expected: str) -> None:
    assert logs.url(host, 8079) == expected


def test_log_level_from_settings_lets_info_through() -> None:
    out = io.StringIO()
    with logs.configured(Settings(log_level="debug"), out):
        logging.getLogger("memento_edge.web").debug("a debug line")
        logging.getLogger("memento_edge.web").info("an info line")
    with logs.configured(Settings(log_level="WARNING"), out):
        logging.getLogger("memento_edge.web").info("dropped")
    text = out.getvalue()
    assert "DEBUG memento_edge.web: a debug line" in text and "INFO memento_edge.web: an info line" in text
    assert "dropped" not in text


def test_configured_restores_the_root_logger() -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level, list(logging.getLogger("waitress").filters))
    with logs.configured(Settings(log_level="DEBUG"), io.StringIO()):
        assert root.level == logging.DEBUG
    assert (list(root.handlers), root.level, list(logging.getLogger("waitress").filters)) == before


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(InvalidInput, match="log_level"):
        logs.configure(Settings(log_level="LOUD"), io.StringIO())
    with pytest.raises(InvalidInput, match="log_format"):
        logs.configure(Settings(log_format="xml"), io.StringIO())


def test_json_format_has_the_request_fields() -> None:
    out = io.StringIO()
    with logs.configured(Settings(log_format="json"), out):
        logs.request("POST", "/v1/memories/{memory_id}", 201, 12.345, "agent-7", "10.0.0.5")
    (line,) = out.getvalue().splitlines()
    rec = json.loads(line)
    assert rec["logger"] == "memento_edge.access" and rec["level"] == "INFO"
    assert {k: rec[k] for k in ("event", "method", "route", "status", "ms", "token", "client")} == {
        "event": "request", "method": "POST", "route": "/v1/memories/{memory_id}", "status": 201, "ms": 12.3,
        "token": "agent-7", "client": "10.0.0.5"}
    assert rec["ts"].endswith("+00:00")


def test_text_request_line_is_one_line_with_every_field() -> None:
    out = io.StringIO()
    with logs.configured(Settings(), out):
        logs.request("GET", "/v1/recall", 200, 3.0, "anonymous", "::1")
    (line,) = out.getvalue().splitlines()
    assert line.endswith("INFO memento_edge.access: GET /v1/recall 200 3.0ms token=anonymous client=::1")


def test_waitress_warnings_are_rate_limited() -> None:
    now = [1000.0]
    limit = logs.RateLimit(interval=60, clock=lambda: now[0])
    out = io.StringIO()
    with logs.configured(Settings(), out):
        waitress_log = logging.getLogger("waitress")
        waitress_log.filters[:] = [limit]
        for n in range(50):
            waitress_log.warning("Client %d disconnected", n)
        now[0] += 61
        waitress_log.warning("Client %d disconnected", 99)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("Client 0 disconnected")
    assert lines[1].endswith("Client 99 disconnected (49 more like this in the last 60 s)")


def test_waitress_gets_a_rate_limit_when_configured() -> None:
    with logs.configured(Settings(), io.StringIO()):
        assert any(isinstance(f, logs.RateLimit) for f in logging.getLogger("waitress").filters)
