"""The image's "no Wi-Fi needed" path and boot settings (#12): the USB gadget Ethernet's network and DHCP
server config, the gadget loader's MAC addresses, zram swap, and the consoles/CMA the Pi's cmdline.txt gets.
Rendered files are checked here; image/boot-test.sh checks them live (usb0's address, the DHCP server's
socket, avahi on usb0, the service answering over it, zram swap, CMA).
"""
from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import ipaddress
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

REPO = Path(__file__).resolve().parent.parent
FILES = REPO / "image/files"
NETWORK = FILES / "etc/systemd/network"
GADGET = FILES / "usb-gadget"
GADGET_SH = FILES / "usb-gadget/memento-edge-usb-gadget.sh"
BOARD_DEFAULTS = {"zero2w": FILES / "etc/default/raspi-firmware",
                  "zero-w": REPO / "image/boards/zero-w/etc/default/raspi-firmware"}


def unit(path: Path) -> configparser.ConfigParser:
    """A systemd unit/network/link file as sections of keys (the last assignment of a key wins, as in systemd)."""
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    cp.read_string(path.read_text())
    return cp


@pytest.fixture(scope="module")
def firstboot_net() -> Dict[str, str]:
    """The address and subnet the first-boot script announces and memento_edge/device.py treats as local."""
    spec = importlib.util.spec_from_file_location("fb_usb", FILES / "firstboot/memento-edge-firstboot.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    # The script reads the address from the installed networkd file of this name (one fact, in that file):
    # point it at the image's copy and take what it announces.
    mod.USB_NETWORK = GADGET / mod.USB_NETWORK.name
    link = mod.usb_link()
    assert link is not None, f"the first-boot script reads {mod.USB_NETWORK.name}, which image/files/ lacks"
    return link


def test_usb0_address_is_the_announced_one(firstboot_net: Dict[str, str]) -> None:
    net = unit(GADGET / "10-usb-gadget.network")
    assert net["Match"]["Name"] == "usb0"
    iface = ipaddress.ip_interface(net["Network"]["Address"])
    assert str(iface.ip) == firstboot_net["address"]
    assert iface.network == ipaddress.ip_network(firstboot_net["subnet"])
    assert net["Network"]["DHCPServer"] == "yes"
    assert net["Network"]["MulticastDNS"] == "no"  # avahi is the image's mDNS responder on every interface


def test_dhcp_server_hands_the_laptop_one_address_and_no_route(firstboot_net: Dict[str, str]) -> None:
    net = unit(GADGET / "10-usb-gadget.network")
    subnet = ipaddress.ip_network(firstboot_net["subnet"])
    dhcp = net["DHCPServer"]
    offset, size = int(dhcp["PoolOffset"]), int(dhcp["PoolSize"])
    pool = [subnet.network_address + offset + i for i in range(size)]
    assert pool == [ipaddress.ip_address("10.55.0.2")]
    assert all(a in subnet and a not in (subnet.network_address, subnet.broadcast_address) for a in pool)
    assert ipaddress.ip_address(firstboot_net["address"]) not in pool
    # The laptop must keep its own default route and resolver: the cable reaches only the device.
    assert dhcp["EmitRouter"] == "no" and dhcp["EmitDNS"] == "no"
    assert dhcp["EmitNTP"] == "no" and dhcp["EmitTimezone"] == "no"
    assert int(dhcp["DefaultLeaseTimeSec"]) <= 600


def test_usb0_is_matched_before_the_wired_dhcp_client() -> None:
    # (the image's /etc/systemd/network: image/files' .network files plus the gadget's)
    paths = {p.name: p for p in [*NETWORK.glob("*.network"), GADGET / "10-usb-gadget.network"]}
    first = next(f for f in sorted(paths) if any(fnmatch.fnmatch("usb0", pat)
                                                 for pat in unit(paths[f])["Match"]["Name"].split()))
    assert first == "10-usb-gadget.network"
    link = unit(GADGET / "10-usb-gadget.link")
    assert link["Match"]["Driver"] == "g_ether" and link["Link"]["Name"] == "usb0"


def test_udev_starts_the_gadget_only_where_a_device_controller_exists() -> None:
    rule = (GADGET / "90-memento-edge-usb-gadget.rules").read_text()
    active = [ln for ln in rule.splitlines() if ln.strip() and not ln.startswith("#")]
    assert active == ['SUBSYSTEM=="udc", ACTION=="add", TAG+="systemd", '
                      'ENV{SYSTEMD_WANTS}+="memento-edge-usb-gadget.service"']
    svc = unit(FILES / "usb-gadget/memento-edge-usb-gadget.service")
    assert svc["Service"]["ExecStart"] == "/usr/local/lib/memento-edge/memento-edge-usb-gadget.sh"
    assert "Install" not in svc  # never enabled: udev wants it


def test_every_new_image_file_is_installed_by_build_sh() -> None:
    build = (REPO / "image/build.sh").read_text()
    for rel in ("usb-gadget/memento-edge-usb-gadget.sh", "usb-gadget/memento-edge-usb-gadget.service",
                "usb-gadget/90-memento-edge-usb-gadget.rules", "usb-gadget/10-usb-gadget.network",
                "usb-gadget/10-usb-gadget.link", "etc/systemd/zram-generator.conf",
                "etc/sysctl.d/90-memento-edge-zram.conf", "etc/issue.d/memento-edge.issue"):
        assert f'"$f/{rel}"' in build, rel
    assert re.search(r"^\s+systemd-zram-generator$", (REPO / "image/rootfs.sh").read_text(), re.M)


def _run_gadget(tmp_path: Path) -> str:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    log = tmp_path / "modprobe.log"
    (fake / "modprobe").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (fake / "modprobe").chmod(0o755)
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    proc = subprocess.run(["sh", str(GADGET_SH)], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{fake}:/usr/bin:/bin", "MEMENTO_MACHINE_ID_FILE": str(machine_id)})
    assert proc.returncode == 0, proc.stderr
    return log.read_text()


def test_gadget_loads_g_ether_with_stable_local_unicast_macs(tmp_path: Path) -> None:
    assert os.stat(GADGET_SH).st_mode & stat.S_IXUSR
    first = _run_gadget(tmp_path)
    assert first.startswith("g_ether ")
    args = dict(a.split("=", 1) for a in first.split()[1:] if "=" in a)
    macs = [args["dev_addr"], args["host_addr"]]
    for mac in macs:
        assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac), mac
        octet = int(mac[:2], 16)
        assert octet & 0x02 and not octet & 0x01  # locally administered, unicast
    assert macs[0] != macs[1]
    (tmp_path / "modprobe.log").unlink()
    assert _run_gadget(tmp_path) == first  # the same adapter on every boot: the laptop keeps its lease


def test_zram_swap_config() -> None:
    zram = unit(FILES / "etc/systemd/zram-generator.conf")
    assert zram.sections() == ["zram0"]
    assert zram["zram0"]["zram-size"] == "ram / 2"
    assert "vm.page-cluster = 0" in (FILES / "etc/sysctl.d/90-memento-edge-zram.conf").read_text()


def _defaults(board: str) -> Dict[str, str]:
    out = {}
    for line in BOARD_DEFAULTS[board].read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out[key] = value.strip('"')
    return out


@pytest.mark.parametrize("board", sorted(BOARD_DEFAULTS))
def test_consoles_end_with_the_screen_and_cma_is_a_real_size(board: str) -> None:
    d = _defaults(board)
    consoles = d["CONSOLES"].split()
    assert consoles[-1] == "tty0", "the last console= is /dev/console (boot status, rescue shell)"
    assert any(c.startswith("ttyS1,") for c in consoles)
    assert d["CMA"] == "32M"  # one 1920x1200 console framebuffer + DMA; not 0 (a blank screen), not 64M


def test_login_banner_shows_the_usb_address_and_the_token_place() -> None:
    issue = (FILES / "etc/issue.d/memento-edge.issue").read_text()
    assert r"\4{usb0}" in issue and r"\n.local:8077" in issue and "/etc/memento-edge/initial-token" in issue


def _dpkg_keeps(path: str) -> bool:
    """dpkg's path-exclude/path-include rule for one path: the last matching pattern decides (fnmatch, '*'
    crossing '/'), no match keeps the file."""
    keep = True
    for line in (FILES / "dpkg-excludes.cfg").read_text().splitlines():
        kind, _, pattern = line.partition("=")
        if kind in ("path-exclude", "path-include") and fnmatch.fnmatchcase(path, pattern):
            keep = kind == "path-include"
    return keep


@pytest.mark.parametrize("module", [
    "drivers/gpu/drm/vc4/vc4.ko", "drivers/gpu/drm/drm.ko", "drivers/gpu/drm/drm_kms_helper.ko",
    "drivers/gpu/drm/drm_dma_helper.ko", "drivers/gpu/drm/display/drm_display_helper.ko",
    "drivers/media/cec/core/cec.ko", "drivers/media/rc/rc-core.ko", "sound/core/snd-pcm.ko",
    "sound/soc/snd-soc-core.ko", "sound/soundcore.ko"])
def test_the_screen_console_driver_stays_on_the_card(module: str) -> None:
    assert _dpkg_keeps(f"/lib/modules/6.1.0-40-arm64/kernel/{module}")


@pytest.mark.parametrize("module", ["drivers/gpu/drm/nouveau/nouveau.ko", "sound/soc/codecs/snd-soc-wm8960.ko",
                                    "drivers/media/usb/uvc/uvcvideo.ko"])
def test_other_gpu_and_media_modules_stay_trimmed(module: str) -> None:
    assert not _dpkg_keeps(f"/lib/modules/6.1.0-40-arm64/kernel/{module}")
