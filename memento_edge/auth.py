"""API tokens: creation, storage in the config file, verification, and the safe-bind policy.

Tokens are 256-bit random strings (``secrets.token_urlsafe(32)``) shown to the operator once. The config
file keeps only ``sha256(token)``. A plain, fast hash is enough here - and a slow password hash (bcrypt,
scrypt, argon2) would be the wrong tool - because:

* the secret is not a human-chosen password but 256 bits of randomness, so there is no dictionary to try
  and inverting SHA-256 over a 2**256 space is infeasible however fast each guess is; slow hashes only
  buy time against guessing *low-entropy* secrets;
* every API request verifies a token; a deliberately slow hash (tens of ms on a desktop, far more on a
  Pi Zero's single slow core) would cost more than the request itself and hand an attacker a cheap way
  to burn the CPU.

Verification hashes the presented token once and compares it with every configured digest using
:func:`hmac.compare_digest` without an early exit, so the response time does not reveal which (or
whether any) entry matched.

Scopes: ``read`` (get, list, recall, stats, export, metrics), ``write`` (remember, update, delete,
import) and ``admin`` (backup). Scopes are explicit - a ``write`` token cannot read unless it also has
``read`` - except that ``admin`` grants everything.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .config import config_unreadable
from .errors import Conflict, InvalidInput, NotFound

log = logging.getLogger(__name__)

SCOPES: Tuple[str, ...] = ("read", "write", "admin")
TOKEN_PREFIX = "mem_"  # lets secret scanners (and humans) recognise a leaked memento-edge token
_MAX_TOKEN_CHARS = 512  # bounds the work done on a hostile Authorization header
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """The lowercase hex SHA-256 of ``token`` (what the config file stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_scopes(scopes: Iterable[Any], *, field: str = "scopes") -> List[str]:
    if isinstance(scopes, (str, bytes)) or not isinstance(scopes, Iterable):
        raise InvalidInput("scopes must be a list of read, write, admin", field=field)
    out = []
    for scope in scopes:
        if scope not in SCOPES:
            raise InvalidInput(f"unknown scope {scope!r}: use read, write or admin", field=field)
        if scope not in out:
            out.append(scope)
    if not out:
        raise InvalidInput("a token needs at least one scope (read, write, admin)", field=field)
    return sorted(out, key=SCOPES.index)


def _check_name(name: Any, *, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInput("token name must be 1-64 characters of letters, digits, '_', '.', '@', '-' "
                           "starting with a letter or digit", field=field)
    return name


def create_token(name: str, scopes: Sequence[str]) -> Tuple[str, Dict[str, Any]]:
    """Make a new token.

    Returns ``(token_plaintext, entry)``: show the plaintext to the operator once; ``entry``
    (``{"name", "sha256", "scopes"}``) is what goes into the ``tokens`` list of the config file.
    """
    entry_name = _check_name(name)
    entry_scopes = _check_scopes(scopes)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, {"name": entry_name, "sha256": hash_token(token), "scopes": entry_scopes}


def _read_config(path: Path) -> Tuple[str, Dict[str, Any]]:
    import yaml

    try:
        if not path.exists():
            return "", {}
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
    except PermissionError:
        raise config_unreadable(path) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read config file {path}: {exc}", field="config") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"config file {path} must hold a mapping of settings", field="config")
    return text, data


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a power cut leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600  # the file now holds token digests: keep it private by default
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _entry_yaml(entry: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump([dict(entry)], default_flow_style=None, sort_keys=False)


def add_token_to_config(config_path: Union[str, Path], entry: Mapping[str, Any]) -> Path:
    """Append a token ``entry`` (from :func:`create_token`) to the ``tokens`` list of a YAML config file.

    The file is created (mode 0600) if missing. When it has no ``tokens`` key yet, the entry is appended
    as text, so the operator's comments survive; otherwise the file is re-serialised (comments are lost).
    The write is atomic. Raises :class:`Conflict` if a token with that name exists and
    :class:`InvalidInput` for a malformed entry or config file.
    """
    path = Path(config_path).expanduser()
    digest = str(entry.get("sha256", ""))
    if not _HEX64_RE.match(digest):
        raise InvalidInput("sha256 must be 64 lowercase hex digits", field="sha256")
    checked: Dict[str, Any] = {"name": _check_name(entry.get("name")), "sha256": digest,
                               "scopes": _check_scopes(entry.get("scopes", ()))}
    text, data = _read_config(path)
    tokens = data.get("tokens")
    if tokens is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        new_text = text + sep + "tokens:\n" + _entry_yaml(checked)
    else:
        if not isinstance(tokens, list):
            raise InvalidInput(f"'tokens' in {path} must be a list", field="tokens")
        if any(isinstance(t, dict) and t.get("name") == checked["name"] for t in tokens):
            raise Conflict(f"a token named {checked['name']!r} already exists in {path}", field="name")
        import yaml

        data["tokens"] = tokens + [checked]
        new_text = yaml.safe_dump(data, default_flow_style=False, sort_keys=False)
    _write_atomic(path, new_text)
    return path


def remove_token_from_config(config_path: Union[str, Path], name: str) -> Path:
    """Remove the token called ``name`` from the config file (atomic rewrite; comments are lost).

    Raises :class:`NotFound` if there is no such token.
    """
    import yaml

    path = Path(config_path).expanduser()
    _text, data = _read_config(path)
    tokens = data.get("tokens") or []
    kept = [t for t in tokens if not (isinstance(t, dict) and t.get("name") == name)]
    if len(kept) == len(tokens):
        raise NotFound(f"no token named {name!r} in {path}", field="name")
    data["tokens"] = kept
    _write_atomic(path, yaml.safe_dump(data, default_flow_style=False, sort_keys=False))
    return path


def list_tokens(config_path: Union[str, Path]) -> List[Dict[str, Any]]:
    """The ``{name, scopes}`` of every token in the config file (never the digests); [] without a file."""
    path = Path(config_path).expanduser()
    _text, data = _read_config(path)
    table = TokenTable(data.get("tokens") or ())  # validates, so a broken entry is reported, not listed
    return [{"name": p.name, "scopes": sorted(p.scopes, key=SCOPES.index)} for p in table.principals]


def rotate_token_in_config(config_path: Union[str, Path], name: str) -> Tuple[str, Dict[str, Any]]:
    """Give the token ``name`` a new secret (same name and scopes); the old secret stops working.

    Returns ``(token_plaintext, entry)`` like :func:`create_token`. Raises :class:`NotFound` if there is
    no such token. Atomic rewrite (comments are lost).
    """
    import yaml

    path = Path(config_path).expanduser()
    _text, data = _read_config(path)
    tokens = data.get("tokens") or []
    for i, old in enumerate(tokens):
        if isinstance(old, dict) and old.get("name") == name:
            secret, entry = create_token(name, old.get("scopes") or ())
            tokens[i] = entry
            data["tokens"] = tokens
            _write_atomic(path, yaml.safe_dump(data, default_flow_style=False, sort_keys=False))
            return secret, entry
    raise NotFound(f"no token named {name!r} in {path}", field="name")


@dataclass(frozen=True)
class Principal:
    """Who made a request: a configured token's name and scopes, or ``anonymous`` when auth is off."""

    name: str
    scopes: FrozenSet[str]

    def allows(self, scope: str) -> bool:
        """True if this principal may use a route that needs ``scope`` (``admin`` grants all)."""
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal("anonymous", frozenset(SCOPES))


class TokenTable:
    """The configured tokens, validated once, verified in constant time per request."""

    def __init__(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._entries: List[Tuple[bytes, Principal]] = []
        names = set()
        for i, entry in enumerate(entries or ()):
            where = f"tokens[{i}]"
            if not isinstance(entry, Mapping):
                raise InvalidInput(f"{where} must be a mapping with name, sha256, scopes", field="tokens")
            name = _check_name(entry.get("name"), field=f"{where}.name")
            digest = str(entry.get("sha256", "")).lower()
            if not _HEX64_RE.match(digest):
                raise InvalidInput(f"{where}.sha256 must be 64 hex digits (the SHA-256 of the token)",
                                   field="tokens")
            scopes = _check_scopes(entry.get("scopes", ()), field=f"{where}.scopes")
            if name in names:
                raise InvalidInput(f"duplicate token name {name!r}", field="tokens")
            names.add(name)
            self._entries.append((bytes.fromhex(digest), Principal(name, frozenset(scopes))))

    @property
    def enabled(self) -> bool:
        """True when at least one token is configured (then every protected route needs one)."""
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def principals(self) -> List[Principal]:
        """The configured principals, in config order."""
        return [p for _, p in self._entries]

    def verify(self, token: str) -> Optional[Principal]:
        """The principal owning ``token``, or None. Runs in time independent of which entry matches."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: Optional[Principal] = None
        for stored, principal in self._entries:
            # No early exit: every entry is compared so timing says nothing about the position.
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def bearer_token(header: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header, or None if absent or another scheme."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None


def is_loopback(host: str) -> bool:
    """True if ``host`` names only the local machine (127.0.0.0/8, ::1, localhost).

    The wildcard addresses (``0.0.0.0``, ``::``, empty) and any other hostname count as non-loopback:
    when in doubt, assume the service is reachable from the network.
    """
    name = (host or "").strip().strip("[]").lower()
    if name in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(settings: Any) -> str:
    """Apply the secure default before the service starts; return the auth mode for the start message.

    * tokens configured -> ``"tokens"`` (every /v1 route needs a bearer token with the right scope);
    * no token, loopback address -> ``"loopback-open"`` (requests allowed without auth; only local
      processes can connect);
    * no token, non-loopback address, ``insecure_no_auth`` set -> ``"insecure-open"`` (logs a warning);
    * no token, non-loopback address otherwise -> raises :class:`InvalidInput`.
    """
    table = TokenTable(getattr(settings, "tokens", None) or ())
    if table.enabled:
        return "tokens"
    if is_loopback(settings.host):
        return "loopback-open"
    if getattr(settings, "insecure_no_auth", False):
        log.warning("serving on %s with NO authentication (insecure_no_auth is set): anyone who can reach "
                    "this address can read and change every memory", settings.host)
        return "insecure-open"
    raise InvalidInput(
        f"refusing to serve on non-loopback address {settings.host!r} without an API token: create one "
        "with `memento-edge token create --name NAME --scope read --scope write`, or bind 127.0.0.1, or "
        "pass --insecure-no-auth (anyone on the network could then read and change every memory)",
        field="host")


class LiveTokens:
    """The token table of a running service, following its config file.

    A token added, revoked or rotated with the CLI takes effect without a restart: :meth:`table` re-reads
    the file when its mtime, size or inode changed (checked at most every ``interval`` seconds, a
    ``stat`` per check), and :meth:`reload` forces it (SIGHUP). A file that no longer parses keeps the
    previous table and logs why. Without a config file (tokens given in code) the table never changes.

    Once a service has required tokens it keeps requiring them: revoking the last token leaves every
    request refused (401) rather than opening the API to the network.
    """

    def __init__(self, entries: Iterable[Mapping[str, Any]], config_file: Optional[str],
                 *, interval: float = 1.0) -> None:
        self._table = TokenTable(entries)
        self._path = Path(config_file) if config_file else None
        self._interval = interval
        self._checked = time.monotonic()
        self._stamp = self._file_stamp()
        self._lock = threading.Lock()
        self.required = self._table.enabled

    def _file_stamp(self) -> Optional[Tuple[int, int, int]]:
        if self._path is None:
            return None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def table(self) -> TokenTable:
        """The current table (re-read first if the file changed since the last check)."""
        if self._path is not None and time.monotonic() - self._checked >= self._interval:
            with self._lock:
                self._checked = time.monotonic()
                if self._file_stamp() != self._stamp:
                    self._load()
        return self._table

    def verify(self, token: str) -> Optional[Principal]:
        """:meth:`TokenTable.verify` on the current table."""
        return self.table().verify(token)

    def __len__(self) -> int:
        return len(self.table())

    def reload(self) -> None:
        """Re-read the config file now (the SIGHUP handler)."""
        if self._path is not None:
            with self._lock:
                self._load()

    def _load(self) -> None:
        assert self._path is not None
        self._stamp = self._file_stamp()
        try:
            _text, data = _read_config(self._path)
            table = TokenTable(data.get("tokens") or ())
        except InvalidInput as exc:
            log.error("config %s: %s; keeping the %d token(s) loaded before", self._path, exc.message,
                      len(self._table))
            return
        before = {p.name for p in self._table.principals}
        after = {p.name for p in table.principals}
        self._table = table
        self.required = self.required or table.enabled
        log.info("tokens reloaded from %s: %d configured%s%s", self._path, len(table),
                 f", added {', '.join(sorted(after - before))}" if after - before else "",
                 f", removed {', '.join(sorted(before - after))}" if before - after else "")
