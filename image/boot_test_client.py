"""Client half of image/boot-test.sh: API checks, a bounded mixed load, in-guest measurements over SSH.

Reads BT_URL, BT_TOKEN, BT_REQUESTS, BT_MIX, BT_SSH (the ssh command line, key included) from the environment
and prints one JSON object. Talks only to the forwarded port on 127.0.0.1.

BT_MIX=full (default): every recall query is new. BT_MIX=cached: recall queries come from a fixed pool of 20,
so each embeds once and then hits the embedding cache (an emulated ARM1176 takes seconds per new embedding;
1,000 new ones would take hours). Remember texts are new in both mixes.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

URL = os.environ["BT_URL"]
TOKEN = os.environ["BT_TOKEN"]
REQUESTS = int(os.environ.get("BT_REQUESTS", "1000"))
MIX = os.environ.get("BT_MIX", "full")
QUERY_POOL = 20
SSH = shlex.split(os.environ["BT_SSH"])
WORDS = ("river mountain coffee invoice printer garden battery meeting passport bicycle kernel sensor "
         "recipe holiday password backup network camera violin tomato harbour winter ledger").split()


def call(method: str, path: str, body: Optional[Dict[str, Any]] = None, auth: bool = True,
         timeout: float = 120.0) -> Tuple[int, Any]:
    """One HTTP request; returns (status, parsed JSON or text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read().decode(errors="replace"), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def guest(cmd: str) -> str:
    """Run a shell command in the guest as admin (sudo where needed)."""
    res = subprocess.run(SSH + [cmd], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"guest command failed: {cmd}: {res.stderr}")
    return res.stdout.strip()


def service_rss_kb() -> int:
    """VmRSS of the service's main process, read inside the guest."""
    pid = guest("systemctl show -p MainPID --value memento-edge.service")
    return int(guest(f"sudo awk '/^VmRSS:/ {{print $2}}' /proc/{pid}/status"))


def cgroup_kb(name: str) -> Optional[int]:
    """A memory.* file of the service's cgroup in KiB (None when absent)."""
    try:
        return int(guest(f"cat /sys/fs/cgroup/system.slice/memento-edge.service/{name}")) // 1024
    except (RuntimeError, ValueError):
        return None


def usb_checks() -> Dict[str, Any]:
    """The USB cable path (BT_USB_URL: a port forwarded to 10.55.0.1:8077 through the usb0 stand-in NIC): usb0's
    address, networkd's DHCP server bound to it, avahi answering mDNS on it, the service answering over it,
    and no parse warnings about 10-usb-gadget.{network,link} from networkd or udev."""
    out: Dict[str, Any] = {"usb0_addr": guest("ip -4 -o addr show dev usb0 | awk '{print $4}'")}
    assert out["usb0_addr"] == "10.55.0.1/29", f"usb0: {out['usb0_addr']!r}"
    # (only usb0's .network enables DHCPServer=, so networkd on port 67 is that server)
    out["dhcp_server_socket"] = guest("sudo ss -Hulpn 'sport = :67' | awk '{print $4, $6}'")
    assert ":67" in out["dhcp_server_socket"] and "systemd-network" in out["dhcp_server_socket"], \
        f"no DHCP server from networkd: {out['dhcp_server_socket']!r}"
    out["networkd_warnings"] = guest("sudo journalctl -b -u systemd-networkd -u systemd-udevd -o cat "
                                     "| grep -E '10-usb-gadget[.](network|link):[0-9]' || true")
    assert not out["networkd_warnings"], out["networkd_warnings"]
    # (bounded wait: avahi joins the group when it sees the address, which may trail SSH being up)
    out["avahi_usb0"] = guest("for i in $(seq 30); do sudo journalctl -b -u avahi-daemon -o cat "
                              "| grep -m1 'usb0.IPv4 with address 10.55.0.1' && break; sleep 2; done; true")
    assert out["avahi_usb0"], "avahi does not answer mDNS on usb0"
    with urllib.request.urlopen(os.environ["BT_USB_URL"] + "/healthz", timeout=60) as resp:
        out["healthz_over_usb0"] = resp.status
    return out


def memory_facts() -> Dict[str, Any]:
    """The kernel command line's memory settings and what they leave: CMA, zram swap, MemTotal/MemAvailable."""
    meminfo = dict(line.split(":", 1) for line in guest("cat /proc/meminfo").splitlines())
    kb = {k: int(meminfo[k].split()[0]) for k in ("MemTotal", "MemAvailable", "CmaTotal", "SwapTotal")
          if k in meminfo}
    cmdline = guest("cat /proc/cmdline").split()
    return {"cmdline_cma": next((a for a in cmdline if a.startswith("cma=")), "kernel default"),
            "meminfo_kb": kb, "swaps": guest("tail -n +2 /proc/swaps"),
            "zram": guest("sudo zramctl --output NAME,ALGORITHM,DISKSIZE,DATA,COMPR --noheadings || true")}


def main() -> int:
    """Check the API, measure, load, measure again; print JSON."""
    out: Dict[str, Any] = {}
    status, _ = call("GET", "/healthz", auth=False)
    assert status == 200, f"/healthz {status}"
    status, body = call("POST", "/v1/memories", {"text": "the spare key is under the blue flower pot"}, auth=False)
    assert status == 401, f"unauthenticated write must be refused, got {status}"
    status, body = call("POST", "/v1/memories", {"text": "the spare key is under the blue flower pot"})
    assert status == 201 and "id" in body, f"remember: {status} {body}"
    first_id = body["id"]
    status, body = call("POST", "/v1/recall", {"query": "where is the house key?", "topk": 3})
    assert status == 200 and body["hits"] and body["hits"][0]["id"] == first_id, f"recall: {status} {body}"
    status, metrics = call("GET", "/metrics")
    assert status == 200 and len(str(metrics)) > 0, f"/metrics {status}"
    out["api_checks"] = "healthz 200, 401 without token, remember 201, recall top hit, /metrics 200"
    # The clock guard (README "Time on a board without a clock"): what the service judged, what systemd
    # says, and whether the first memory was stamped with a trusted time.
    status, stats = call("GET", "/v1/stats")
    assert status == 200 and "clock" in stats, f"/v1/stats {status} {stats}"
    out["clock"] = stats["clock"]
    status, first = call("GET", f"/v1/memories/{first_id}")
    out["clock"]["first_memory_clock_trusted"] = first.get("clock_trusted") if status == 200 else None
    out["clock"]["timedatectl_ntp_synchronized"] = guest(
        "timedatectl show -p NTPSynchronized --value 2>/dev/null || echo unknown").strip()
    out["systemd_analyze"] = guest("systemd-analyze time | head -1 | sed 's/^Startup finished in //'")
    out["boot_file_after"] = guest("sudo cat /boot/firmware/memento-edge.txt")
    assert TOKEN not in out["boot_file_after"], "API token not wiped from the boot partition"
    out["root_fs_size"] = guest("df -h --output=size / | tail -1").strip()
    out["rss_kb_idle"] = service_rss_kb()
    out["unit_hardening"] = guest("systemd-analyze security memento-edge.service 2>/dev/null | tail -1")
    if os.environ.get("BT_USB_URL"):
        out["usb"] = usb_checks()
    out["memory"] = memory_facts()
    assert "zram0" in out["memory"]["swaps"], f"no zram swap: {out['memory']['swaps']!r}"
    out["firstboot_summary"] = guest("sudo journalctl -b -u memento-edge-firstboot -o cat | grep -v 'new API token'")

    rng = random.Random(42)
    pool = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(QUERY_POOL)]
    latencies: List[float] = []
    errors = 0
    t0 = time.monotonic()
    for i in range(REQUESTS):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        kind = i % 10
        t = time.monotonic()
        if kind < 3:
            status, body = call("POST", "/v1/memories", {"text": f"note {i}: {words}"})
            ok = status == 201
        elif kind < 9:
            query = pool[i % QUERY_POOL] if MIX == "cached" else words
            status, body = call("POST", "/v1/recall", {"query": query, "topk": 5})
            ok = status == 200
        else:
            status, body = call("GET", "/metrics")
            ok = status == 200
        latencies.append((time.monotonic() - t) * 1000)
        errors += 0 if ok else 1
    out["requests"] = REQUESTS
    out["mix"] = ("30% remember, 60% recall (topk 5), 10% /metrics; sequential"
                  + (f"; recall queries from a pool of {QUERY_POOL}" if MIX == "cached" else ""))
    out["load_seconds"] = round(time.monotonic() - t0, 1)
    out["errors"] = errors
    lat = sorted(latencies)
    out["latency_ms_p50"] = round(lat[len(lat) // 2], 1) if lat else None
    out["latency_ms_p95"] = round(lat[int(len(lat) * 0.95)], 1) if lat else None
    out["rss_kb_after"] = service_rss_kb()
    out["cgroup_current_kb"] = cgroup_kb("memory.current")
    out["cgroup_peak_kb"] = cgroup_kb("memory.peak")
    out["mem_available_kb"] = int(guest("awk '/^MemAvailable:/ {print $2}' /proc/meminfo"))
    out["mem_total_kb"] = int(guest("awk '/^MemTotal:/ {print $2}' /proc/meminfo"))
    out["guest_ps_top"] = guest("ps -eo rss,comm --sort=-rss | head -8")
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
