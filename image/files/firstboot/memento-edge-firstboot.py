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
only), which the web page shows to local clients (the device itself, the USB gadget link). ``api_token =
generate`` on the card makes a new one the same way (the way back in after losing it).

Standard library + PyYAML (present in the service's venv) only; Python >= 3.7.
"""
from __future__ import annotations

import binascii
import difflib
import grp
import hashlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
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
# The USB gadget link's networkd file, when the image has one: its Address= is the device's address there and
# its subnet the clients the web page treats as local.
USB_NETWORK = ROOT / "etc/systemd/network/10-usb-gadget.network"

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
        where = f"line {ln.number}" if ln.number else "Imager's setting"
        if ln.key in ("api_token", "ssh_authorized_key") and _placeholder(ln.value):
            errors.append(f"{where} ({ln.key}): still the example's placeholder; put your own")
            continue
        problem = KEYS[ln.key].check(ln.value)
        if problem:
            errors.append(f"{where} ({ln.key}): {problem}")
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


# --- Wi-Fi chip and firmware --------------------------------------------------------------------------------
# The Zero 2 W carries one of two radios. Its BCM43436 (the kernel reports "BCM43430/2") needs firmware that
# Debian does not ship; Raspberry Pi's firmware-brcm80211 package does (RPi-Distro/firmware-nonfree, bookworm
# branch, version 1:20230625-2+rpt2, debian/config/brcm80211/brcm/). A user who copies those files into the
# folder brcm/ of the boot partition gets them installed here. sha256 of the files at that version:
FIRMWARE_SHA256 = {
    "brcmfmac43436-sdio.bin": "510a7dd1e056199b309425548ee0bd846993a1837ac7fa1e4d3e641f05a1327a",
    "brcmfmac43436-sdio.clm_blob": "fce7cbb62ffa6a5a65ca97b13f6fbf28d06c02d986c2072d65bf72164755fc34",
    "brcmfmac43436-sdio.txt": "4cda90facd8844cff60d80b34b24ecbae76adb9a62508a109461b8bf42b478d1",
    "brcmfmac43436s-sdio.bin": "68b9bcc9855d91733cd44c21de4cb507c91b0d32d838c0696def5eb96c99e2de",
    "brcmfmac43436s-sdio.txt": "37a8b85a5a9742761101b764a07bc4d0c8b09f2e180eaea3b503a834277ad595",
}
# The names brcmfmac asks for on a Zero 2 W (board-specific first, then generic), and the file each one is in
# Raspberry Pi's package (the same links that package makes).
FIRMWARE_LINKS = {
    "brcmfmac43430b0-sdio.raspberrypi,model-zero-2-w.bin": "brcmfmac43436-sdio.bin",
    "brcmfmac43430b0-sdio.raspberrypi,model-zero-2-w.clm_blob": "brcmfmac43436-sdio.clm_blob",
    "brcmfmac43430b0-sdio.raspberrypi,model-zero-2-w.txt": "brcmfmac43436-sdio.txt",
    "brcmfmac43430b0-sdio.bin": "brcmfmac43436-sdio.bin",
    "brcmfmac43430b0-sdio.clm_blob": "brcmfmac43436-sdio.clm_blob",
    "brcmfmac43430b0-sdio.txt": "brcmfmac43436-sdio.txt",
    "brcmfmac43430-sdio.raspberrypi,model-zero-2-w.bin": "brcmfmac43436s-sdio.bin",
    "brcmfmac43430-sdio.raspberrypi,model-zero-2-w.txt": "brcmfmac43436s-sdio.txt",
}
FIRMWARE_DIR = ROOT / "lib/firmware/brcm"
CARD_FIRMWARE_DIR = BOOT_FILE.parent / "brcm"
KMSG = Path("/dev/kmsg")
SYS_NET = Path("/sys/class/net")
SYS_SDIO = Path("/sys/bus/sdio/devices")
BROADCOM_SDIO_VENDOR = "0x02d0"
CHIP_RE = re.compile(r"brcmf_fw_alloc_request: using brcm/(\S+) for chip (\S+)")
FW_FAIL_RE = re.compile(r"Direct firmware load for brcm/(\S+) failed|brcmf_sdio_firmware_callback: failed")


def install_card_firmware() -> List[str]:
    """Copy known Wi-Fi firmware from the card's brcm/ folder into /lib/firmware/brcm (once; the card's
    copy stays) and make the links brcmfmac asks for. Returns what was done, for the status."""
    done: List[str] = []
    if not CARD_FIRMWARE_DIR.is_dir():
        return done
    for src in sorted(CARD_FIRMWARE_DIR.iterdir()):
        if src.name.startswith("README"):
            continue  # the image's own note on what goes in the folder
        if src.name not in FIRMWARE_SHA256:
            done.append(f"brcm/{src.name}: not a file this image knows; ignored")
            continue
        data = src.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        verified = digest == FIRMWARE_SHA256[src.name]
        dest = FIRMWARE_DIR / src.name
        if dest.exists() and dest.read_bytes() == data:
            continue
        FIRMWARE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.new")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        check = "verified" if verified else f"UNKNOWN {digest[:16]}..., not the documented version"
        done.append(f"installed {src.name} from the card (sha256 {check})")
    for link, target in FIRMWARE_LINKS.items():
        path = FIRMWARE_DIR / link
        if (FIRMWARE_DIR / target).exists() and not path.exists() and not path.is_symlink():
            path.symlink_to(target)
    return done


def kernel_log() -> str:
    """The kernel's message buffer (/dev/kmsg, non-blocking; the text part of each record)."""
    out: List[str] = []
    try:
        fd = os.open(str(KMSG), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:
                continue  # EPIPE: a record was overwritten while reading; go on with the next
            if not rec:
                break
            out.append(rec.decode("utf-8", "replace").split(";", 1)[-1].rstrip("\n"))
    finally:
        os.close(fd)
    return "\n".join(out)


def broadcom_sdio_present() -> bool:
    """Is a Broadcom SDIO function (the Wi-Fi chip) on the bus?"""
    try:
        return any((d / "vendor").read_text().strip() == BROADCOM_SDIO_VENDOR for d in SYS_SDIO.iterdir())
    except OSError:
        return False


def wlan_interface() -> Optional[str]:
    """The first wireless interface (wlan0 with net.ifnames=0), or None."""
    try:
        return next((d.name for d in sorted(SYS_NET.iterdir()) if (d / "wireless").exists()), None)
    except OSError:
        return None


def wifi_state(log_text: str, chip_present: bool, iface: Optional[str], configured: bool) -> Dict[str, object]:
    """Judge the Wi-Fi from what the kernel said (pure: tests feed it kernel logs)."""
    chips = CHIP_RE.findall(log_text)
    fw, chip = chips[-1] if chips else (None, None)
    failed = bool(FW_FAIL_RE.search(log_text))
    doc: Dict[str, object] = {"chip": chip, "firmware": fw, "interface": iface, "configured": configured}
    if iface:
        doc["state"] = "ok"
        doc["messages"] = [] if configured else [
            f"Wi-Fi ({chip or 'radio'}) works but is not configured: put wifi_ssid, wifi_passphrase and "
            "wifi_country in memento-edge.txt"]
    elif (chip or chip_present) and not failed:
        doc["state"] = "no-interface"
        doc["messages"] = [f"No Wi-Fi: the chip {chip or '(Broadcom SDIO)'} is there but no wireless interface "
                           "appeared (is the brcmfmac driver loaded? see `journalctl -k`)"]
    elif failed:
        doc["state"] = "firmware-missing"
        need = "brcmfmac43436-sdio.bin, .clm_blob and .txt" if fw and "43430b0" in fw else \
            "the firmware for this chip"
        doc["messages"] = [
            f"No Wi-Fi: the chip {chip or '(Broadcom SDIO)'} found no firmware ({fw or 'brcmfmac'}). Debian does "
            f"not ship it. Copy {need} from Raspberry Pi's firmware-nonfree (see image/README.md) into the folder "
            "brcm/ of the boot partition and restart"]
    else:
        doc["state"] = "no-chip"
        doc["messages"] = []
    return doc


# --- Raspberry Pi Imager's OS customisation --------------------------------------------------------------------
# What Imager writes to the FAT partition (rpi-imager src/downloadthread.cpp, customization_generator.cpp):
# - "cloudinit" images (Imager 2.x, with a manifest that says so): user-data (#cloud-config: hostname,
#   timezone, keyboard, user: {name, passwd, ssh_authorized_keys}), network-config (netplan v2: wifis.wlan0.
#   access-points.{"SSID": {password: 64-hex PBKDF2 PSK or none, hidden}}, regulatory-domain), meta-data
#   (instance-id), and " cfg80211.ieee80211_regdom=CC ds=nocloud;i=ID" appended to cmdline.txt.
# - "systemd" images (what Imager 1.x assumes for any local image file): firstrun.sh, and " systemd.run=
#   /boot/firstrun.sh systemd.run_success_action=reboot systemd.unit=kernel-command-line.target" appended to
#   cmdline.txt. Run as is it would rename our admin user, write a WPA-PSK+SAE config and, because our FAT
#   partition is /boot/firmware, leave the device booting into kernel-command-line.target for ever. So it is
#   read, never run: the settings are taken from it, the cmdline entries removed, and the device restarts.
# Both are mapped onto memento-edge.txt keys and go through the same checks (all or nothing).
IMAGER_CMDLINE_DROP = ("systemd.run=", "systemd.run_success_action=", "systemd.unit=kernel-command-line.target")
PUBKEY_RE = re.compile(r"(?:ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|sk-ssh-ed25519@openssh\.com|"
                       r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/=]+(?: [^'\"\n]*)?")


def _octets(ssid: str) -> str:
    """Imager escapes each UTF-8 byte of a non-ASCII SSID as \\xHH, which YAML reads as U+00HH: undo that."""
    try:
        return ssid.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return ssid


def _cmdline_country(cmdline: str) -> Optional[str]:
    m = re.search(r"\bcfg80211\.ieee80211_regdom=([A-Za-z]{2})\b", cmdline)
    return m.group(1).upper() if m else None


def imager_cloud_init(user_data: str, network_config: str, cmdline: str) -> Tuple[Parsed, List[str]]:
    """memento-edge.txt lines equivalent to Imager's cloud-init files, and what is not honoured."""
    out, ignored = Parsed(), []  # type: Tuple[Parsed, List[str]]
    try:
        ud = yaml.safe_load(user_data) if user_data.strip() else {}
        nc = yaml.safe_load(network_config) if network_config.strip() else {}
    except yaml.YAMLError as exc:
        out.errors.append(f"Imager's user-data/network-config is not valid YAML: {str(exc).splitlines()[0]}")
        return out, ignored
    ud = ud if isinstance(ud, dict) else {}
    nc = nc if isinstance(nc, dict) else {}

    def add(key: str, value: object) -> None:
        if value not in (None, ""):
            out.lines.append(Line(0, key, str(value).strip()))

    add("hostname", ud.get("hostname"))
    add("timezone", ud.get("timezone"))
    users = [ud["user"]] if isinstance(ud.get("user"), dict) else []
    users += [u for u in (ud.get("users") or []) if isinstance(u, dict)]
    for u in users:
        for key in (u.get("ssh_authorized_keys") or u.get("ssh-authorized-keys") or []):
            add("ssh_authorized_key", key)
        if u.get("name") and u.get("name") != ADMIN_USER:
            ignored.append(f"user name {u['name']!r} (the account is {ADMIN_USER}; your SSH key is installed there)")
        if u.get("passwd"):
            ignored.append("password (no account has one: SSH by key only)")
    if ud.get("keyboard"):
        ignored.append("keyboard layout")
    if ud.get("ssh_pwauth") is True:
        ignored.append("SSH password login")
    for ap_iface in ((nc.get("network") or {}).get("wifis") or {}).values():
        aps = (ap_iface or {}).get("access-points") or {}
        for ssid, ap in list(aps.items())[:1]:
            ap = ap or {}
            add("wifi_ssid", _octets(str(ssid)))
            add("wifi_country", ap_iface.get("regulatory-domain") or _cmdline_country(cmdline))
            if ap.get("password"):
                add("wifi_passphrase", ap["password"])
            else:
                add("wifi_security", "open")
            if ap.get("hidden"):
                add("wifi_hidden", "yes")
        break
    return out, ignored


def imager_firstrun(script: str, cmdline: str) -> Tuple[Parsed, List[str]]:
    """memento-edge.txt lines equivalent to Imager's firstrun.sh (read, never run), and what is not honoured."""
    out, ignored = Parsed(), []
    seen = set()

    def add(key: str, value: str) -> None:
        if value and (key, value) not in seen:
            seen.add((key, value))
            out.lines.append(Line(0, key, value))

    for raw in script.splitlines():
        try:
            words = shlex.split(raw)
        except ValueError:
            continue
        if len(words) > 1 and words[0].endswith("/imager_custom"):
            cmd, args = words[1], words[2:]
        elif len(words) > 1 and words[0].endswith("/userconf"):
            cmd, args = "userconf", words[1:]
        else:
            continue
        if cmd == "set_hostname" and args:
            add("hostname", args[0])
        elif cmd == "set_timezone" and args:
            add("timezone", args[0])
        elif cmd == "set_keymap":
            ignored.append("keyboard layout")
        elif cmd == "set_wlan":
            rest = [a for a in args if not a.startswith("-")]
            if len(rest) >= 2:
                add("wifi_ssid", rest[0])
                add("wifi_passphrase", rest[1])
                add("wifi_country", rest[2] if len(rest) > 2 else (_cmdline_country(cmdline) or ""))
                if "-h" in args:
                    add("wifi_hidden", "yes")
        elif cmd == "userconf":
            if args[0] != ADMIN_USER:
                ignored.append(f"user name {args[0]!r} (the account is {ADMIN_USER}; your SSH key is installed there)")
            if len(args) > 1 and args[1]:
                ignored.append("password (no account has one: SSH by key only)")
    for key in PUBKEY_RE.findall(script):
        add("ssh_authorized_key", key.strip())
    if "set_wlan" not in script and "WPAEOF" in script:
        block = script.split("WPAEOF", 2)[1]
        m_ssid = re.search(r'^\s*ssid=(?:hex:([0-9a-fA-F]+)|"(.*)")\s*$', block, flags=re.M)
        m_psk = re.search(r"^\s*psk=(\S+)\s*$", block, flags=re.M)
        m_cc = re.search(r"^country=([A-Za-z]{2})\s*$", block, flags=re.M)
        ssid: Optional[str] = None
        if m_ssid and m_ssid.group(1):
            try:
                ssid = bytes.fromhex(m_ssid.group(1)).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                out.errors.append("Imager's Wi-Fi network name is not UTF-8 text; this image cannot use it: "
                                  "put wifi_ssid etc. in memento-edge.txt (or rename the network)")
        elif m_ssid:
            ssid = m_ssid.group(2).replace('\\"', '"').replace("\\\\", "\\")
        if ssid is not None:
            add("wifi_ssid", ssid)
            add("wifi_country", m_cc.group(1) if m_cc else (_cmdline_country(cmdline) or ""))
            if m_psk:
                add("wifi_passphrase", m_psk.group(1).strip('"'))
            else:
                add("wifi_security", "open")
            if re.search(r"^\s*scan_ssid=1", block, flags=re.M):
                add("wifi_hidden", "yes")
    return out, sorted(set(ignored))


def clean_cmdline(cmdline: str) -> str:
    """cmdline.txt without Imager's firstrun.sh entries (the rest, its regulatory domain included, stays)."""
    words = [w for w in cmdline.split() if not w.startswith(IMAGER_CMDLINE_DROP)]
    return " ".join(words) + "\n"


# --- status and summary -----------------------------------------------------------------------------------
def write_status(doc: Dict[str, object]) -> None:
    """The status file memento_edge/device.py reads (no secrets: where the token is, never the token)."""
    try:
        STATUS_FILE.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(STATUS_FILE.parent, 0o755)   # the unit's UMask=0077 would hide it from the service
        atomic_write(STATUS_FILE, json.dumps(doc, indent=2, sort_keys=True) + "\n", 0o644)
    except OSError as exc:
        log(f"could not write {STATUS_FILE}: {exc}")


def read_status() -> Dict[str, object]:
    """The status this boot has written so far (empty when none)."""
    try:
        doc = json.loads(STATUS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def usb_link() -> Optional[Dict[str, str]]:
    """{address, subnet} of the USB gadget link from its networkd file, or None when the image has none."""
    try:
        text = USB_NETWORK.read_text()
    except OSError:
        return None
    m = re.search(r"^Address=(\S+)", text, flags=re.M)
    if not m:
        return None
    iface = ipaddress.ip_interface(m.group(1))
    return {"address": str(iface.ip), "subnet": str(iface.network)}


def current_hostname() -> str:
    """The static hostname the device will have after this run."""
    try:
        return (ROOT / "etc/hostname").read_text().strip() or "memento-edge"
    except OSError:
        return "memento-edge"


def _section_lines(name: str, sec: Dict[str, object]) -> List[str]:
    if sec.get("state") == "refused":
        return [f"{name} was NOT applied (nothing changed); fix it on the card and restart:"] + \
            [f"  - {e}" for e in cast(List[str], sec["errors"])]
    if sec.get("state") == "applied":
        out = [f"{name} applied: " + "; ".join(cast(List[str], sec["applied"]))]
        if sec.get("not_honoured"):
            out.append(f"{name}: not used by this image: " + "; ".join(cast(List[str], sec["not_honoured"])))
        return out
    return []


def summary_lines(status: Dict[str, object], token: Optional[str]) -> Tuple[List[str], List[str]]:
    """The first-boot summary: (lines, the console-only line with a token generated in this boot)."""
    host = status["hostname"]
    usb = cast(Optional[Dict[str, str]], status.get("usb"))
    where = f", http://{usb['address']}:8077/ over the USB cable (OTG port)" if usb else ""
    lines = [f"hostname {host}: http://{host}.local:8077/{where}, ssh admin@{host}.local"]
    imager = cast(Dict[str, object], status.get("imager") or {})
    lines += _section_lines(f"Raspberry Pi Imager's settings ({imager.get('source')})", imager)
    fb = cast(Dict[str, object], status["firstboot"])
    lines += _section_lines(BOOT_FILE.name, fb)
    if fb.get("state") == "absent" and imager.get("state") in (None, "absent"):
        lines.append(f"no {BOOT_FILE.name} on the boot partition (see memento-edge.txt.example there)")
    wifi = cast(Dict[str, object], status.get("wifi") or {})
    lines += cast(List[str], wifi.get("firmware_from_card") or [])
    if status.get("token_file"):
        page = f"on http://{usb['address']}:8077/ over the USB cable, or " if usb else ""
        lines.append(f"API token: {page}sudo cat {TOKEN_FILE}")
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


def _read(path: Path) -> str:
    try:
        return decode(path.read_bytes())
    except OSError:
        return ""


def run_imager() -> Tuple[Dict[str, object], bool]:
    """Apply what Raspberry Pi Imager left on the card, if anything. Returns (status section, whether to
    restart: this boot was started into kernel-command-line.target by Imager's firstrun.sh entries)."""
    boot = BOOT_FILE.parent
    firstrun, cmdline_txt = boot / "firstrun.sh", boot / "cmdline.txt"
    cloud = [boot / "user-data", boot / "network-config", boot / "meta-data"]
    cmdline = _read(cmdline_txt)
    if firstrun.exists():
        source, (parsed, ignored) = "firstrun.sh", imager_firstrun(_read(firstrun), cmdline)
    elif any(f.exists() for f in cloud[:2]):
        source, (parsed, ignored) = "cloud-init", imager_cloud_init(_read(cloud[0]), _read(cloud[1]), cmdline)
    else:
        return {"state": "absent"}, False
    restart = False
    if any(w.startswith(IMAGER_CMDLINE_DROP) for w in cmdline.split()):
        # Whatever the settings say, never leave the card booting into kernel-command-line.target.
        atomic_write(cmdline_txt, clean_cmdline(cmdline), 0o644)
        restart = IMAGER_CMDLINE_DROP[2] in _read(Path("/proc/cmdline"))
    p, errors = plan(parsed)
    section: Dict[str, object] = {"source": source, "not_honoured": ignored}
    if errors:
        return {**section, "state": "refused", "errors": errors, "applied": []}, restart
    done, _ = apply(p)
    for f in [firstrun] + cloud:   # they hold the Wi-Fi PSK and a password hash
        if f.exists():
            f.unlink()
    return {**section, "state": "applied", "errors": [], "applied": done}, restart


def firstboot_main() -> int:
    """Wi-Fi firmware from the card, Imager's settings, memento-edge.txt, a token; report on every channel."""
    firmware = install_card_firmware()
    imager, restart = run_imager()
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
        "firstboot": {"file": str(BOOT_FILE), **section}, "imager": imager,
        "wifi": {"state": "not-checked", "firmware_from_card": firmware, "messages": []},
        "token_file": str(TOKEN_FILE) if TOKEN_FILE.exists() else None,
        "usb": usb_link(),
    }
    write_status(status)
    announce(*summary_lines(status, generated))
    if restart and _live():
        announce(["restarting once to leave the boot mode Raspberry Pi Imager's firstrun.sh set"], [])
        subprocess.run(["systemctl", "reboot", "--no-block"], check=False)
    return 0


def wifi_main(timeout: float = 60.0, poll: float = 2.0) -> int:
    """Wait (bounded) for the Wi-Fi chip to come up or fail, reload the driver once when firmware was added
    from the card in this boot, and report the state on every channel."""
    start = time.monotonic()
    reloaded = False
    configured = (ROOT / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf").exists()
    while True:
        log_text, present = kernel_log(), broadcom_sdio_present()
        doc = wifi_state(log_text, present, wlan_interface(), configured)
        fw = str(doc.get("firmware") or "")
        if doc["state"] == "firmware-missing" and not reloaded and fw and any(
                (FIRMWARE_DIR / f"{fw}{sfx}").exists() for sfx in (".bin", ".raspberrypi,model-zero-2-w.bin")):
            subprocess.run(["modprobe", "-r", "brcmfmac"], check=False)
            subprocess.run(["modprobe", "brcmfmac"], check=False)
            reloaded = True
            continue
        elapsed = time.monotonic() - start
        settled = doc["state"] == "ok" or (doc["state"] == "no-chip" and elapsed > 20) or \
            (doc["state"] == "firmware-missing" and elapsed > 10)
        if settled or elapsed > timeout:
            break
        time.sleep(poll)
    status = read_status()
    previous = cast(Dict[str, object], status.get("wifi") or {})
    doc["firmware_from_card"] = previous.get("firmware_from_card", [])
    status["wifi"] = doc
    write_status(status)
    announce([f"Wi-Fi: {doc['state']}" + (f" ({doc['chip']})" if doc.get("chip") else "")]
             + cast(List[str], doc["messages"]), [])
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``--wifi``: the Wi-Fi check (memento-edge-wifi.service); otherwise the first-boot run."""
    args = sys.argv[1:] if argv is None else argv
    return wifi_main() if "--wifi" in args else firstboot_main()


if __name__ == "__main__":
    sys.exit(main())
