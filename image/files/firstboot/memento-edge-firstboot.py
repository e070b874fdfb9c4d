"""Apply ``memento-edge.txt`` from the FAT boot partition, then wipe the secrets from it.

Runs as root from ``memento-edge-firstboot.service`` early at every boot while the file exists, so a user can
put a new file on the card later (to change Wi-Fi, add a key or a token). The file is ``key = value`` lines
(``#`` comments, blank lines, Windows line endings and a UTF-8 BOM are fine). Recognised keys::

    hostname            memento-pi                      letters, digits, '-'; at most 63 characters
    wifi_ssid           MyNetwork
    wifi_passphrase     correct horse battery staple    8..63 characters (WPA2/WPA3-SAE personal)
    wifi_country        DE                              ISO 3166 two-letter code (radio regulations)
    ssh_authorized_key  ssh-ed25519 AAAA... me@laptop   may repeat; installed for the user "admin"
    api_token           <a long random string>          its sha256 is added to the service config
    api_token_name      agent                           name of that token (default "firstboot")
    timezone            Europe/Berlin

After applying, the ``wifi_passphrase`` and ``api_token`` lines are replaced by comments so the plain secrets
no longer sit on a partition any computer can read; the rest of the file is re-applied at each boot (same
result). Wi-Fi is configured only when both ``wifi_ssid`` and ``wifi_passphrase`` are given. If the device ends up with no API token at all,
one is generated and left in /etc/memento-edge/initial-token (root only): read it over SSH, then delete it.
Written against the Python standard library + PyYAML (the service's venv) only.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import re
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import yaml

BOOT_FILE = Path(os.environ.get("MEMENTO_FIRSTBOOT_FILE", "/boot/firmware/memento-edge.txt"))
ROOT = Path(os.environ.get("MEMENTO_FIRSTBOOT_ROOT", "/"))
CONFIG = ROOT / "etc/memento-edge/config.yaml"
TOKEN_FILE = ROOT / "etc/memento-edge/initial-token"
ADMIN_USER = "admin"
SECRET_KEYS = ("wifi_passphrase", "api_token")
KNOWN_KEYS = ("hostname", "wifi_ssid", "wifi_passphrase", "wifi_country", "ssh_authorized_key",
              "api_token", "api_token_name", "timezone")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
COUNTRY_RE = re.compile(r"^[A-Z]{2}$")
KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
                    r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/=]+( .*)?$")


def log(msg: str) -> None:
    """Print to the journal (and the serial console via the unit's StandardOutput)."""
    print(f"memento-edge-firstboot: {msg}", flush=True)


def parse(text: str) -> Tuple[Dict[str, List[str]], List[str]]:
    """Return ({key: [values]}, warnings) for the ``key = value`` lines of ``text``."""
    values: Dict[str, List[str]] = {}
    warnings: List[str] = []
    for n, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if not sep or key not in KNOWN_KEYS:
            warnings.append(f"line {n}: ignored (unknown key {key!r})")
            continue
        if value:
            values.setdefault(key, []).append(value)
    return values, warnings


def atomic_write(path: Path, data: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Write ``data`` so a power cut leaves either the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
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


def apply_hostname(name: str) -> None:
    """Set the static hostname and the matching /etc/hosts line."""
    if not HOSTNAME_RE.match(name):
        log(f"hostname {name!r} is not a valid host name; kept the old one")
        return
    atomic_write(ROOT / "etc/hostname", name + "\n", 0o644)
    hosts = ROOT / "etc/hosts"
    lines = [ln for ln in hosts.read_text().splitlines() if not ln.startswith("127.0.1.1")] if hosts.exists() else [
        "127.0.0.1\tlocalhost", "::1\t\tlocalhost ip6-localhost ip6-loopback"]
    lines.insert(1, f"127.0.1.1\t{name}")
    atomic_write(hosts, "\n".join(lines) + "\n", 0o644)
    if ROOT == Path("/"):
        subprocess.run(["hostname", name], check=False)
    log(f"hostname set to {name}")


def wpa_quote(value: str) -> str:
    """Quote a value for wpa_supplicant.conf (no newlines or double quotes allowed inside)."""
    if '"' in value or "\n" in value:
        raise ValueError("Wi-Fi SSID/passphrase must not contain double quotes")
    return f'"{value}"'


def apply_wifi(ssid: str, passphrase: str, country: str) -> bool:
    """Write the wpa_supplicant config for wlan0 and enable it. Returns True when applied."""
    country = country.upper()
    if not COUNTRY_RE.match(country):
        log(f"wifi_country {country!r} is not a two-letter country code; Wi-Fi not configured")
        return False
    if not 8 <= len(passphrase) <= 63:
        log("wifi_passphrase must be 8..63 characters; Wi-Fi not configured")
        return False
    try:
        net = [f"    ssid={wpa_quote(ssid)}", f"    psk={wpa_quote(passphrase)}",
               "    key_mgmt=WPA-PSK WPA-PSK-SHA256 SAE", "    ieee80211w=1"]
    except ValueError as exc:
        log(f"{exc}; Wi-Fi not configured")
        return False
    conf = "\n".join(["ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev", "update_config=0",
                      f"country={country}", "", "network={", *net, "}", ""])
    atomic_write(ROOT / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf", conf, 0o600)
    if ROOT == Path("/"):
        subprocess.run(["systemctl", "enable", "wpa_supplicant@wlan0.service"], check=False)
        subprocess.run(["systemctl", "restart", "--no-block", "wpa_supplicant@wlan0.service"], check=False)
    log(f"Wi-Fi configured for SSID {ssid!r} (country {country})")
    return True


def apply_ssh_keys(keys: List[str]) -> None:
    """Append new public keys to the admin user's authorized_keys."""
    try:
        pw = pwd.getpwnam(ADMIN_USER)
        uid, gid, home = pw.pw_uid, pw.pw_gid, Path(pw.pw_dir)
    except KeyError:
        log(f"user {ADMIN_USER} missing; SSH keys not installed")
        return
    if ROOT != Path("/"):
        home = ROOT / str(home).lstrip("/")
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(ssh_dir, uid, gid)
    auth = ssh_dir / "authorized_keys"
    current = auth.read_text().splitlines() if auth.exists() else []
    added = 0
    for key in keys:
        if not KEY_RE.match(key):
            log("ignored an ssh_authorized_key line that is not an OpenSSH public key")
            continue
        if key not in current:
            current.append(key)
            added += 1
    atomic_write(auth, "\n".join(current) + "\n", 0o600, uid, gid)
    log(f"SSH: {added} key(s) added for {ADMIN_USER}")


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
    if len(token) < 16:
        log("api_token shorter than 16 characters; ignored")
        return
    cfg = load_config()
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    tokens = [t for t in (cfg.get("tokens") or []) if t.get("name") != name and t.get("sha256") != digest]
    tokens.append({"name": name, "sha256": digest, "scopes": ["read", "write"]})
    cfg["tokens"] = tokens
    save_config(cfg)
    log(f"API token {name!r} installed (sha256 only)")


def ensure_some_token() -> None:
    """Generate a token when the device has none, so the service can start (it refuses to serve
    a network address without one)."""
    cfg = load_config()
    if cfg.get("tokens"):
        return
    token = secrets.token_urlsafe(30)
    cfg["tokens"] = [{"name": "initial", "sha256": hashlib.sha256(token.encode()).hexdigest(),
                      "scopes": ["read", "write"]}]
    atomic_write(TOKEN_FILE, token + "\n", 0o600)
    save_config(cfg)
    log(f"no API token given: generated one in {TOKEN_FILE} (root only) - read it over SSH, then delete it")


def apply_timezone(tz: str) -> None:
    """Point /etc/localtime at the zoneinfo file of ``tz``."""
    zone = ROOT / "usr/share/zoneinfo" / tz
    if ".." in tz or not zone.is_file():
        log(f"unknown timezone {tz!r}; ignored")
        return
    link = ROOT / "etc/localtime"
    tmp = link.with_name(".localtime.new")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(f"/usr/share/zoneinfo/{tz}")
    os.replace(tmp, link)
    atomic_write(ROOT / "etc/timezone", tz + "\n", 0o644)
    log(f"timezone set to {tz}")


def wipe_secrets(text: str) -> str:
    """``text`` with the values of secret keys removed (comments and other lines kept)."""
    out = []
    for raw in text.lstrip("\ufeff").splitlines():
        key = raw.partition("=")[0].strip().lower()
        if "=" in raw and key in SECRET_KEYS and raw.partition("=")[2].strip():
            out.append(f"# {key} = (applied and wiped at boot)")
        else:
            out.append(raw.rstrip("\r"))
    return "\n".join(out) + "\n"


def main() -> int:
    """Apply the first-boot file if present; always make sure the service has a token."""
    if BOOT_FILE.exists():
        text = BOOT_FILE.read_text(encoding="utf-8", errors="replace")
        values, warnings = parse(text)
        for w in warnings:
            log(f"{BOOT_FILE.name}: {w}")
        first = {k: v[0] for k, v in values.items()}
        if "hostname" in first:
            apply_hostname(first["hostname"])
        if "timezone" in first:
            apply_timezone(first["timezone"])
        if "wifi_ssid" in first and "wifi_passphrase" in first:
            apply_wifi(first["wifi_ssid"], first["wifi_passphrase"], first.get("wifi_country", ""))
        if values.get("ssh_authorized_key"):
            apply_ssh_keys(values["ssh_authorized_key"])
        if "api_token" in first:
            apply_token(first["api_token"], first.get("api_token_name", "firstboot"))
        wiped = wipe_secrets(text)
        if wiped != text:
            # FAT has no atomic rename guarantee across a power cut either way; write + fsync is the best
            # available, and the secrets are already applied.
            with open(BOOT_FILE, "w", encoding="utf-8") as fh:
                fh.write(wiped)
                fh.flush()
                os.fsync(fh.fileno())
            log(f"secrets wiped from {BOOT_FILE}")
    ensure_some_token()
    return 0


if __name__ == "__main__":
    sys.exit(main())
