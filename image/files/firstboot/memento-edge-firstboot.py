"""Apply ``memento-edge.txt`` from the FAT boot partition, report what happened, wipe the secrets.

Runs as root from ``memento-edge-firstboot.service`` early at every boot (before the network, SSH and the
service), on every board the image is built for. The file is ``key = value`` lines, written the way people
really write them: ``#`` comments on their own line or after a value (a ``#`` that starts a comment must
follow a space), values in "double" or 'single' quotes (then anything, ``#`` included, is kept verbatim),
spaces around ``=``, Windows line endings, a UTF-8 byte-order mark. The keys are the :data:`KEYS` table.

All or nothing: the whole file is parsed and checked first; if anything is wrong (an unknown key, a typo,
a passphrase of the wrong length, a missing ``wifi_country``, ...) nothing is applied, the file is left as
it is (secrets included, so it can be corrected), and the reasons go to every console and to the status
file the web page and ``/readyz`` show. When it applies, the ``wifi_passphrase`` and ``api_token`` lines
are replaced by comments so the plain secrets no longer sit on a partition any computer can read.

Whatever the file says, the device ends with at least one API token: when it has none, one is generated,
printed once on the consoles and kept in ``/etc/memento-edge/initial-token`` (root and the service group
only), which the web page shows to a client on the USB cable or on the device itself. ``api_token =
generate`` on the card makes a new one the same way (the way back in after losing it).

Standard library + PyYAML (present in the service's venv) only; Python >= 3.7.
"""
from __future__ import annotations

import binascii
import difflib
import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, cast

import yaml

BOOT_FILE = Path(os.environ.get("MEMENTO_FIRSTBOOT_FILE", "/boot/firmware/memento-edge.txt"))
ROOT = Path(os.environ.get("MEMENTO_FIRSTBOOT_ROOT", "/"))
CONFIG = ROOT / "etc/memento-edge/config.yaml"
TOKEN_FILE = ROOT / "etc/memento-edge/initial-token"
# Read by memento_edge/device.py (the web page and /readyz): no secrets in it, world-readable.
STATUS_FILE = Path(os.environ.get("MEMENTO_DEVICE_STATUS", "/run/memento-edge-device/status.json"))
ADMIN_USER = "admin"
SERVICE_GROUP = "memento-edge"
# The USB gadget link (image/files/etc/systemd/network/30-usb-gadget.network): the device's address there.
USB_ADDRESS = "10.55.0.1"
USB_SUBNET = "10.55.0.0/29"

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
COUNTRY_RE = re.compile(r"^[A-Z]{2}$")
HEX64_RE = re.compile(r"^[0-9A-Fa-f]{64}$")
TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
             "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
YES = ("yes", "true", "1", "on")
NO = ("no", "false", "0", "off")
# wifi_security -> wpa_supplicant key_mgmt and ieee80211w (management frame protection). Plain WPA-PSK is
# the default: no Raspberry Pi Wi-Fi chip is documented for WPA3, and offering SAE to transition-mode access
# points has broken Zero 2 W connections; WPA3 only when asked for.
WIFI_SECURITY = {"wpa2": ("WPA-PSK", None), "wpa2-wpa3": ("WPA-PSK SAE", 1), "wpa3": ("SAE", 2),
                 "open": ("NONE", None)}


class Line(NamedTuple):
    """One ``key = value`` line of the file."""

    number: int
    key: str
    value: str


@dataclass
class Parsed:
    """The lines of a first-boot file, and what was wrong with its syntax."""

    lines: List[Line] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    def values(self) -> Dict[str, List[str]]:
        """{key: [values in file order]}."""
        out: Dict[str, List[str]] = {}
        for ln in self.lines:
            out.setdefault(ln.key, []).append(ln.value)
        return out


@dataclass
class Plan:
    """What a valid file asks for, normalised; ``None`` = not mentioned (leave as it is)."""

    hostname: Optional[str] = None
    wifi: Optional[Dict[str, object]] = None
    ssh_keys: List[str] = field(default_factory=list)
    api_token: Optional[str] = None          # "generate" = make a new one here
    api_token_name: str = "firstboot"
    timezone: Optional[str] = None

    def summary(self) -> List[str]:
        """What will be applied, without secrets."""
        out = []
        if self.hostname:
            out.append(f"hostname {self.hostname}")
        if self.wifi:
            out.append(f"Wi-Fi {self.wifi['ssid']!r} ({self.wifi['security']}, country {self.wifi['country']}"
                       f"{', hidden' if self.wifi['hidden'] else ''})")
        if self.ssh_keys:
            out.append(f"{len(self.ssh_keys)} SSH key(s) for {ADMIN_USER}")
        if self.api_token:
            out.append(f"API token {self.api_token_name!r}" + (" (generated)" if self.api_token == "generate" else ""))
        if self.timezone:
            out.append(f"timezone {self.timezone}")
        return out


# --- parsing ----------------------------------------------------------------------------------------------
def _split_value(raw: str) -> Tuple[str, Optional[str]]:
    """(value, error) of the text right of ``=``: quotes kept verbatim, an unquoted ``#`` after
    whitespace starts a comment."""
    text = raw.strip()
    if text[:1] in ('"', "'"):
        quote = text[0]
        end = text.find(quote, 1)
        if end < 0:
            return "", f"the {quote} quote is never closed"
        rest = text[end + 1:].strip()
        if rest and not rest.startswith("#"):
            return "", f"text after the closing quote: {rest[:20]!r}"
        return text[1:end], None
    m = re.search(r"\s#", text)
    value = text[:m.start()] if m else text
    return value.rstrip(), None


def parse(text: str) -> Parsed:
    """Parse the file's text (BOM, CRLF, comments, quotes and spacing tolerated); never raises."""
    out = Parsed()
    for n, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, rest = line.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep:
            out.errors.append(f"line {n}: no '=' (expected 'key = value'): {line[:40]!r}")
            continue
        if key not in KEYS:
            near = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            out.errors.append(f"line {n}: unknown key {key!r}{hint}")
            continue
        value, err = _split_value(rest)
        if err:
            out.errors.append(f"line {n} ({key}): {err}")
            continue
        if value:
            out.lines.append(Line(n, key, value))
    for key, spec in KEYS.items():
        nums = [ln.number for ln in out.lines if ln.key == key]
        if len(nums) > 1 and not spec.repeatable:
            out.errors.append(f"{key} is given {len(nums)} times (lines {', '.join(map(str, nums))}); keep one")
    return out


# --- checking ---------------------------------------------------------------------------------------------
def _check_hostname(v: str) -> Optional[str]:
    return None if HOSTNAME_RE.match(v) else "letters, digits and '-' only, at most 63, not starting/ending with '-'"


def _check_ssid(v: str) -> Optional[str]:
    return None if 1 <= len(v.encode("utf-8")) <= 32 else "1..32 bytes"


def _check_passphrase(v: str) -> Optional[str]:
    if HEX64_RE.match(v):
        return None  # a raw 256-bit PSK (wpa_passphrase's output)
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        return "contains a control character"
    n = len(v.encode("utf-8"))
    return None if 8 <= n <= 63 else f"must be 8..63 characters (or 64 hex digits), this one has {n}"


def _check_country(v: str) -> Optional[str]:
    return None if COUNTRY_RE.match(v.upper()) else "a two-letter ISO 3166 code such as DE, GB, US"


def _check_bool(v: str) -> Optional[str]:
    return None if v.lower() in YES + NO else "yes or no"


def _check_security(v: str) -> Optional[str]:
    return None if v.lower() in WIFI_SECURITY else "one of " + ", ".join(WIFI_SECURITY)


def _check_ssh_key(v: str) -> Optional[str]:
    parts = v.split()
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        return "an OpenSSH public key line ('ssh-ed25519 AAAA... comment'); the .pub file, not the private key"
    try:
        blob = binascii.a2b_base64(parts[1])
    except (binascii.Error, ValueError):
        return "the key's base64 part is damaged (copied only in part?)"
    # The blob is a run of length-prefixed strings, the first one the key type: a truncated or mixed-up
    # paste breaks the run.
    fields, pos = [], 0
    while pos + 4 <= len(blob):
        n = int.from_bytes(blob[pos:pos + 4], "big")
        fields.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    if pos != len(blob) or len(fields) < 2 or fields[0] != parts[0].encode():
        return "the key's base64 part is damaged (copied only in part?)"
    if parts[0] == "ssh-ed25519" and len(fields[1]) != 32:
        return "the key's base64 part is damaged (copied only in part?)"
    return None


def _check_token(v: str) -> Optional[str]:
    if v.lower() == "generate":
        return None
    if any(c.isspace() for c in v):
        return "contains spaces (quote nothing; make one with `openssl rand -hex 24`)"
    return None if len(v) >= 16 else "at least 16 characters (e.g. `openssl rand -hex 24`), or 'generate'"


def _check_token_name(v: str) -> Optional[str]:
    return None if TOKEN_NAME_RE.match(v) else "letters, digits, '_', '.', '-' (at most 64)"


def _check_timezone(v: str) -> Optional[str]:
    if ".." in v or v.startswith("/") or not (ROOT / "usr/share/zoneinfo" / v).is_file():
        return "not a known time zone (e.g. Europe/Berlin, UTC)"
    return None


class Key(NamedTuple):
    """One recognised key of the first-boot file."""

    check: Callable[[str], Optional[str]]
    secret: bool
    repeatable: bool
    help: str


KEYS: Dict[str, Key] = {
    "hostname": Key(_check_hostname, False, False, "device name, also NAME.local over mDNS"),
    "wifi_ssid": Key(_check_ssid, False, False, "network name"),
    "wifi_passphrase": Key(_check_passphrase, True, False, "8..63 characters, or the 64-hex-digit PSK"),
    "wifi_country": Key(_check_country, False, False, "two-letter country code; required for Wi-Fi"),
    "wifi_hidden": Key(_check_bool, False, False, "yes when the network does not broadcast its name"),
    "wifi_security": Key(_check_security, False, False, "wpa2 (default), wpa2-wpa3, wpa3, open"),
    "ssh_authorized_key": Key(_check_ssh_key, False, True, "public key for user admin; may repeat"),
    "api_token": Key(_check_token, True, False, "your token (stored as sha256), or 'generate'"),
    "api_token_name": Key(_check_token_name, False, False, "name of that token (default firstboot)"),
    "timezone": Key(_check_timezone, False, False, "e.g. Europe/Berlin"),
}


def _placeholder(value: str) -> bool:
    """Is this still a placeholder from the README or memento-edge.txt.example (a known token, a key no one
    holds)?"""
    return "..." in value or "replace" in value.lower()


def plan(parsed: Parsed) -> Tuple[Plan, List[str]]:
    """Check every value and the combinations; return the plan and the errors (empty = apply)."""
    errors = list(parsed.errors)
    for ln in parsed.lines:
        if ln.key in ("api_token", "ssh_authorized_key") and _placeholder(ln.value):
            errors.append(f"line {ln.number} ({ln.key}): still the example's placeholder; put your own")
            continue
        problem = KEYS[ln.key].check(ln.value)
        if problem:
            errors.append(f"line {ln.number} ({ln.key}): {problem}")
    v = {k: vals[0] for k, vals in parsed.values().items()}
    p = Plan(hostname=v.get("hostname"), ssh_keys=parsed.values().get("ssh_authorized_key", []),
             api_token=v.get("api_token"), api_token_name=v.get("api_token_name", "firstboot"),
             timezone=v.get("timezone"))
    wifi_keys = [k for k in v if k.startswith("wifi_")]
    if wifi_keys:
        security = v.get("wifi_security", "wpa2").lower()
        if "wifi_ssid" not in v:
            errors.append(f"{', '.join(wifi_keys)} given but no wifi_ssid")
        if "wifi_country" not in v:
            errors.append("wifi_country is required for Wi-Fi (radio regulations), e.g. wifi_country = DE")
        if security != "open" and "wifi_passphrase" not in v:
            errors.append("wifi_passphrase missing (or say wifi_security = open)")
        if security == "open" and "wifi_passphrase" in v:
            errors.append("wifi_security = open takes no wifi_passphrase")
        if security in ("wpa3", "wpa2-wpa3") and HEX64_RE.match(v.get("wifi_passphrase", "")):
            errors.append("WPA3 (SAE) needs the passphrase itself, not a 64-hex-digit PSK")
        p.wifi = {"ssid": v.get("wifi_ssid", ""), "passphrase": v.get("wifi_passphrase"),
                  "country": v.get("wifi_country", "").upper(), "security": security,
                  "hidden": v.get("wifi_hidden", "no").lower() in YES}
    if "api_token_name" in v and "api_token" not in v:
        errors.append("api_token_name given but no api_token")
    return p, errors


# --- rendering (pure) -------------------------------------------------------------------------------------
def render_wpa_supplicant(wifi: Dict[str, object]) -> str:
    """wpa_supplicant-wlan0.conf for one network. The SSID is written in hex and a WPA2 passphrase as its
    PBKDF2 PSK (what wpa_passphrase prints), so no character in either can break the file and the plain
    passphrase is not stored; SAE needs the passphrase itself, quoted."""
    ssid = str(wifi["ssid"])
    security = str(wifi["security"])
    key_mgmt, pmf = WIFI_SECURITY[security]
    net = [f"    ssid={ssid.encode('utf-8').hex()}", f"    key_mgmt={key_mgmt}"]
    if wifi["hidden"]:
        net.append("    scan_ssid=1")   # probe for it by name: hidden networks do not answer broadcast scans
    phrase = wifi.get("passphrase")
    if security != "open":
        phrase = str(phrase)
        if "WPA-PSK" in key_mgmt:
            psk = phrase.lower() if HEX64_RE.match(phrase) else hashlib.pbkdf2_hmac(
                "sha1", phrase.encode("utf-8"), ssid.encode("utf-8"), 4096, 32).hex()
            net.append(f"    psk={psk}")
        if "SAE" in key_mgmt:
            if '"' in phrase:
                raise ValueError("a WPA3 passphrase cannot contain a double quote")
            net.append(f'    sae_password="{phrase}"')
    if pmf is not None:
        net.append(f"    ieee80211w={pmf}")
    return "\n".join(["ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev", "update_config=0",
                      f"country={wifi['country']}", "", "network={", *net, "}", ""])


def wipe_secrets(text: str, parsed: Optional[Parsed] = None) -> str:
    """``text`` with the lines of secret keys replaced by a comment (everything else kept)."""
    parsed = parsed or parse(text)
    secret_lines = {ln.number: ln.key for ln in parsed.lines if KEYS[ln.key].secret}
    out = []
    for n, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        out.append(f"# {secret_lines[n]} = (applied and wiped at boot)" if n in secret_lines else raw.rstrip("\r"))
    return "\n".join(out) + "\n"


# --- side effects -----------------------------------------------------------------------------------------
def log(msg: str) -> None:
    """To the journal (the unit's stdout)."""
    print(f"memento-edge-firstboot: {msg}", flush=True)


def announce(lines: List[str], console_only: List[str]) -> None:
    """Print ``lines`` to the journal and every active console (serial and screen: /dev/console is only the
    last ``console=``), and ``console_only`` (a new token) to the consoles alone, never to the journal."""
    for ln in lines:
        log(ln)
    text = "".join(f"memento-edge: {ln}\r\n" for ln in lines + console_only).encode("utf-8", "replace")
    try:
        names = Path("/sys/class/tty/console/active").read_text().split()
    except OSError:
        names = []
    for name in names:
        try:
            fd = os.open(f"/dev/{name}", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.write(fd, text)
        except OSError:
            pass  # a full serial buffer must not stop the boot
        finally:
            os.close(fd)


def atomic_write(path: Path, data: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Write ``data`` so a power cut leaves either the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _live() -> bool:
    return ROOT == Path("/")


def apply_hostname(name: str) -> None:
    """Set the static hostname and the matching /etc/hosts line."""
    atomic_write(ROOT / "etc/hostname", name + "\n", 0o644)
    hosts = ROOT / "etc/hosts"
    lines = [ln for ln in hosts.read_text().splitlines() if not ln.startswith("127.0.1.1")] if hosts.exists() else [
        "127.0.0.1\tlocalhost", "::1\t\tlocalhost ip6-localhost ip6-loopback"]
    lines.insert(1, f"127.0.1.1\t{name}")
    atomic_write(hosts, "\n".join(lines) + "\n", 0o644)
    if _live():
        subprocess.run(["hostname", name], check=False)


def apply_wifi(wifi: Dict[str, object]) -> None:
    """Write the wpa_supplicant config for wlan0 and enable it."""
    atomic_write(ROOT / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf", render_wpa_supplicant(wifi), 0o600)
    if _live():
        subprocess.run(["systemctl", "enable", "wpa_supplicant@wlan0.service"], check=False)
        subprocess.run(["systemctl", "restart", "--no-block", "wpa_supplicant@wlan0.service"], check=False)


def apply_ssh_keys(keys: List[str]) -> int:
    """Append new public keys to the admin user's authorized_keys; returns how many were new."""
    pw = pwd.getpwnam(ADMIN_USER)
    home = ROOT / pw.pw_dir.lstrip("/")
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
    auth = ssh_dir / "authorized_keys"
    current = auth.read_text().splitlines() if auth.exists() else []
    new = [k for k in dict.fromkeys(keys) if k not in current]
    atomic_write(auth, "\n".join(current + new) + "\n", 0o600, pw.pw_uid, pw.pw_gid)
    return len(new)


def load_config() -> dict:
    """The service config as a dict (empty when absent)."""
    if not CONFIG.exists():
        return {}
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8")) or {}


def save_config(cfg: dict) -> None:
    """Write the service config back, keeping its owner, group and mode."""
    st = CONFIG.stat() if CONFIG.exists() else None
    data = yaml.safe_dump(cfg, sort_keys=True, default_flow_style=False)
    atomic_write(CONFIG, data, st.st_mode & 0o777 if st else 0o640, st.st_uid if st else 0, st.st_gid if st else 0)


def apply_token(token: str, name: str) -> None:
    """Add the sha256 of ``token`` to the config's tokens (replacing a token of the same name)."""
    cfg = load_config()
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    tokens = [t for t in (cfg.get("tokens") or []) if t.get("name") != name and t.get("sha256") != digest]
    tokens.append({"name": name, "sha256": digest, "scopes": ["read", "write"]})
    cfg["tokens"] = tokens
    save_config(cfg)


def _service_gid() -> int:
    try:
        return grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return 0


def generate_token(name: str = "initial") -> str:
    """Make a token, install its digest under ``name``, keep the plain token in TOKEN_FILE (root and the
    service group: the web page shows it to USB/loopback clients) and return it."""
    token = secrets.token_urlsafe(30)
    apply_token(token, name)
    atomic_write(TOKEN_FILE, token + "\n", 0o640, 0, _service_gid())
    return token


def ensure_some_token() -> Optional[str]:
    """Generate a token when the device has none, so the service can start (it refuses to serve a network
    address without one). Returns the new token, or None when one existed."""
    if load_config().get("tokens"):
        return None
    return generate_token("initial")


def apply_timezone(tz: str) -> None:
    """Point /etc/localtime at the zoneinfo file of ``tz``."""
    link = ROOT / "etc/localtime"
    tmp = link.with_name(".localtime.new")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(f"/usr/share/zoneinfo/{tz}")
    os.replace(tmp, link)
    atomic_write(ROOT / "etc/timezone", tz + "\n", 0o644)


def apply(p: Plan) -> Tuple[List[str], Optional[str]]:
    """Carry out a checked plan; returns (what was done, a token generated here or None)."""
    done: List[str] = []
    generated = None
    if p.hostname:
        apply_hostname(p.hostname)
    if p.timezone:
        apply_timezone(p.timezone)
    if p.wifi:
        apply_wifi(p.wifi)
    if p.ssh_keys:
        try:
            apply_ssh_keys(p.ssh_keys)
        except KeyError:
            done.append(f"user {ADMIN_USER} missing: SSH keys NOT installed")
    if p.api_token == "generate":
        generated = generate_token(p.api_token_name if p.api_token_name != "firstboot" else "initial")
    elif p.api_token:
        apply_token(p.api_token, p.api_token_name)
    return done + p.summary(), generated


# --- status and summary -----------------------------------------------------------------------------------
def write_status(doc: Dict[str, object]) -> None:
    """The status file memento_edge/device.py reads (no secrets: where the token is, never the token)."""
    try:
        STATUS_FILE.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(STATUS_FILE.parent, 0o755)   # the unit's UMask=0077 would hide it from the service
        atomic_write(STATUS_FILE, json.dumps(doc, indent=2, sort_keys=True) + "\n", 0o644)
    except OSError as exc:
        log(f"could not write {STATUS_FILE}: {exc}")


def current_hostname() -> str:
    """The static hostname the device will have after this run."""
    try:
        return (ROOT / "etc/hostname").read_text().strip() or "memento-edge"
    except OSError:
        return "memento-edge"


def summary_lines(status: Dict[str, object], token: Optional[str]) -> Tuple[List[str], List[str]]:
    """The first-boot summary: (lines, the console-only line with a token generated in this boot)."""
    host = status["hostname"]
    fb = status["firstboot"]
    assert isinstance(fb, dict)
    lines = [f"hostname {host}: http://{host}.local:8077/ (Wi-Fi or USB), http://{USB_ADDRESS}:8077/ over "
             f"the USB cable (OTG port), ssh admin@{host}.local"]
    if fb["state"] == "refused":
        lines.append(f"{BOOT_FILE.name} was NOT applied (nothing changed), fix it on the card and reboot:")
        lines += [f"  - {e}" for e in fb["errors"]]  # type: ignore[union-attr]
    elif fb["state"] == "applied":
        lines.append(f"{BOOT_FILE.name} applied: " + "; ".join(fb["applied"]))  # type: ignore[arg-type]
    else:
        lines.append(f"no {BOOT_FILE.name} on the boot partition (see memento-edge.txt.example there)")
    if status.get("token_file"):
        lines.append(f"API token: on http://{USB_ADDRESS}:8077/ over the USB cable, or sudo cat {TOKEN_FILE}")
    secret = [f"new API token (shown once on this console): {token}"] if token else []
    return lines, secret


def run_file(text: str) -> Tuple[Dict[str, object], Optional[str], Optional[str]]:
    """Check and (when valid) apply a first-boot file. Returns (status section, generated token, the text
    to write back to the card or None)."""
    parsed = parse(text)
    p, errors = plan(parsed)
    if errors:
        return {"state": "refused", "errors": errors, "applied": []}, None, None
    done, generated = apply(p)
    wiped = wipe_secrets(text, parsed)
    return {"state": "applied", "errors": [], "applied": done}, generated, (wiped if wiped != text else None)


def decode(raw: bytes) -> str:
    """The file's text: UTF-8 (with or without BOM), or UTF-16 as Windows Notepad's "Unicode" saves it."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return raw.decode("utf-16", errors="replace")
    return raw.decode("utf-8", errors="replace")


def main() -> int:
    """Apply the first-boot file if present, make sure the service has a token, report on every channel."""
    section: Dict[str, object] = {"state": "absent", "errors": [], "applied": []}
    generated = None
    if BOOT_FILE.exists():
        text = decode(BOOT_FILE.read_bytes())
        section, generated, wiped = run_file(text)
        if wiped is not None:
            # FAT has no atomic rename across a power cut either way; write + fsync is the best available,
            # and the secrets are already applied.
            with open(BOOT_FILE, "w", encoding="utf-8") as fh:
                fh.write(wiped)
                fh.flush()
                os.fsync(fh.fileno())
            cast(List[str], section["applied"]).append(f"secrets wiped from {BOOT_FILE.name}")
    generated = ensure_some_token() or generated
    status: Dict[str, object] = {
        "version": 1, "updated": int(time.time()), "hostname": current_hostname(),
        "firstboot": {"file": str(BOOT_FILE), **section},
        "token_file": str(TOKEN_FILE) if TOKEN_FILE.exists() else None,
        "usb": {"address": USB_ADDRESS, "subnet": USB_SUBNET},
    }
    write_status(status)
    announce(*summary_lines(status, generated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
