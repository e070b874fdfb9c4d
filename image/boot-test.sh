#!/usr/bin/env bash
# Boot the appliance image under QEMU and check it end to end:
#
#   image/boot-test.sh [IMAGE.img] [--requests N] [--mix full|cached] [--provision] [--keep]
#
# 1. copies the image (sparse) and grows the copy by 1 GiB (exercises the first-boot growroot unit),
# 2. writes memento-edge.txt (hostname, SSH key, API token) into the FAT partition with mtools,
# 3. boots the image's own kernel and initrd, user-mode networking restricted to two hostfwd ports on
#    127.0.0.1 (the guest reaches nothing else). The board comes from the image's name (image/boards.sh):
#    zero2w: `qemu-system-aarch64 -M virt -cpu cortex-a53 -m 512 -smp 4`, kernel + initrd read from the
#            ext4 partition with debugfs, virtio disk and network, the board's cma=, and QEMU's usb-net as
#            usb0 on the USB cable's 10.55.0.0/29 (address, DHCP server, avahi and the service checked on it);
#            MEMENTO_BOOT_MACHINE=raspi3b (opt-in): `qemu-system-aarch64 -M raspi3b` with the Zero 2 W tree,
#            as zero-w below;
#    zero-w: `qemu-system-arm -M raspi0` (BCM2835, ARM1176, 512 MB) with the kernel, initrd and Zero W
#            device tree the Pi's firmware would load from the FAT partition, the card as an SD card
#            (its size rounded up to a power of two, which QEMU's SD model requires), the console on the
#            mini UART (ttyS1, QEMU's second serial port) and the network through a USB Ethernet device
#            on the dwc2 host port (QEMU has no Wi-Fi chip); see image/README.md for what differs from a board,
#
# 4. waits (bounded) for GET /healthz 200, stores a memory and recalls it with the token, reads /metrics,
# 5. over SSH (the key from step 2): the service's RSS idle, `systemd-analyze`, the secrets wiped from the
#    boot file, then N mixed requests (default 1000) and the RSS again,
# 6. with --provision: runs ansible/site.yml over the forwarded SSH port against the booted image (the
#    "provision an existing Pi" path) and requires changed=0,
# 7. writes bench/results/<date>-image-qemu.{json,md} (a reduced image: <date>-image-reduced-qemu.*; the
#    zero-w image: <date>-image-zero-w-qemu.*).
# --mix cached (zero-w's default): the same 30/60/10 mix, but the recall queries come from a pool of 20, so
# after their first use they hit the embedding cache; under emulation an ARM1176 embeds a new short text in
# seconds, which would make 1,000 requests take hours. Every remember still embeds a new text.
# Every QEMU run is bounded (MEMENTO_BOOT_TIMEOUT, default 2400 s total; zero-w 7200 s).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
img=""
requests=1000
mix=""
provision=0
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) requests="$2"; shift 2 ;;
    --mix) mix="$2"; shift 2 ;;
    --provision) provision=1; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) img="$1"; shift ;;
  esac
done
[ -n "$img" ] || img="$(ls -1t "$here"/out/memento-edge-*.img 2>/dev/null | head -1)"
[ -f "$img" ] || { echo "no image: run image/build.sh first" >&2; exit 1; }
case "$(basename "$img")" in *-armel.img|*-armel-reduced.img) board=zero-w ;; *) board=zero2w ;; esac
# shellcheck source=image/boards.sh
source "$here/boards.sh"
board_config "$board"
if [ "$board" = zero-w ]; then default_timeout=7200; else default_timeout=2400; fi
[ -n "$mix" ] || { if [ "$board" = zero-w ]; then mix=cached; else mix=full; fi; }
work="${MEMENTO_BOOT_WORK:-$here/out/boot-test}"
total_timeout="${MEMENTO_BOOT_TIMEOUT:-$default_timeout}"
http_port="${MEMENTO_BOOT_HTTP_PORT:-18077}"
usb_port="${MEMENTO_BOOT_USB_PORT:-18078}"
ssh_port="${MEMENTO_BOOT_SSH_PORT:-12222}"
py="${MEMENTO_HOST_PYTHON:-$repo/.venv/bin/python}"
export BT_RESULTS="${BT_RESULTS:-$repo/bench/results}"
log() { printf '[boot %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
rm -rf "$work"; mkdir -p "$work"
qemu_pid=""
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true; fi
  [ "$keep" = 1 ] || rm -f "$work/disk.img" "$work/root.ext4"
}
trap cleanup EXIT
t_start=$(date +%s)

# --- disk copy + first-boot file --------------------------------------------------------------------------
cp --sparse=always "$img" "$work/disk.img"
truncate -s +1G "$work/disk.img"
read -r p1_start p2_start p2_size < <(sfdisk -J "$work/disk.img" | "$py" -c '
import json, sys
p = json.load(sys.stdin)["partitiontable"]["partitions"]
print(p[0]["start"], p[1]["start"], p[1]["size"])')
ssh-keygen -q -t ed25519 -N '' -C boot-test -f "$work/id_ed25519"
token="$("$py" -c 'import secrets; print(secrets.token_urlsafe(32))')"
cat > "$work/memento-edge.txt" <<EOF
# written by image/boot-test.sh
hostname = memento-qemu
ssh_authorized_key = $(cat "$work/id_ed25519.pub")
api_token = $token
api_token_name = boot-test
timezone = UTC
EOF
MTOOLS_SKIP_CHECK=1 mcopy -o -i "$work/disk.img@@$((p1_start * 512))" "$work/memento-edge.txt" ::/memento-edge.txt

# --- kernel + initrd from the image's own root filesystem (no mounts) -----------------------------------------
dd if="$work/disk.img" of="$work/root.ext4" bs=512 skip="$p2_start" count="$p2_size" conv=sparse status=none
kver="$(debugfs -R 'ls -p /boot' "$work/root.ext4" 2>/dev/null | awk -F/ '{print $6}' | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)"
[ -n "$kver" ] || { echo "no kernel in the image" >&2; exit 1; }
debugfs -R "dump /boot/vmlinuz-$kver $work/vmlinuz" "$work/root.ext4" 2>/dev/null
debugfs -R "dump /boot/initrd.img-$kver $work/initrd.img" "$work/root.ext4" 2>/dev/null
# The USB cable's stand-in is QEMU's usb-net, which reports a MAC beginning 40: (universally administered), so
# Linux names it eth<N> where the board's g_ether names the gadget usb0 itself (measured: "cdc_ether ... eth1").
# A test-only .link file in this copy of the card gives the stand-in the gadget's name; the image is unchanged.
printf '# written by image/boot-test.sh (test copy only)\n[Match]\nDriver=cdc_ether\n\n[Link]\nName=usb0\n' \
  > "$work/05-boot-test-usb0.link"
debugfs -w -R "write $work/05-boot-test-usb0.link /etc/systemd/network/05-boot-test-usb0.link" "$work/root.ext4" \
  >/dev/null 2>&1
debugfs -R "stat /etc/systemd/network/05-boot-test-usb0.link" "$work/root.ext4" 2>/dev/null | grep -q Inode \
  || { echo "could not write the test's usb0 .link file" >&2; exit 1; }
dd if="$work/root.ext4" of="$work/disk.img" bs=512 seek="$p2_start" conv=notrunc,sparse status=none
rm -f "$work/root.ext4"
log "kernel $kver; image $(basename "$img"); board $board"

# --- boot ------------------------------------------------------------------------------------------------------
netdev="user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$http_port-:8077,hostfwd=tcp:127.0.0.1:$ssh_port-:22"
# The USB cable's network (image/files/etc/systemd/network/10-usb-gadget.network): QEMU plays the laptop,
# 10.55.0.2, and the device must answer on its static 10.55.0.1 (slirp's guest address is given per forward).
usbnet="restrict=on,ipv6=off,net=10.55.0.0/29,host=10.55.0.2,dns=10.55.0.3,dhcpstart=10.55.0.4"
t_boot=$(date +%s)
machine="${MEMENTO_BOOT_MACHINE:-}"   # zero2w: virt (default, CI) or raspi3b (opt-in, closer to the board)
[ "$board" = zero-w ] && machine=raspi0
case "$machine" in ""|virt) machine="" ;; raspi0|raspi3b) ;; *) echo "unknown MEMENTO_BOOT_MACHINE: $machine" >&2; exit 2 ;; esac
if [ -n "$machine" ]; then
  # The only NIC is QEMU's usb-net on the dwc2 port, which the guest names usb0: the USB cable's network.
  netdev="user,id=n0,$usbnet,hostfwd=tcp:127.0.0.1:$http_port-10.55.0.1:8077,hostfwd=tcp:127.0.0.1:$ssh_port-10.55.0.1:22"
  export BT_USB_URL="http://127.0.0.1:$http_port"
  # shellcheck source=image/boot-test-raspi0.sh
  source "$here/boot-test-raspi0.sh"
  raspi_prepare              # -> $work/raspi.dtb, $work/cmdline.txt, the card padded to a power of two
  "${machine}_start"         # -> $qemu_desc, $qemu_pid
else
  # The board's cma= (raspi-firmware's CMA=, which the Pi's cmdline.txt carries); MEMENTO_BOOT_CMA= (empty)
  # boots with the kernel's default instead, to measure what the setting gains.
  cma="${MEMENTO_BOOT_CMA-$(sed -n 's/^CMA=//p' "$(board_file "$board" "$here" etc/default/raspi-firmware)")}"
  qemu_desc="qemu-system-aarch64 -M virt -cpu cortex-a53 -smp 4 -m 512${cma:+ cma=$cma}"
  # A second NIC stands in for the USB gadget: QEMU's usb-net (CDC ECM) on an xHCI port, which Linux names
  # usb0 (a locally administered MAC; net.ifnames=0 keeps the kernel's name, as on the board, where
  # 10-usb-gadget.link pins it). Its slirp network is the cable's 10.55.0.0/29 with QEMU as the laptop,
  # 10.55.0.2, and forwards $usb_port to the device's 10.55.0.1:8077, so the service must answer there.
  usbnet="user,id=n1,$usbnet,hostfwd=tcp:127.0.0.1:$usb_port-10.55.0.1:8077"
  timeout "$total_timeout" qemu-system-aarch64 -M virt -cpu cortex-a53 -smp 4 -m 512 \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
    -append "root=LABEL=RASPIROOT rw rootwait console=ttyAMA0,115200 systemd.show_status=1 net.ifnames=0${cma:+ cma=$cma}" \
    -drive "file=$work/disk.img,format=raw,if=none,id=d0,cache=unsafe" -device virtio-blk-pci,drive=d0 \
    -netdev "$netdev" -device virtio-net-pci,netdev=n0 -device virtio-rng-pci \
    -netdev "$usbnet" -device qemu-xhci -device usb-net,netdev=n1,mac=52:54:00:55:00:01 \
    -display none -serial "file:$work/serial.log" -monitor none -no-reboot &
  qemu_pid=$!
  export BT_USB_URL="http://127.0.0.1:$usb_port"
fi
deadline=$((t_start + total_timeout - 60))

wait_for() {  # wait_for WHAT COMMAND...: poll until COMMAND succeeds or the deadline passes
  local what="$1"; shift
  until "$@" >/dev/null 2>&1; do
    kill -0 "$qemu_pid" 2>/dev/null || { log "QEMU exited while waiting for $what"; tail -50 "$work/serial.log" >&2; exit 1; }
    [ "$(date +%s)" -lt "$deadline" ] || { log "timed out waiting for $what"; tail -80 "$work/serial.log" >&2; exit 1; }
    sleep 5
  done
}
health() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$http_port/healthz")" = 200 ]; }
wait_for "/healthz" health
t_health=$(( $(date +%s) - t_boot ))
log "/healthz 200 after ${t_health} s (from QEMU start, incl. first-boot work)"

sshg() {
  ssh -q -i "$work/id_ed25519" -p "$ssh_port" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o ConnectTimeout=20 -o BatchMode=yes admin@127.0.0.1 "$@"
}
wait_for "ssh" sshg true

# --- API checks + load + in-guest measurements (python on the host, bounded) --------------------------------
export BT_URL="http://127.0.0.1:$http_port" BT_TOKEN="$token" BT_REQUESTS="$requests" BT_WORK="$work" BT_MIX="$mix"
export BT_SSH="ssh -q -i $work/id_ed25519 -p $ssh_port -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=20 -o BatchMode=yes admin@127.0.0.1"
timeout "$total_timeout" "$py" "$here/boot_test_client.py" > "$work/client.json"
cat "$work/client.json" >&2

# --- clean shutdown, results --------------------------------------------------------------------------------
export BT_IMAGE="$img" BT_HEALTH_S="$t_health" BT_PROVISION=null BT_KERNEL="$kver" BT_QEMU="$qemu_desc"
export BT_BOARD_NAME="$BOARD_NAME" BT_QEMU_BIN="${qemu_desc%% *}" BT_DTB_PATCH="${dtb_patch:-}"
# Results are named after the board and profile so CI's runs never overwrite each other's.
case "$(basename "$img")" in
  *-armel-reduced.img) stem="image-zero-w-reduced-qemu" ;;
  *-armel.img) stem="image-zero-w-qemu" ;;
  *-reduced.img) stem="image-reduced-qemu" ;;
  *) stem="image-qemu" ;;
esac
[ "$machine" = raspi3b ] && stem="image-raspi3b-qemu"
export BT_STEM="$stem"
"$py" - <<'EOF'
import datetime, json, os, platform, subprocess
from pathlib import Path
work = Path(os.environ["BT_WORK"])
client = json.loads((work / "client.json").read_text())
img = Path(os.environ["BT_IMAGE"])
xz = img.with_name(img.name + ".xz")
build_times = img.parent / f"{img.stem}.build-times.json"
build = json.loads(build_times.read_text()) if build_times.exists() else None
if build is not None and build.get("image") != img.name:
    build = None   # the last build in that directory made another image
doc = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "image": img.name, "raw_bytes": img.stat().st_size, "xz_bytes": xz.stat().st_size if xz.exists() else None,
    "board": os.environ["BT_BOARD_NAME"],
    "qemu": os.environ["BT_QEMU"] + " (TCG on " + platform.machine() + ")",
    "qemu_version": subprocess.run([os.environ["BT_QEMU_BIN"], "--version"], capture_output=True, text=True).stdout.splitlines()[0],
    "dtb_patch": os.environ["BT_DTB_PATCH"] or None,
    "kernel": os.environ["BT_KERNEL"],
    "healthz_after_s": int(os.environ["BT_HEALTH_S"]),
    "provision_over_ssh": json.loads(os.environ["BT_PROVISION"]),
    "build": build,
    **client,
}
day = datetime.date.today().isoformat()
out = Path(os.environ.get("BT_RESULTS", "bench/results"))
out.mkdir(parents=True, exist_ok=True)
(out / f"{day}-{os.environ['BT_STEM']}.json").write_text(json.dumps(doc, indent=2) + "\n")
mb = lambda kb: f"{kb / 1024:.1f} MB" if kb else "n/a"
lines = [
    f"# Appliance image under QEMU ({day})", "",
    f"Emulated, not a real {doc['board']}: `{doc['qemu']}` on a shared 2-core x86 host is much slower than "
    "the board's cores, so times are upper bounds; memory figures carry over.", "",
    "| what | value |", "| --- | --- |",
    f"| image | `{doc['image']}` |",
    f"| raw size | {doc['raw_bytes'] / 2**20:.0f} MiB |",
    f"| .xz size | {doc['xz_bytes'] / 2**20:.0f} MiB |" if doc["xz_bytes"] else "| .xz size | not built |",
    f"| build time | {doc['build']['total_s']} s |" if doc["build"] else "| build time | n/a |",
    f"| QEMU start to /healthz 200 (first boot) | {doc['healthz_after_s']} s |",
    f"| systemd-analyze | {client['systemd_analyze']} |",
    f"| service RSS idle (after first remember/recall) | {mb(client['rss_kb_idle'])} |",
    f"| service RSS after {client['requests']} mixed requests | {mb(client['rss_kb_after'])} |",
    f"| service cgroup memory.peak | {mb(client.get('cgroup_peak_kb'))} |",
    f"| guest MemAvailable after load | {mb(client.get('mem_available_kb'))} |",
    f"| requests: errors | {client['errors']} |",
    f"| request latency p50 / p95 (emulated) | {client['latency_ms_p50']} / {client['latency_ms_p95']} ms |",
    f"| request mix | {client['mix']} |",
    f"| kernel cma= / CmaTotal | {client['memory']['cmdline_cma']} / {mb(client['memory']['meminfo_kb'].get('CmaTotal'))} |",
    f"| MemTotal / MemAvailable (idle, before load) | {mb(client['memory']['meminfo_kb']['MemTotal'])} / {mb(client['memory']['meminfo_kb']['MemAvailable'])} |",
    f"| swap | {client['memory']['swaps'] or 'none'} |",
    f"| clock (no NTP in the guest) | trusted {client['clock']['trusted']}, source {client['clock']['source']}, "
    f"first memory clock_trusted {client['clock']['first_memory_clock_trusted']} |",
]
if client.get("usb"):
    u = client["usb"]
    lines += ["", "USB cable path (QEMU usb-net named usb0 standing in for the gadget): "
              f"usb0 {u['usb0_addr']}, DHCP server socket {u['dhcp_server_socket']}, avahi: \"{u['avahi_usb0']}\", "
              f"GET /healthz via 10.55.0.1: {u['healthz_over_usb0']}"]
lines += ["", "First-boot summary (journal of memento-edge-firstboot; the consoles got the same lines):", "",
          "```", client["firstboot_summary"], "```"]
# The login banner as the serial console showed it last (agetty fills in the addresses).
serial = (work / "serial.log").read_text(errors="replace") if (work / "serial.log").exists() else ""
banner = [ln.strip() for ln in serial.splitlines() if "USB cable" in ln]
if banner:
    lines += ["", f"Login banner on the serial console: `{banner[-1]}`"]
if doc["dtb_patch"]:
    lines += ["", f"Device tree patched for QEMU at test time: {doc['dtb_patch']}"]
if doc["build"]:
    lines += ["", "Build stages (s): " + ", ".join(f"{k} {v}" for k, v in doc["build"]["stages_s"].items())]
if doc["provision_over_ssh"]:
    p = doc["provision_over_ssh"]
    lines += ["", f"Provision over SSH (ansible/site.yml against the booted image): {p['seconds']} s, changed={p['changed']}"]
(out / f"{day}-{os.environ['BT_STEM']}.md").write_text("\n".join(lines) + "\n")
print(out / f"{day}-{os.environ['BT_STEM']}.md")
EOF
# --- provision the booted image with Ansible over SSH (changed=0 expected) ---------------------------------
if [ "$provision" = 1 ]; then
  cat > "$work/inventory.yml" <<EOF
memento_edge:
  hosts:
    memento-qemu:
      ansible_host: 127.0.0.1
      ansible_port: $ssh_port
      ansible_user: admin
      ansible_ssh_private_key_file: $work/id_ed25519
      ansible_ssh_common_args: "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
EOF
  t_prov=$(date +%s)
  # The guest has no route out (restrict=on), so apt is told not to refresh its lists.
  ANSIBLE_CONFIG="$repo/ansible/ansible.cfg" timeout 1800 "$repo/.cache/ansible-venv/bin/ansible-playbook" \
    -i "$work/inventory.yml" "$repo/ansible/site.yml" -e memento_edge_apt_update=false \
    -e "memento_edge_wheel_src=$(ls -1 "$here"/out/work/dist/memento_edge-*.whl | tail -1)" \
    | tee "$work/provision.log"
  recap="$(grep -E 'ok=[0-9]+' "$work/provision.log" | tail -1)"
  changed="$(sed -n 's/.*changed=\([0-9]*\).*/\1/p' <<<"$recap")"
  failed="$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$recap")"
  printf '\nProvision over SSH (ansible/site.yml against the booted image, same wheel and model): %s s, changed=%s, failed=%s\n' \
    "$(( $(date +%s) - t_prov ))" "$changed" "$failed" >> "${BT_RESULTS:-bench/results}/$(date +%F)-$stem.md"
  [ "$failed" = 0 ] && [ "$changed" = 0 ] || { log "provision over SSH: $recap"; exit 1; }
fi

sshg sudo systemctl poweroff || true
for _ in $(seq 60); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 2; done
log "boot test passed in $(( $(date +%s) - t_start )) s"
