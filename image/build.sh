#!/usr/bin/env bash
# Build the flashable image for one board (image/boards.sh):
#     image/out/memento-edge-<version>-pizero2w-arm64.img.xz  (+ .sha256)   --board zero2w (default)
#     image/out/memento-edge-<version>-pizerow-armel.img.xz   (+ .sha256)   --board zero-w (Pi Zero / Zero W)
#
#   image/build.sh [--board zero2w|zero-w] [--profile full|reduced] [--no-xz] [--reuse-rootfs]
#
# Both boards: the same recipe, role, first-boot files and service; they differ in the Debian architecture
# and kernel (arm64 + linux-image-arm64; armel + linux-image-rpi, Debian raspi image-specs "family 1"), in
# where the role takes the Python dependencies from (PyPI wheels; Debian's packages on armv6l, see the role's
# memento_edge_python_source) and in a few boot files (image/boards/<board>/ over image/files/).
#
# Recipe: Debian bookworm with its one initramfs (image/rootfs.sh: mmdebstrap under qemu-user, a
# cached tarball) -> the Ansible role through the community.general.chroot connection -> appliance files
# (first boot, SSH, network) -> no device identity -> FAT + ext4 filesystems made from directories
# (mkfs.vfat -C + mcopy, mkfs.ext4 -d) -> MBR with sfdisk -> partitions copied in with
# dd conv=notrunc,sparse. No loop devices, no mounts of the image.
#
# --profile reduced: the same recipe and files minus the Pi-only packages (raspi-firmware,
# firmware-brcm80211, wireless-regdb; see image/rootfs.sh) and without xz. It boots under QEMU but not on
# a Pi, so it is named image/out/memento-edge-<version>-<arch>-reduced.img (quick iterations; CI's fallback).
# Stage times go to image/out/<image name>.build-times.json.
#
# Needs root, qemu-user-static (binfmt), mmdebstrap, dosfstools, mtools, fdisk, e2fsprogs, xz; the wheel
# (dist/) and the model dir (models/minilm-int8) are built first if missing. Honours SOURCE_DATE_EPOCH
# (default: the last git commit's time). Expensive stages are cached in image/cache/.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="${MEMENTO_IMAGE_OUT:-$here/out}"
cache="${MEMENTO_IMAGE_CACHE:-$here/cache}"
ansible_venv="${MEMENTO_ANSIBLE_VENV:-$repo/.cache/ansible-venv}"
profile=full
board="${MEMENTO_IMAGE_BOARD:-zero2w}"
do_xz=1
keep_rootfs=1
# --reuse-rootfs: start from image/out/work/rootfs left by the previous build (the role re-converges it,
# e.g. with a new wheel) instead of a fresh copy of the cached base tarball. For development only.
reuse_rootfs=0
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --board) board="$2"; shift 2 ;;
    --no-xz) do_xz=0; shift ;;
    --reuse-rootfs) reuse_rootfs=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$profile" in
  full) ;;
  reduced) do_xz=0 ;;
  *) echo "unknown profile: $profile (full|reduced)" >&2; exit 2 ;;
esac
# shellcheck source=image/boards.sh
source "$here/boards.sh"
board_config "$board" || exit 2
[ "$(id -u)" = 0 ] || { echo "build.sh must run as root (chroot, mknod in mmdebstrap)" >&2; exit 1; }

log() { printf '[image %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
declare -A stage_s=()
stage_order=()
stage() {  # stage NAME COMMAND...: run and time one stage
  local stage_name="$1"; shift
  local t0; t0=$(date +%s)
  log "stage $stage_name ..."
  "$@"
  stage_s[$stage_name]=$(( $(date +%s) - t0 ))
  stage_order+=("$stage_name")
  log "stage $stage_name done in ${stage_s[$stage_name]} s"
}

export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}"
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/pyproject.toml" | head -1)"
if [ "$profile" = full ]; then name="memento-edge-$version-$BOARD_SLUG-$BOARD_ARCH"; else name="memento-edge-$version-$BOARD_ARCH-reduced"; fi
work="$out/work"
rootfs="$work/rootfs"
mkdir -p "$out" "$cache" "$work"

cleanup_mounts() {
  for m in "$rootfs/dev/pts" "$rootfs/dev" "$rootfs/proc"; do
    mountpoint -q "$m" 2>/dev/null && umount -l "$m" || true
  done
}
trap cleanup_mounts EXIT

in_root() { chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

# --- stage: inputs ----------------------------------------------------------------------------------------
inputs() {
  # Always a fresh wheel of the working tree (a stale dist/ wheel would ship old code).
  rm -rf "$work/dist"
  "$repo/.venv/bin/python" -m pip wheel --no-deps -q -w "$work/dist" "$repo"
  wheel="$(ls -1 "$work"/dist/memento_edge-"$version"-py3-none-any.whl | tail -1)"
  model="${MEMENTO_MODEL_SRC:-$repo/models/minilm-int8}"
  [ -f "$model/manifest.json" ] || { log "model dir $model missing: run scripts/build-model"; exit 1; }
  [ -x "$ansible_venv/bin/ansible-playbook" ] || {
    /usr/bin/python3 -m venv "$ansible_venv"
    "$ansible_venv/bin/pip" install -q -r "$repo/ansible/requirements.txt"
  }
  log "wheel $wheel; model $model (fingerprint $(sed -n 's/.*"fingerprint": *"\([0-9a-f]*\)".*/\1/p' "$model/manifest.json"))"
}

# --- stage: rootfs (cached tarball) -> work dir -----------------------------------------------------------
rootfs_stage() {
  cleanup_mounts
  if [ "$reuse_rootfs" = 1 ] && [ -x "$rootfs/usr/bin/python3" ]; then
    log "reusing $rootfs"
    return
  fi
  rm -rf "$rootfs"
  mkdir -p "$rootfs"
  "$here/rootfs.sh" "$profile" "$work/rootfs.tar" "$board"
  tar -C "$rootfs" --numeric-owner -xpf "$work/rootfs.tar"
  rm -f "$work/rootfs.tar"
}

# --- stage: the Ansible role through the chroot connection ------------------------------------------------
converge() {
  mount -t proc proc "$rootfs/proc"          # pip and python need /proc; /sys stays unmounted on purpose
  mount --bind /dev "$rootfs/dev"
  # pip inside the chroot must trust what the host trusts (a TLS-inspecting proxy's CA, if any).
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/host-ca-bundle.crt"
  cp --remove-destination /etc/resolv.conf "$rootfs/etc/resolv.conf"
  cat > "$work/inventory.yml" <<EOF
memento_edge:
  hosts:
    $rootfs:
      ansible_connection: community.general.chroot
      ansible_python_interpreter: /usr/bin/python3
EOF
  # QEMU_CPU: every guest binary runs as the board's CPU (zero-w: uname -m says armv6l, as on the board,
  # and the role takes its Python dependencies from Debian).
  QEMU_CPU="$BOARD_QEMU_CPU" ANSIBLE_CONFIG="$repo/ansible/ansible.cfg" timeout 3600 "$ansible_venv/bin/ansible-playbook" \
    -i "$work/inventory.yml" "$repo/ansible/site.yml" \
    -e "memento_edge_wheel_src=$wheel" -e "memento_edge_model_src=$model" \
    -e memento_edge_generate_token=false \
    -e memento_edge_pip_cert=/etc/ssl/certs/host-ca-bundle.crt \
    | tee "$work/converge.log"
}

# --- stage: appliance files (first boot, SSH, network, admin user) ----------------------------------------
appliance() {
  local f="$here/files"
  install -d -m 0755 "$rootfs/usr/local/lib/memento-edge"
  install -m 0644 "$f/firstboot/memento-edge-firstboot.py" "$rootfs/usr/local/lib/memento-edge/"
  install -m 0755 "$f/firstboot/memento-edge-growroot.sh" "$rootfs/usr/local/lib/memento-edge/"
  install -m 0644 "$f/firstboot/memento-edge-firstboot.service" "$f/firstboot/memento-edge-growroot.service" \
    "$rootfs/etc/systemd/system/"
  install -m 0644 "$f/etc/ssh/sshd_config.d/memento-edge.conf" "$rootfs/etc/ssh/sshd_config.d/"
  install -D -m 0644 "$f/etc/systemd/system/ssh.service.d/hostkeys.conf" "$rootfs/etc/systemd/system/ssh.service.d/hostkeys.conf"
  install -m 0644 "$f"/etc/systemd/network/*.network "$rootfs/etc/systemd/network/"
  # USB gadget Ethernet (started by udev when the OTG port's device controller appears), zram swap, the
  # console's login banner with the addresses.
  install -m 0644 "$f/usb-gadget/10-usb-gadget.network" "$f/usb-gadget/10-usb-gadget.link" "$rootfs/etc/systemd/network/"
  install -m 0755 "$f/usb-gadget/memento-edge-usb-gadget.sh" "$rootfs/usr/local/lib/memento-edge/"
  install -m 0644 "$f/usb-gadget/memento-edge-usb-gadget.service" "$rootfs/etc/systemd/system/"
  install -D -m 0644 "$f/usb-gadget/90-memento-edge-usb-gadget.rules" "$rootfs/etc/udev/rules.d/90-memento-edge-usb-gadget.rules"
  install -m 0644 "$f/etc/systemd/zram-generator.conf" "$rootfs/etc/systemd/zram-generator.conf"
  install -D -m 0644 "$f/etc/sysctl.d/90-memento-edge-zram.conf" "$rootfs/etc/sysctl.d/90-memento-edge-zram.conf"
  install -D -m 0644 "$f/etc/issue.d/memento-edge.issue" "$rootfs/etc/issue.d/memento-edge.issue"
  install -m 0440 "$f/etc/sudoers.d/admin" "$rootfs/etc/sudoers.d/admin"
  install -m 0644 "$f/dpkg-excludes.cfg" "$rootfs/etc/dpkg/dpkg.cfg.d/memento-edge-excludes"
  echo memento-edge > "$rootfs/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tmemento-edge\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$rootfs/etc/hosts"
  # admin: SSH key only (from memento-edge.txt), no password; root locked.
  in_root id admin >/dev/null 2>&1 || in_root useradd --create-home --shell /bin/bash --groups sudo admin
  in_root usermod --password '!' admin
  in_root usermod --password '!' root
  in_root systemctl enable memento-edge-firstboot.service memento-edge-growroot.service \
    systemd-networkd.service systemd-resolved.service systemd-timesyncd.service ssh.service >/dev/null
  # Nothing holds boot up waiting for a network that may not be configured yet.
  in_root systemctl mask systemd-networkd-wait-online.service >/dev/null
  # The Wi-Fi chip's state at every boot (a BCM43436 without its firmware says so on every channel).
  install -m 0644 "$f/firstboot/memento-edge-wifi.service" "$rootfs/etc/systemd/system/"
  in_root systemctl enable memento-edge-wifi.service >/dev/null
  ln -sf /run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"
  rm -f "$rootfs/etc/ssl/certs/host-ca-bundle.crt"
}

# --- stage: check /boot (rootfs.sh built the initramfs and ran raspi-firmware's hook into the tarball) --------
boot_check() {
  ls -la "$rootfs/boot" "$rootfs/boot/firmware" >&2
  if in_root dpkg-divert --list /usr/sbin/update-initramfs | grep -q local; then
    log "update-initramfs is still diverted: the rootfs tarball predates image/rootfs.sh recipe 2"; exit 1
  fi
  compgen -G "$rootfs/boot/vmlinuz-*" >/dev/null && compgen -G "$rootfs/boot/initrd.img-*" >/dev/null \
    || { log "no kernel or initramfs in /boot"; exit 1; }
  if [ "$profile" = full ]; then
    [ -f "$rootfs/boot/firmware/config.txt" ] || { log "raspi-firmware hook wrote no config.txt"; exit 1; }
    grep -q 'root=LABEL=RASPIROOT' "$rootfs/boot/firmware/cmdline.txt" \
      || { log "cmdline.txt lacks root=LABEL=RASPIROOT"; exit 1; }
    compgen -G "$rootfs/boot/firmware/initrd.img-*" >/dev/null || { log "no initramfs on the boot partition"; exit 1; }
    boot_files_check
  fi
}

# What the Pi's boot ROM and firmware read from the FAT partition, and the Wi-Fi chip's firmware: a missing
# one is a card that never boots or a board without Wi-Fi, which no QEMU boot test would notice.
boot_files_check() {
  local fw="$rootfs/boot/firmware" g
  # gpu_mem=16 (raspi-firmware-custom) makes the firmware load the cut-down start_cd.elf + fixup_cd.dat.
  for g in bootcode.bin 'start*.elf' 'fixup*.dat' start_cd.elf fixup_cd.dat "$BOARD_DTB" config.txt cmdline.txt; do
    compgen -G "$fw/$g" >/dev/null || { log "boot partition lacks $g"; exit 1; }
  done
  # The BCM43430 (Zero W, most Zero 2 W): firmware and the board's NVRAM file (brcmfmac falls back from the
  # board-specific name to the plain one). The BCM43436 variant's files are not in Debian (image/README.md).
  for g in brcmfmac43430-sdio.bin 'brcmfmac43430-sdio*.txt'; do
    compgen -G "$rootfs/lib/firmware/brcm/$g" >/dev/null || { log "no /lib/firmware/brcm/$g"; exit 1; }
  done
  # tty0 last (it becomes /dev/console) and a real CMA size: see image/files/etc/default/raspi-firmware.
  grep -Eq 'console=tty0( |$)' "$fw/cmdline.txt" && ! grep -Eq 'console=tty0 .*console=' "$fw/cmdline.txt" \
    || { log "cmdline.txt: console=tty0 is not the last console"; exit 1; }
  grep -Eq 'cma=[1-9][0-9]*M' "$fw/cmdline.txt" || { log "cmdline.txt has no cma=<size>M"; exit 1; }
}

# --- stage: remove device identity and build leftovers, write the manifest --------------------------------
finalize() {
  local commit py_versions
  commit="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
  if ! git -C "$repo" diff --quiet HEAD -- 2>/dev/null; then commit="$commit-dirty"; fi
  py_versions="$(in_root /opt/memento-edge/venv/bin/python -c \
    'import json,importlib.metadata as m; print(json.dumps({d.metadata["Name"]: d.version for d in m.distributions()}, sort_keys=True))')"
  in_root dpkg-query -W -f='${Package}\t${Version}\t${Architecture}\n' > "$work/dpkg.tsv"
  /usr/bin/python3 - "$rootfs/etc/memento-edge/image-manifest.json" "$work/dpkg.tsv" "$model/manifest.json" \
    "$commit" "$version" "$profile" "$py_versions" "$BOARD_NAME" "$BOARD_ARCH" <<'EOF'
import hashlib, json, sys
path, dpkg, model_manifest, commit, version, profile, py, board, arch = sys.argv[1:]
pkgs = {}
for line in open(dpkg):
    name, ver, arch = line.rstrip("\n").split("\t")
    pkgs[name] = ver
raw = open(model_manifest, "rb").read()
import os
doc = {
    "name": "memento-edge", "version": version, "profile": profile, "board": board,
    "base": f"Debian bookworm {arch}", "git_commit": commit,
    "source_date_epoch": int(os.environ["SOURCE_DATE_EPOCH"]),
    "model_manifest_sha256": hashlib.sha256(raw).hexdigest(),
    "model_fingerprint": json.loads(raw)["fingerprint"],
    "python_packages": json.loads(py), "debian_packages": pkgs,
}
with open(path, "w") as fh:
    json.dump(doc, fh, indent=2, sort_keys=True)
    fh.write("\n")
EOF
  chmod 0644 "$rootfs/etc/memento-edge/image-manifest.json"
  cleanup_mounts
  # No device identity: systemd makes a machine-id at first boot, ssh.service makes host keys.
  printf 'uninitialized\n' > "$rootfs/etc/machine-id"
  rm -f "$rootfs/var/lib/dbus/machine-id" "$rootfs"/etc/ssh/ssh_host_*
  rm -f "$rootfs/etc/memento-edge/initial-token"
  # Build leftovers.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/root/.cache \
    "$rootfs"/root/.ansible "$rootfs"/tmp/* "$rootfs"/var/tmp/* "$rootfs"/boot/*.bak
  find "$rootfs/var/log" -type f -exec truncate -s 0 {} +
  # Clamp every timestamp to SOURCE_DATE_EPOCH (reproducible filesystem contents).
  find "$rootfs" -xdev -newermt "@$SOURCE_DATE_EPOCH" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} + 2>/dev/null || true
  du -sh --apparent-size "$rootfs" >&2
}

# --- stage: filesystems and disk image, no loop devices -----------------------------------------------------
assemble() {
  local img="$out/$name.img" bootimg="$work/boot.vfat" rootimg="$work/root.ext4"
  local boot_mib=256 root_kib root_mib
  local uuid_root vol_id
  # Stable identifiers derived from the epoch (no randomness in the image).
  uuid_root="$(printf '%s' "memento-edge-root-$SOURCE_DATE_EPOCH" | sha256sum | sed -E 's/^(.{8})(.{4}).(.{3}).(.{3})(.{12}).*/\1-\2-4\3-8\4-\5/')"
  vol_id="$(printf '%s' "memento-edge-boot-$SOURCE_DATE_EPOCH" | sha256sum | cut -c1-8)"

  rm -f "$bootimg" "$rootimg" "$img"
  mkfs.vfat -C -F 32 -n RASPIFIRM -i "$vol_id" --invariant "$bootimg" $((boot_mib * 1024)) >/dev/null
  # (empty in the reduced profile, which has no raspi-firmware: QEMU boots the kernel from the root fs)
  if [ -n "$(ls -A "$rootfs/boot/firmware")" ]; then
    (cd "$rootfs/boot/firmware" && MTOOLS_SKIP_CHECK=1 mcopy -s -p -m -i "$bootimg" ./* ::/)
  fi
  install -m 0644 "$here/files/memento-edge.txt.example" "$work/memento-edge.txt.example"
  MTOOLS_SKIP_CHECK=1 mcopy -m -i "$bootimg" "$here/files/memento-edge.txt.example" ::/memento-edge.txt.example

  # Root: contents minus the boot partition's files (mounted over /boot/firmware on the device).
  mkdir -p "$work/empty"
  root_kib=$(du -sk --apparent-size "$rootfs" | cut -f1)
  root_mib=$(( (root_kib / 1024) * 125 / 100 + 96 ))   # 25 % + 96 MiB slack; grows at first boot
  mv "$rootfs/boot/firmware" "$work/boot-firmware"
  mkdir -m 0755 "$rootfs/boot/firmware"
  E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" mkfs.ext4 -q -F -L RASPIROOT -U "$uuid_root" -m 1 \
    -E "hash_seed=$uuid_root,root_owner=0:0" -d "$rootfs" "$rootimg" "${root_mib}M"
  rmdir "$rootfs/boot/firmware"
  mv "$work/boot-firmware" "$rootfs/boot/firmware"

  # MBR: the Pi's boot ROM reads the first FAT partition.
  local start1=8192 size1=$((boot_mib * 2048)) start2 size2
  start2=$((start1 + size1))
  size2=$((root_mib * 2048))
  truncate -s $(( (start2 + size2) * 512 )) "$img"
  sfdisk --quiet --no-reread --no-tell-kernel "$img" <<EOF
label: dos
label-id: 0x${vol_id}
unit: sectors

start=$start1, size=$size1, type=c, bootable
start=$start2, size=$size2, type=83
EOF
  dd if="$bootimg" of="$img" bs=1M seek=$((start1 / 2048)) conv=notrunc,sparse status=none
  dd if="$rootimg" of="$img" bs=1M seek=$((start2 / 2048)) conv=notrunc,sparse status=none
  rm -f "$bootimg" "$rootimg"
  touch --date="@$SOURCE_DATE_EPOCH" "$img"
  ls -la "$img" >&2
}

compress() {
  rm -f "$out/$name.img.xz"
  xz -T2 -6 --keep --force "$out/$name.img"
  touch --date="@$SOURCE_DATE_EPOCH" "$out/$name.img.xz"
  (cd "$out" && sha256sum "$name.img.xz" > "$name.img.xz.sha256")
}

t_all=$(date +%s)
stage inputs inputs
stage rootfs rootfs_stage
stage converge converge
stage appliance appliance
stage boot_check boot_check
stage finalize finalize
stage assemble assemble
(cd "$out" && sha256sum "$name.img" > "$name.img.sha256")
[ "$do_xz" = 1 ] && stage compress compress
total=$(( $(date +%s) - t_all ))
rootfs_mib=$(( $(du -sk --apparent-size "$rootfs" | cut -f1) / 1024 ))
raw_bytes=$(stat -c %s "$out/$name.img")
xz_bytes=$( [ -f "$out/$name.img.xz" ] && stat -c %s "$out/$name.img.xz" || echo null)
{
  printf '{"image": "%s", "board": "%s", "profile": "%s", "total_s": %d, "rootfs_mib": %d, "raw_bytes": %d, "xz_bytes": %s, "stages_s": {' \
    "$name.img" "$board" "$profile" "$total" "$rootfs_mib" "$raw_bytes" "$xz_bytes"
  sep=""
  for s in "${stage_order[@]}"; do printf '%s"%s": %d' "$sep" "$s" "${stage_s[$s]}"; sep=", "; done
  printf '}}\n'
} > "$out/$name.build-times.json"
cat "$out/$name.build-times.json"
[ "$keep_rootfs" = 1 ] || rm -rf "$rootfs"
log "image: $out/$name.img (${raw_bytes} bytes) in ${total} s"
