"""Settings: one dataclass, built from a declarative table.

Precedence (lowest first): built-in defaults < YAML config file < ``MEMENTO_*`` environment < explicit
overrides passed by the caller (CLI flags, tests). Every setting is documented here, once; the README
table (:func:`settings_markdown`) and ``memento-edge config`` are generated from :data:`SETTINGS`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .errors import InvalidInput

DEFAULT_CONFIG_FILE = "/etc/memento-edge/config.yaml"  # the system file (the appliance's, root's default)


def user_config_file(env: Optional[Mapping[str, str]] = None) -> Path:
    """A user's own config file: ``$XDG_CONFIG_HOME/memento-edge/config.yaml`` (~/.config/...)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "memento-edge" / "config.yaml"


def venv_config_file() -> Optional[Path]:
    """``<venv>/etc/memento-edge/config.yaml`` when running in a virtualenv, else None.

    ``scripts/setup`` writes it (``model_dir`` of the model it built), so a checkout's
    ``.venv/bin/memento-edge`` finds that model; like pip's per-environment ``<venv>/pip.conf``.
    """
    import sys
    if sys.prefix == getattr(sys, "base_prefix", sys.prefix):
        return None
    return Path(sys.prefix) / "etc" / "memento-edge" / "config.yaml"


def _is_root() -> bool:
    geteuid = getattr(os, "geteuid", None)
    return bool(geteuid and geteuid() == 0)


def config_search_path(env: Optional[Mapping[str, str]] = None) -> List[Path]:
    """Files tried, in order, when no config file is named: the virtualenv's, the user's (not for root),
    the system's. The first that exists is read; only one file is ever read."""
    found = [venv_config_file()] + ([] if _is_root() else [user_config_file(env)]) + [Path(DEFAULT_CONFIG_FILE)]
    return [p for p in found if p is not None]


def config_unreadable(path: Any) -> InvalidInput:
    """The error for a config file this user may not read, saying what to do instead (the appliance's
    /etc/memento-edge is readable by root and the service's group only)."""
    return InvalidInput(f"cannot read config file {path}: permission denied. Run as root (sudo), or name a "
                        "file you can read with --config FILE (or MEMENTO_CONFIG)", field="config")


def default_config_file(env: Optional[Mapping[str, str]] = None) -> Path:
    """The config file used when none is named: the first of :func:`config_search_path` that exists, else
    where a new one belongs (the user's file, or the system's for root) - ``token create`` writes there.

    Raises :class:`InvalidInput` when a candidate's directory may not be searched: carrying on with the
    next file would quietly give a non-root user their own settings and tokens the service never reads.
    """
    for path in config_search_path(env):
        try:
            if path.is_file():
                return path
        except PermissionError:
            raise config_unreadable(path) from None
    return Path(DEFAULT_CONFIG_FILE) if _is_root() else user_config_file(env)


@dataclass(frozen=True)
class Setting:
    """One documented setting: its name, type, default and help text."""

    name: str
    type: Callable[[Any], Any]
    default: Any
    help: str


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _optional_str(value: Any) -> Optional[str]:
    return None if value in (None, "") else str(value)


def _str_list(value: Any) -> List[str]:
    if isinstance(value, str):  # from the environment: comma-separated
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return list(value)


def _clock_mode(value: Any) -> str:
    from .clock import CLOCK_MODES

    text = str(value).strip().lower()
    if text not in CLOCK_MODES:
        raise ValueError(f"clock must be one of {', '.join(CLOCK_MODES)}")
    return text


EMBED_MODES = ("auto", "inline", "background")


def _embed_mode(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in EMBED_MODES:
        raise ValueError(f"embed_mode must be one of {', '.join(EMBED_MODES)}")
    return text


SETTINGS: List[Setting] = [
    Setting("home", _optional_str, None,
            "State directory; default $XDG_DATA_HOME/memento-edge (~/.local/share/memento-edge)."),
    Setting("db", _optional_str, None, "SQLite database file; default <home>/memento.db."),
    Setting("model_dir", _optional_str, None, "Model directory built by `memento-edge model build`; "
            "default <home>/model."),
    Setting("host", str, "127.0.0.1", "Address the HTTP service binds to."),
    Setting("port", int, 8077, "TCP port of the HTTP service."),
    Setting("threads", int, 4, "Waitress worker threads."),
    Setting("connection_limit", int, 100, "Waitress: maximum simultaneous connections (idle keep-alives are "
            "closed early once 3/4 of them are open)."),
    Setting("channel_timeout", int, 30, "Waitress: seconds an idle connection is kept."),
    Setting("header_timeout", float, 10.0, "Seconds a client may take to send a request's headers (the whole "
            "request: 4x this); slower connections are closed (slowloris)."),
    Setting("connections_per_client", int, 20, "Most connections one client address may hold open."),
    Setting("request_timeout", float, 30.0, "Seconds a request may wait for the model or the database."),
    Setting("max_body_bytes", int, 2 * 1024 * 1024, "Largest accepted request body (413 above, before it is "
            "read). 2 MiB holds a batch of the most text work_token_budget lets one request embed."),
    Setting("rate_limit_per_minute", int, 600, "Requests per minute per token (or client address); 0 = off."),
    Setting("insecure_no_auth", _bool, False,
            "Allow serving on a non-loopback address with no token configured (not recommended)."),
    Setting("ort_threads", int, 1, "onnxruntime intra-op threads per inference (one slow core per request)."),
    Setting("cache_entries", int, 1000, "Embedding LRU cache: maximum entries."),
    Setting("cache_mb", float, 4.0, "Embedding LRU cache: maximum megabytes of vectors."),
    Setting("batch_token_budget", int, 2048,
            "Largest padded-token count (batch x longest sequence) of one mini-batch; only used with padded "
            "batching (the int8 default embeds each text alone: batch-dependent activation scales would "
            "otherwise change a text's vector)."),
    Setting("max_tokens", int, 256, "Token truncation length of the embedding model."),
    Setting("work_token_budget", int, 65536,
            "Embedding work (estimated tokens: characters / 4, at most max_tokens per text) one request may "
            "ask for and all writes may have in flight; larger requests are refused (split them), writes "
            "that do not fit beside running ones are shed with 503."),
    Setting("warmup", _bool, False, "Load the model in the background at start instead of on first use."),
    Setting("idle_unload_minutes", float, 0.0, "Unload the model after this many idle minutes (0 = never)."),
    Setting("rss_limit_mb", int, 0, "Memory governor ceiling for the service's RSS in MB (0 = off)."),
    Setting("synchronous", str, "FULL",
            "SQLite synchronous mode for WAL: FULL (every acknowledged write survives power loss) or NORMAL."),
    Setting("dedupe_threshold", float, 0.0,
            "Cosine similarity at or above which a new memory in the same collection is treated as a "
            "duplicate of an existing one (0 = exact text only)."),
    Setting("embed_mode", _embed_mode, "auto",
            "When a memory's vector is computed: inline (remember waits for the model) or background (remember "
            "answers at once with embedding 'pending'; the service embeds the backlog in order, queries "
            "first). auto = background on armv6l (a Pi Zero / Zero W), inline elsewhere."),
    Setting("vector_backend", str, "auto",
            "Vector index of a NEW database: auto (sqlite-vec when loadable, else numpy), sqlite-vec, numpy."),
    Setting("clock", _clock_mode, "auto",
            "Trust in the wall clock: auto (systemd-timesyncd / kernel NTP state), trusted (board with an "
            "RTC), untrusted. Memories stored while it is untrusted are flagged and re-dated once it is."),
    Setting("device_status", str, "/run/memento-edge-device/status.json",
            "Status file the appliance's first-boot script writes (first-boot file applied or refused, Wi-Fi "
            "firmware); shown by /readyz and, with the generated token, on the web page to loopback/USB clients."),
    Setting("log_level", str, "INFO", "Logging level of `serve`: DEBUG, INFO (one line per request), WARNING, "
            "ERROR."),
    Setting("log_format", str, "text", "Log lines of `serve`: text (for people) or json (one object per line, "
            "for journald/Loki)."),
    Setting("mcp_allowed_origins", _str_list, [],
            "Browser origins (e.g. https://chat.example) allowed to call /mcp besides the service's own page; "
            "requests without an Origin header (every non-browser client) always pass. Comma-separated in "
            "the environment."),
    Setting("tokens", list, [], "API tokens: list of {name, sha256, scopes} (see `memento-edge token create`)."),
]

_SETTING_BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}

# Settings only a config file can set: a list of token digests does not fit an environment variable.
FILE_ONLY = frozenset({"tokens"})


def settings_markdown() -> str:
    """The README's table of settings, generated from :data:`SETTINGS` (tests/test_docs.py checks that the
    README holds exactly this text, so a default or help changed here cannot leave the README behind)."""
    rows = ["| setting (YAML key) | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        env = "(config file only)" if s.name in FILE_ONLY else f"`MEMENTO_{s.name.upper()}`"
        rows.append(f"| `{s.name}` | {env} | `{'—' if s.default is None else s.default}` | {s.help} |")
    return "\n".join(rows) + "\n"

# Allowed ranges of the numeric settings (inclusive). A value outside is refused at load, naming the setting
# and the source: 0 threads or connections served nothing, a port over 65535 wrapped to another port, a
# negative body limit refused every POST, and an infinite cache size overflowed later.
LIMITS: Dict[str, Tuple[float, float]] = {
    "port": (1, 65535), "threads": (1, 256), "connection_limit": (1, 100_000), "channel_timeout": (1, 86_400),
    "header_timeout": (0.5, 3600), "connections_per_client": (1, 100_000),
    "request_timeout": (0.1, 3600), "max_body_bytes": (1, 2**31 - 1), "rate_limit_per_minute": (0, 10**9),
    "ort_threads": (1, 256), "cache_entries": (0, 10**8), "cache_mb": (0, 65_536),
    "batch_token_budget": (1, 10**8), "max_tokens": (1, 100_000), "work_token_budget": (256, 10**9),
    "idle_unload_minutes": (0, 10**7),
    "rss_limit_mb": (0, 10**7), "dedupe_threshold": (0, 1),
}


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Use :meth:`load` rather than the constructor in application code."""

    home: Optional[str] = None
    db: Optional[str] = None
    model_dir: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8077
    threads: int = 4
    connection_limit: int = 100
    channel_timeout: int = 30
    header_timeout: float = 10.0
    connections_per_client: int = 20
    request_timeout: float = 30.0
    # Parsing a body costs ~4x its size in RSS (bytes, decoded text, objects): 8 MiB batches took the service
    # from 110 to 141 MB each; the work budget (65,536 tokens ~ 260 KB of text) needs far less (issue #14).
    max_body_bytes: int = 2 * 1024 * 1024
    rate_limit_per_minute: int = 600
    insecure_no_auth: bool = False
    ort_threads: int = 1
    cache_entries: int = 1000
    cache_mb: float = 4.0
    batch_token_budget: int = 2048
    max_tokens: int = 256
    work_token_budget: int = 65536
    warmup: bool = False
    idle_unload_minutes: float = 0.0
    rss_limit_mb: int = 0
    synchronous: str = "FULL"
    dedupe_threshold: float = 0.0
    embed_mode: str = "auto"
    vector_backend: str = "auto"
    clock: str = "auto"
    device_status: str = "/run/memento-edge-device/status.json"
    log_level: str = "INFO"
    log_format: str = "text"
    mcp_allowed_origins: List[str] = field(default_factory=list)
    tokens: List[Dict[str, Any]] = field(default_factory=list)
    config_file: Optional[str] = None

    # --- derived paths -------------------------------------------------------------------------
    @property
    def home_path(self) -> Path:
        """The state directory (``MEMENTO_HOME``)."""
        if self.home:
            return Path(self.home).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        return Path(base) / "memento-edge"

    @property
    def db_path(self) -> Path:
        """The SQLite database file (``MEMENTO_DB``)."""
        return Path(self.db).expanduser() if self.db else self.home_path / "memento.db"

    @property
    def model_path(self) -> Path:
        """The model directory (``MEMENTO_MODEL_DIR``)."""
        return Path(self.model_dir).expanduser() if self.model_dir else self.home_path / "model"

    @property
    def embed_background(self) -> bool:
        """Whether ``remember`` leaves embedding to the background worker (``embed_mode``)."""
        if self.embed_mode == "auto":
            # An armv6 core needs seconds per text: a write must not wait for that.
            return platform.machine().lower().startswith("armv6")
        return self.embed_mode == "background"

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied (validated like any other source)."""
        return dataclasses.replace(self, **_coerce(changes, source="override"))

    @classmethod
    def load(cls, config_file: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
             **overrides: Any) -> "Settings":
        """Resolve settings from defaults, the YAML file, ``MEMENTO_*`` variables and ``overrides``.

        ``config_file`` defaults to ``$MEMENTO_CONFIG`` or :func:`default_config_file` (the virtualenv's,
        the user's or ``/etc/memento-edge/config.yaml``); a missing default file is fine, a missing
        explicitly named one is an error, and ``MEMENTO_CONFIG=""`` reads no file.
        """
        env = os.environ if env is None else env
        explicit = config_file or env.get("MEMENTO_CONFIG")
        # MEMENTO_CONFIG set but empty means "no config file at all" (tests, throwaway runs).
        no_file = not config_file and env.get("MEMENTO_CONFIG") == ""
        path = explicit or str(default_config_file(env))
        values: Dict[str, Any] = {}
        used_file: Optional[str] = None
        if no_file:
            pass
        elif os.path.exists(path):
            values.update(_coerce(_read_yaml(path), source=path))
            used_file = path
        elif explicit:
            raise InvalidInput(f"config file not found: {path}", field="config")
        env_values = {}
        for s in SETTINGS:
            key = "MEMENTO_" + s.name.upper()
            if key in env and s.name not in FILE_ONLY:
                env_values[s.name] = env[key]
        values.update(_coerce(env_values, source="environment"))
        values.update(_coerce({k: v for k, v in overrides.items() if v is not None}, source="override"))
        return cls(config_file=used_file, **values)


def _read_yaml(path: str) -> Dict[str, Any]:
    import yaml  # imported lazily: only needed when a file exists

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"config file {path} is not valid UTF-8 (byte {exc.start})", field="config") from None
    except PermissionError:
        raise config_unreadable(path) from None
    except (OSError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())  # one line: YAML errors span several
        raise InvalidInput(f"cannot read config file {path}: {detail}", field="config") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"config file {path} must hold a mapping of settings", field="config")
    return data


def _coerce(values: Mapping[str, Any], *, source: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, raw in values.items():
        setting = _SETTING_BY_NAME.get(key)
        if setting is None:
            raise InvalidInput(f"unknown setting {key!r} in {source}", field=key)
        try:
            out[key] = setting.type(raw) if raw is not None else None
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidInput(f"bad value for setting {key!r} in {source}: {str(raw)[:100]!r}", field=key) from exc
        _check_range(key, out[key], source)
    if "synchronous" in out and str(out["synchronous"]).upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise InvalidInput("synchronous must be FULL, EXTRA or NORMAL", field="synchronous")
    return out


def _check_range(key: str, value: Any, source: str) -> None:
    if key not in LIMITS or value is None:
        return
    lo, hi = LIMITS[key]
    if isinstance(value, bool) or not math.isfinite(value) or not lo <= value <= hi:
        shown = f"{lo:g}..{hi:g}"
        raise InvalidInput(f"setting {key!r} in {source} must be from {shown}; got {value!r}", field=key)
