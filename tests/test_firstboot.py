"""The appliance's first-boot file ``memento-edge.txt`` (image/files/firstboot/memento-edge-firstboot.py) and
what it reports to the web page and ``/readyz`` (memento_edge/device.py).

Every example the READMEs and the card's template show is extracted and run through the real parser; hostile
files (typos, broken quotes, duplicates, binary junk, UTF-16) must be refused whole, with nothing applied and
the file left on the card for correction.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pwd
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, List, Tuple

import pytest

from memento_edge import device

REPO = Path(__file__).resolve().parents[1]
FIRSTBOOT = REPO / "image" / "files" / "firstboot" / "memento-edge-firstboot.py"
KEY_TYPE_ED25519 = b"\x00\x00\x00\x0bssh-ed25519"
# A well-formed ed25519 public key (random bytes; no one holds the private half).
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBu0dsr9D8HbN3Nv1jBz0ozIk2bCcoL7pcGOwO6mZX/N me@laptop"
TOKEN = "3f9c2b7e51d04a8c9e6f1a2b3c4d5e6f7a8b9c0d1e2f3a4b"


@pytest.fixture(scope="module")
def fb() -> ModuleType:
    """The first-boot script imported as a module."""
    spec = importlib.util.spec_from_file_location("memento_edge_firstboot", FIRSTBOOT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class Device:
    """A fake root filesystem + boot partition the script runs against."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.boot = root / "boot/firmware/memento-edge.txt"
        self.status = root / "run/memento-edge-device/status.json"
        for d in ("etc/memento-edge", "boot/firmware", "usr/share/zoneinfo/Europe"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "usr/share/zoneinfo/Europe/Berlin").write_bytes(b"TZif2")
        (root / "usr/share/zoneinfo/UTC").write_bytes(b"TZif2")
        (root / "etc/hostname").write_text("memento-edge\n")
        (root / "etc/memento-edge/config.yaml").write_text("port: 8077\ntokens: []\n")

    def add_usb_link(self) -> None:
        """The USB gadget link's networkd file, as the image would carry it."""
        net = self.root / "etc/systemd/network/10-usb-gadget.network"
        net.parent.mkdir(parents=True, exist_ok=True)
        net.write_text("[Match]\nName=usb0\n\n[Network]\nAddress=10.55.0.1/29\nDHCPServer=yes\n")

    def path(self, rel: str) -> Path:
        """A path inside the fake root."""
        return self.root / rel

    def tree(self) -> List[str]:
        """Every file under the root except the boot file and the status file (what 'applied' changes)."""
        skip = {self.boot, self.status}
        return sorted(str(p.relative_to(self.root)) + ":" + (p.read_text(errors="replace") if p.is_file() else "")
                      for p in self.root.rglob("*") if p.is_file() and p not in skip)


@pytest.fixture
def dev(fb: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Device]:
    """The script pointed at a fresh fake device; the admin user is the one running the tests."""
    d = Device(tmp_path / "root")
    monkeypatch.setattr(fb, "ROOT", d.root)
    monkeypatch.setattr(fb, "CONFIG", d.root / "etc/memento-edge/config.yaml")
    monkeypatch.setattr(fb, "TOKEN_FILE", d.root / "etc/memento-edge/initial-token")
    monkeypatch.setattr(fb, "BOOT_FILE", d.boot)
    monkeypatch.setattr(fb, "STATUS_FILE", d.status)
    monkeypatch.setattr(fb, "USB_NETWORK", d.root / "etc/systemd/network/10-usb-gadget.network")
    monkeypatch.setattr(fb, "ADMIN_USER", pwd.getpwuid(os.getuid()).pw_name)
    monkeypatch.setattr(fb, "announce", lambda lines, console_only: None)
    yield d


def boot(fb: ModuleType, dev: Device, text: str | bytes) -> dict:
    """Put ``text`` on the card, run the script as the unit does, return the status it wrote."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    dev.boot.write_bytes(text)
    assert fb.main([]) == 0
    return json.loads(dev.status.read_text())


# --- the documented examples --------------------------------------------------------------------------------
def documented_examples() -> List[Tuple[str, str]]:
    """(where, text) of every first-boot example: the ```ini blocks of both READMEs and the card's template."""
    out = []
    for readme in ("README.md", "image/README.md"):
        text = (REPO / readme).read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(r"```ini\n(.*?)```", text, flags=re.S)):
            if "wifi_ssid" in block or "hostname" in block:
                out.append((f"{readme}#{i}", block))
    out.append(("memento-edge.txt.example", (REPO / "image/files/memento-edge.txt.example").read_text()))
    return out


def fill_placeholders(text: str) -> str:
    """The example as a user completes it: their own key and token in place of the placeholders."""
    for key, value in (("ssh_authorized_key", SSH_KEY), ("api_token", TOKEN)):
        pattern = rf"(?m)^({key}\s*=\s*).*?(\s+#.*)?$"
        text = re.sub(pattern, lambda m, v=value: m.group(1) + v + (m.group(2) or ""), text)
    return text


def test_both_readmes_show_an_example() -> None:
    wheres = [w for w, _ in documented_examples()]
    assert any(w.startswith("README.md") for w in wheres)
    assert any(w.startswith("image/README.md") for w in wheres)


@pytest.mark.parametrize("where,text", documented_examples(), ids=[w for w, _ in documented_examples()])
def test_documented_example_parses_clean_and_refuses_only_its_placeholders(fb, where, text) -> None:  # noqa: ANN001
    parsed = fb.parse("\ufeff" + text.replace("\n", "\r\n"))   # as Notepad saves it
    assert parsed.errors == []
    values = parsed.values()
    for key, vals in values.items():
        assert all(" #" not in v and not v.endswith("#") for v in vals), (key, vals)  # comments not kept
    if "wifi_country" in values:
        assert values["wifi_country"] == ["DE"]
    if "wifi_passphrase" in values:
        assert values["wifi_passphrase"] == ["correct horse battery staple"]
    _, errors = fb.plan(parsed)
    assert all("placeholder" in e for e in errors), errors   # the user must put their own key and token


@pytest.mark.parametrize("where,text", documented_examples(), ids=[w for w, _ in documented_examples()])
def test_documented_example_filled_in_applies(fb, dev, where, text) -> None:  # noqa: ANN001
    status = boot(fb, dev, fill_placeholders(text))
    assert status["firstboot"]["state"] == "applied", status["firstboot"]["errors"]
    assert dev.path("etc/hostname").read_text() == "memento-pi\n"
    conf = dev.path("etc/wpa_supplicant/wpa_supplicant-wlan0.conf").read_text()
    assert "country=DE" in conf and "key_mgmt=WPA-PSK\n" in conf and "SAE" not in conf
    psk = hashlib.pbkdf2_hmac("sha1", b"correct horse battery staple", b"MyHomeNetwork", 4096, 32).hex()
    assert f"psk={psk}" in conf
    cfg = dev.path("etc/memento-edge/config.yaml").read_text()
    if "api_token" in text:
        assert hashlib.sha256(TOKEN.encode()).hexdigest() in cfg and TOKEN not in cfg
        assert TOKEN not in dev.boot.read_text()                  # wiped from the card
    assert "correct horse battery staple" not in dev.boot.read_text()
    assert "hostname = memento-pi" in dev.boot.read_text()        # the rest stays


def inline_examples() -> List[Tuple[str, str]]:
    """(where, line) of every one-line first-boot setting the READMEs show in running text
    (`` `wifi_hidden = yes` ``); a ``<...>`` stand-in for the reader's own value is not an example."""
    out = []
    for readme in ("README.md", "image/README.md"):
        for snippet in re.findall(r"`([A-Za-z_-]+ *= *[^`<]+)`", (REPO / readme).read_text(encoding="utf-8")):
            key = snippet.split("=", 1)[0].strip().lower().replace("-", "_")
            if key in ("hostname", "api_token", "timezone") or key.startswith(("wifi_", "ssh_", "api_")):
                out.append((readme, snippet))
    return out


def test_readmes_show_inline_settings() -> None:
    lines = {line for _, line in inline_examples()}
    assert {"wifi_hidden = yes", "wifi_security = wpa3", "api_token = generate"} <= lines


@pytest.mark.parametrize("where,line", inline_examples(), ids=[f"{w}:{ln}" for w, ln in inline_examples()])
def test_inline_example_is_a_valid_setting(fb, where, line) -> None:  # noqa: ANN001
    parsed = fb.parse(line + "\n")
    assert parsed.errors == [] and len(parsed.lines) == 1, parsed.errors
    ln = parsed.lines[0]
    assert fb.KEYS[ln.key].check(ln.value) is None


# --- what people write --------------------------------------------------------------------------------------
@pytest.mark.parametrize("line,value", [
    ("wifi_passphrase = correct horse # a comment", "correct horse"),
    ("wifi_passphrase=correct horse", "correct horse"),
    ("  wifi_passphrase   =   correct horse   ", "correct horse"),
    ('wifi_passphrase = "pass # word"   # quoted: the # is kept', "pass # word"),
    ("wifi_passphrase = 'it''s'", None),
    ("wifi_passphrase = 'say \"hi\" #1'", 'say "hi" #1'),
    ("wifi_passphrase = pass#word", "pass#word"),               # no space before '#': part of the value
    ("WIFI-PASSPHRASE = Upper Case Key", "Upper Case Key"),
    ("wifi_passphrase = \t tabbed\t# comment", "tabbed"),
])
def test_value_syntax(fb, line, value) -> None:  # noqa: ANN001
    parsed = fb.parse(line + "\n")
    if value is None:
        assert parsed.errors and "after the closing quote" in parsed.errors[0]
    else:
        assert parsed.errors == [] and parsed.values() == {"wifi_passphrase": [value]}


def test_line_endings_bom_and_utf16(fb, dev) -> None:  # noqa: ANN001
    text = "hostname = one\r\ntimezone = UTC\r\n"
    assert fb.parse("\ufeff" + text).values() == {"hostname": ["one"], "timezone": ["UTC"]}
    assert fb.parse(text.replace("\r\n", "\r")).values() == {"hostname": ["one"], "timezone": ["UTC"]}
    status = boot(fb, dev, text.encode("utf-16"))        # Windows Notepad's "Unicode"
    assert status["firstboot"]["state"] == "applied" and dev.path("etc/hostname").read_text() == "one\n"


@pytest.mark.parametrize("text,needle", [
    ("wifi_pasphrase = secret123\n", "did you mean 'wifi_passphrase'"),
    ("hostname memento\n", "no '='"),
    ('wifi_passphrase = "never closed\n', "never closed"),
    ("hostname = a\nhostname = b\n", "given 2 times"),
    ("hostname = -bad-\n", "hostname"),
    ("hostname = has space\n", "hostname"),
    ("wifi_ssid = Net\nwifi_passphrase = short\nwifi_country = DE\n", "8..63"),
    ("wifi_ssid = Net\nwifi_passphrase = " + "x" * 64 + "\nwifi_country = DE\n", "8..63"),
    ("wifi_ssid = Net\nwifi_passphrase = correct horse\n", "wifi_country is required"),
    ("wifi_ssid = Net\nwifi_country = DE\n", "wifi_passphrase missing"),
    ("wifi_passphrase = correct horse\nwifi_country = DE\n", "no wifi_ssid"),
    ("wifi_ssid = Net\nwifi_passphrase = correct horse\nwifi_country = Germany\n", "two-letter"),
    ("wifi_ssid = " + "n" * 33 + "\nwifi_passphrase = correct horse\nwifi_country = DE\n", "1..32 bytes"),
    ("wifi_ssid = Net\nwifi_passphrase = correct horse\nwifi_country = DE\nwifi_security = wep\n", "one of"),
    ("wifi_ssid = Net\nwifi_passphrase = correct horse\nwifi_country = DE\nwifi_hidden = maybe\n", "yes or no"),
    ("ssh_authorized_key = -----BEGIN OPENSSH PRIVATE KEY-----\n", "not the private key"),
    ("ssh_authorized_key = " + SSH_KEY[:60] + "\n", "damaged"),
    ("api_token = short\n", "at least 16"),
    ("api_token = two words but long enough\n", "spaces"),
    ("api_token = replace-me-with-a-long-random-string\n", "placeholder"),
    ("api_token_name = my agent!\n", "api_token_name"),
    ("timezone = Mars/Olympus\n", "time zone"),
    ("timezone = ../../etc/shadow\n", "time zone"),
    ("\x00\x01\x02garbage\xff = \n", "unknown key"),
])
def test_bad_file_is_refused_whole(fb, dev, text, needle) -> None:  # noqa: ANN001
    before = dev.tree()
    good = f"timezone = Europe/Berlin\nssh_authorized_key = {SSH_KEY}\napi_token = {TOKEN}\n"
    status = boot(fb, dev, good + text)
    fbs = status["firstboot"]
    assert fbs["state"] == "refused" and fbs["applied"] == []
    assert any(needle in e for e in fbs["errors"]), fbs["errors"]
    assert dev.boot.read_text() == good + text             # left on the card to be fixed, secrets included
    assert dev.path("etc/hostname").read_text() == "memento-edge\n"
    assert not dev.path("etc/localtime").is_symlink()
    after = [f for f in dev.tree() if f not in before]
    # Only the generated fallback token (the service must start to show the error) is new.
    assert [f.split(":")[0] for f in after] == ["etc/memento-edge/config.yaml", "etc/memento-edge/initial-token"]
    assert hashlib.sha256(TOKEN.encode()).hexdigest() not in dev.path("etc/memento-edge/config.yaml").read_text()


def test_long_and_binary_files_never_crash(fb, dev) -> None:  # noqa: ANN001
    for junk in (os.urandom(4096), b"=" * 100_000, b"\n" * 10_000, b"hostname = " + b"a" * 10_000):
        status = boot(fb, dev, junk)
        assert status["firstboot"]["state"] in ("refused", "applied")


def test_wipe_replaces_only_secret_lines(fb) -> None:  # noqa: ANN001
    text = "hostname = pi\nwifi_passphrase = 's3cret # pass'  # mine\napi_token = tok-123456789012345\n# note\n"
    wiped = fb.wipe_secrets(text)
    assert "s3cret" not in wiped and "tok-123456789012345" not in wiped
    assert wiped.splitlines() == ["hostname = pi", "# wifi_passphrase = (applied and wiped at boot)",
                                  "# api_token = (applied and wiped at boot)", "# note"]
    assert fb.parse(wiped).values() == {"hostname": ["pi"]}


# --- Wi-Fi -------------------------------------------------------------------------------------------------
def wifi(fb, **kw) -> str:  # noqa: ANN001
    lines = {"wifi_ssid": "Net", "wifi_passphrase": "correct horse", "wifi_country": "de", **kw}
    parsed = fb.parse("".join(f"{k} = {v}\n" for k, v in lines.items() if v is not None))
    p, errors = fb.plan(parsed)
    assert errors == []
    return fb.render_wpa_supplicant(p.wifi)


def test_wifi_default_is_plain_wpa_psk(fb) -> None:  # noqa: ANN001
    conf = wifi(fb)
    assert "key_mgmt=WPA-PSK\n" in conf and "SAE" not in conf and "ieee80211w" not in conf
    assert "country=DE" in conf and "scan_ssid" not in conf and "correct horse" not in conf


def test_wifi_psk_matches_the_ieee_test_vector(fb) -> None:  # noqa: ANN001
    # IEEE 802.11i-2004 H.4: passphrase "password", SSID "IEEE".
    conf = wifi(fb, wifi_ssid="IEEE", wifi_passphrase="password")
    assert "psk=f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e" in conf
    assert "ssid=49454545" in conf


def test_wifi_hex_psk_hidden_and_odd_ssid(fb) -> None:  # noqa: ANN001
    psk = "A" * 64
    conf = wifi(fb, wifi_ssid='"Caf\u00e9 #1"', wifi_passphrase=psk, wifi_hidden="yes")
    assert f"psk={psk.lower()}" in conf and "scan_ssid=1" in conf
    assert "ssid=" + "Caf\u00e9 #1".encode().hex() in conf


@pytest.mark.parametrize("security,key_mgmt,pmf", [("wpa3", "SAE", "2"), ("wpa2-wpa3", "WPA-PSK SAE", "1")])
def test_wpa3_only_on_request(fb, security, key_mgmt, pmf) -> None:  # noqa: ANN001
    conf = wifi(fb, wifi_security=security)
    assert f"key_mgmt={key_mgmt}\n" in conf and f"ieee80211w={pmf}" in conf
    assert 'sae_password="correct horse"' in conf


def test_open_network(fb) -> None:  # noqa: ANN001
    conf = wifi(fb, wifi_passphrase=None, wifi_security="open")
    assert "key_mgmt=NONE" in conf and "psk" not in conf


# --- tokens and what the device reports -----------------------------------------------------------------------
def test_no_token_anywhere_generates_one_for_the_console_and_local_page(fb, dev) -> None:  # noqa: ANN001
    shown: List[List[str]] = []
    fb.announce = lambda lines, console_only: shown.append(lines + console_only)   # fixture's stub replaced
    status = boot(fb, dev, f"hostname = memento-pi\nssh_authorized_key = {SSH_KEY}\n")
    token = dev.path("etc/memento-edge/initial-token").read_text().strip()
    assert len(token) >= 32 and oct(dev.path("etc/memento-edge/initial-token").stat().st_mode & 0o777) == "0o640"
    assert hashlib.sha256(token.encode()).hexdigest() in dev.path("etc/memento-edge/config.yaml").read_text()
    assert token not in dev.status.read_text()
    assert any(token in ln for ln in shown[0])
    assert status["token_file"].endswith("etc/memento-edge/initial-token")
    assert oct(dev.status.stat().st_mode & 0o777) == "0o644"
    assert oct(dev.status.parent.stat().st_mode & 0o777) == "0o755"
    # The next boot has a token: nothing new generated, nothing printed.
    status2 = boot(fb, dev, "")
    assert dev.path("etc/memento-edge/initial-token").read_text().strip() == token
    assert not any(token in ln for ln in shown[1]) and status2["firstboot"]["state"] == "applied"


def test_api_token_generate_replaces_a_lost_token(fb, dev) -> None:  # noqa: ANN001
    boot(fb, dev, "")
    first = dev.path("etc/memento-edge/initial-token").read_text().strip()
    boot(fb, dev, "api_token = generate\n")
    second = dev.path("etc/memento-edge/initial-token").read_text().strip()
    cfg = dev.path("etc/memento-edge/config.yaml").read_text()
    assert second != first
    assert hashlib.sha256(second.encode()).hexdigest() in cfg
    assert hashlib.sha256(first.encode()).hexdigest() not in cfg      # the lost one no longer works
    assert "api_token = (applied and wiped at boot)" in dev.boot.read_text()


def test_device_status_for_public_and_local_clients(fb, dev) -> None:  # noqa: ANN001
    dev.add_usb_link()
    boot(fb, dev, "wifi_pasphrase = x\n")
    token = dev.path("etc/memento-edge/initial-token").read_text().strip()
    public = device.public_status(dev.status)
    assert public is not None and public["firstboot"]["state"] == "refused"
    assert token not in json.dumps(public) and "token_file" not in public
    for addr in ("127.0.0.1", "::1", "10.55.0.2"):
        view = device.local_view(dev.status, addr)
        assert view is not None and view["token"] == token, addr
    for addr in ("192.168.1.20", "10.55.0.9", "10.0.2.2", None, "junk"):
        assert device.local_view(dev.status, addr) is None, addr
    dev.path("etc/memento-edge/initial-token").unlink()           # the owner stored it and removed it
    assert device.local_view(dev.status, "127.0.0.1")["token"] is None
    assert device.public_status(dev.root / "nope.json") is None


def test_web_page_and_readyz_show_the_device_status(fb, dev, tmp_path) -> None:  # noqa: ANN001
    from webfixtures import WebEnv

    dev.add_usb_link()
    boot(fb, dev, "wifi_ssid = Net\nwifi_passphrase = correct horse\n")
    token = dev.path("etc/memento-edge/initial-token").read_text().strip()
    env = WebEnv(tmp_path / "home", device_status=str(dev.status))
    try:
        ready = env.client.get("/readyz").get_json()
        assert ready["device"]["firstboot"]["state"] == "refused"
        assert any("wifi_country is required" in e for e in ready["device"]["firstboot"]["errors"])
        local = env.client.get("/", environ_base={"REMOTE_ADDR": "127.0.0.1"}).get_data(as_text=True)
        assert token in local and "wifi_country is required" in local and "not applied" in local
        usb = env.client.get("/", environ_base={"REMOTE_ADDR": "10.55.0.2"}).get_data(as_text=True)
        assert token in usb
        lan = env.client.get("/", environ_base={"REMOTE_ADDR": "192.168.1.20"}).get_data(as_text=True)
        assert token not in lan and "h-device" not in lan
    finally:
        env.close()


def test_the_boot_tests_own_file_applies(fb, dev) -> None:  # noqa: ANN001
    """image/boot-test.sh's memento-edge.txt (its heredoc, with a real key and token) is accepted."""
    script = (REPO / "image/boot-test.sh").read_text()
    body = re.search(r'cat > "\$work/memento-edge.txt" <<EOF\n(.*?)\nEOF\n', script, flags=re.S)
    assert body is not None
    text = body.group(1).replace("$(cat \"$work/id_ed25519.pub\")", SSH_KEY).replace("$token", TOKEN)
    status = boot(fb, dev, text)
    assert status["firstboot"]["state"] == "applied", status["firstboot"]["errors"]
    assert hashlib.sha256(TOKEN.encode()).hexdigest() in dev.path("etc/memento-edge/config.yaml").read_text()


# --- Raspberry Pi Imager -------------------------------------------------------------------------------------
IMAGER = REPO / "tests" / "fixtures" / "imager"


def put_imager(dev: Device, name: str) -> None:
    """Copy an Imager fixture onto the fake card's FAT partition."""
    for f in (IMAGER / name).iterdir():
        (dev.boot.parent / f.name).write_bytes(f.read_bytes())


@pytest.mark.parametrize("name", ["cloudinit", "firstrun"])
def test_imager_customisation_applies(fb, dev, name) -> None:  # noqa: ANN001
    put_imager(dev, name)
    status = boot(fb, dev, b"")
    dev.boot.unlink()
    im = status["imager"]
    assert im["state"] == "applied", im
    assert im["source"] == ("cloud-init" if name == "cloudinit" else "firstrun.sh")
    assert dev.path("etc/hostname").read_text() == "memento-pi\n"
    conf = dev.path("etc/wpa_supplicant/wpa_supplicant-wlan0.conf").read_text()
    psk = hashlib.pbkdf2_hmac("sha1", b"correct horse battery staple", b"MyHomeNetwork", 4096, 32).hex()
    assert f"psk={psk}" in conf and "country=DE" in conf and "key_mgmt=WPA-PSK\n" in conf
    home = pwd.getpwuid(os.getuid()).pw_dir.lstrip("/")
    assert SSH_KEY in dev.path(home + "/.ssh/authorized_keys").read_text()
    assert os.readlink(dev.path("etc/localtime")) == "/usr/share/zoneinfo/Europe/Berlin"
    assert any("alice" in n for n in im["not_honoured"]) and any("password" in n for n in im["not_honoured"])
    assert any("keyboard" in n for n in im["not_honoured"])
    left = sorted(p.name for p in dev.boot.parent.iterdir())
    assert left == ["cmdline.txt"]                         # PSK and password hash gone from the card
    cmdline = (dev.boot.parent / "cmdline.txt").read_text()
    assert "systemd.run" not in cmdline and "kernel-command-line.target" not in cmdline
    assert "root=LABEL=RASPIROOT" in cmdline and "cfg80211.ieee80211_regdom=DE" in cmdline
    assert dev.path("etc/memento-edge/initial-token").exists()   # Imager gives no token: one is made


def test_imager_hidden_open_utf8_network(fb, dev) -> None:  # noqa: ANN001
    put_imager(dev, "cloudinit-open-utf8")
    status = boot(fb, dev, b"")
    assert status["imager"]["state"] == "applied", status["imager"]
    conf = dev.path("etc/wpa_supplicant/wpa_supplicant-wlan0.conf").read_text()
    assert "ssid=" + "Caf\u00e9 Wi-Fi".encode().hex() in conf
    assert "key_mgmt=NONE" in conf and "scan_ssid=1" in conf and "country=GB" in conf


def test_imager_ssid_that_is_not_utf8_is_refused_but_the_boot_mode_is_fixed(fb, dev) -> None:  # noqa: ANN001
    put_imager(dev, "firstrun-hexssid")
    status = boot(fb, dev, b"")
    im = status["imager"]
    assert im["state"] == "refused" and any("not UTF-8" in e for e in im["errors"])
    assert dev.path("etc/hostname").read_text() == "memento-edge\n"            # nothing half-applied
    assert "systemd.run" not in (dev.boot.parent / "cmdline.txt").read_text()   # but never stuck
    assert (dev.boot.parent / "firstrun.sh").exists()


def test_imager_and_memento_file_together(fb, dev) -> None:  # noqa: ANN001
    put_imager(dev, "cloudinit")
    status = boot(fb, dev, f"hostname = from-the-txt\napi_token = {TOKEN}\n")
    assert status["imager"]["state"] == "applied" and status["firstboot"]["state"] == "applied"
    assert dev.path("etc/hostname").read_text() == "from-the-txt\n"        # memento-edge.txt wins
    assert not dev.path("etc/memento-edge/initial-token").exists()


# --- Wi-Fi chip and firmware ---------------------------------------------------------------------------------
KLOG_43436_MISSING = "\n".join([
    "brcmfmac: brcmf_fw_alloc_request: using brcm/brcmfmac43430b0-sdio for chip BCM43430/2",
    "brcmfmac mmc1:0001:1: Direct firmware load for brcm/brcmfmac43430b0-sdio.raspberrypi,model-zero-2-w.bin "
    "failed with error -2",
    "brcmfmac mmc1:0001:1: Direct firmware load for brcm/brcmfmac43430b0-sdio.bin failed with error -2",
    "brcmfmac: brcmf_sdio_firmware_callback: failed: dev=mmc1:0001:1, err=-2", ""])
KLOG_43430_OK = "brcmfmac: brcmf_fw_alloc_request: using brcm/brcmfmac43430-sdio for chip BCM43430/1\n"


def test_wifi_state_names_the_missing_firmware(fb) -> None:  # noqa: ANN001
    doc = fb.wifi_state(KLOG_43436_MISSING, True, None, True)
    assert doc["state"] == "firmware-missing" and doc["chip"] == "BCM43430/2"
    assert "brcmfmac43436-sdio.bin" in doc["messages"][0] and "brcm/" in doc["messages"][0]
    ok = fb.wifi_state(KLOG_43430_OK, True, "wlan0", False)
    assert ok["state"] == "ok" and "not configured" in ok["messages"][0]
    assert fb.wifi_state("", False, None, False)["state"] == "no-chip"        # QEMU, or no radio
    assert fb.wifi_state(KLOG_43430_OK, True, None, True)["state"] == "no-interface"


def test_card_firmware_is_installed_verified_and_linked(fb, dev, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(fb, "FIRMWARE_DIR", dev.path("lib/firmware/brcm"))
    monkeypatch.setattr(fb, "CARD_FIRMWARE_DIR", dev.boot.parent / "brcm")
    card = dev.boot.parent / "brcm"
    card.mkdir()
    (card / "brcmfmac43436-sdio.txt").write_bytes(b"not the real nvram\n")
    (card / "notes.txt").write_text("x")
    (card / "README.txt").write_text("the image's own note")
    done = fb.install_card_firmware()
    assert any("brcmfmac43436-sdio.txt" in d and "UNKNOWN" in d for d in done)
    assert any("notes.txt" in d and "ignored" in d for d in done)
    link = dev.path("lib/firmware/brcm/brcmfmac43430b0-sdio.raspberrypi,model-zero-2-w.txt")
    assert link.is_symlink() and link.read_bytes() == b"not the real nvram\n"
    assert fb.install_card_firmware() == [d for d in done if "ignored" in d]   # once


def test_firmware_table_matches_the_docs(fb) -> None:  # noqa: ANN001
    doc = (REPO / "image/README.md").read_text()
    for name, digest in fb.FIRMWARE_SHA256.items():
        assert name in doc and digest in doc, name


def test_wifi_check_updates_the_status(fb, dev, monkeypatch) -> None:  # noqa: ANN001
    boot(fb, dev, "")
    monkeypatch.setattr(fb, "kernel_log", lambda: KLOG_43436_MISSING)
    monkeypatch.setattr(fb, "broadcom_sdio_present", lambda: True)
    monkeypatch.setattr(fb, "wlan_interface", lambda: None)
    monkeypatch.setattr(fb, "FIRMWARE_DIR", dev.path("lib/firmware/brcm"))
    assert fb.main(["--wifi"]) == 0
    wifi = device.public_status(dev.status)["wifi"]
    assert wifi["state"] == "firmware-missing" and wifi["chip"] == "BCM43430/2"


FILES = REPO / "image" / "files"




def test_every_appliance_file_is_installed_by_the_build() -> None:
    """Each file under image/files/ is named by build.sh or rootfs.sh (a new unit no one installs is a bug)."""
    scripts = (REPO / "image/build.sh").read_text() + (REPO / "image/rootfs.sh").read_text()
    missing = {str(p.relative_to(FILES)) for p in FILES.rglob("*") if p.is_file()
               and p.name not in scripts and str(p.relative_to(FILES)) not in scripts
               and not (p.parent == FILES / "etc/systemd/network" and p.suffix == ".network"
                        and "etc/systemd/network/*.network" in scripts)}
    assert missing == set()


def test_imager_manifest_asks_imager_for_cloud_init(tmp_path) -> None:  # noqa: ANN001
    import lzma

    spec = importlib.util.spec_from_file_location("imager_manifest", REPO / "image/imager_manifest.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    raw = os.urandom(4096) * 3
    xz = tmp_path / "memento-edge-0.1.0-pizero2w-arm64.img.xz"
    xz.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ))
    assert mod.main([str(xz)]) == 0
    doc = json.loads((tmp_path / "memento-edge-0.1.0-pizero2w-arm64.rpi-imager-manifest").read_text())
    entry = doc["os_list"][0]
    # The fields rpi-imager's OS list schema requires, and the one that makes Imager 2.x customise.
    for key in ("name", "description", "icon", "url", "extract_size", "extract_sha256", "image_download_size",
                "release_date", "devices"):
        assert key in entry, key
    assert entry["init_format"] == "cloudinit" and entry["url"].startswith("file:///")
    assert entry["extract_size"] == len(raw) and entry["extract_sha256"] == hashlib.sha256(raw).hexdigest()
    assert entry["image_download_sha256"] == hashlib.sha256(xz.read_bytes()).hexdigest()


def test_without_a_usb_link_nobody_but_the_device_is_local(fb, dev) -> None:  # noqa: ANN001
    shown: List[List[str]] = []
    fb.announce = lambda lines, console_only: shown.append(lines)
    status = boot(fb, dev, "")
    assert status["usb"] is None and "USB" not in " ".join(shown[0])
    assert device.local_view(dev.status, "10.55.0.2") is None
    assert device.local_view(dev.status, "127.0.0.1") is not None
    dev.add_usb_link()
    status = boot(fb, dev, "")
    assert status["usb"] == {"address": "10.55.0.1", "subnet": "10.55.0.0/29"}
    assert "http://10.55.0.1:8077/" in " ".join(shown[1])
