#!/usr/bin/env bash
# Build (or reuse from the cache) a Debian bookworm arm64 root filesystem tarball with mmdebstrap under
# qemu-user emulation.
#
#   image/rootfs.sh PROFILE OUT.tar
#
# PROFILE: minimal - what the Ansible converge test needs (systemd, python3-venv, ca-certificates, avahi)
#          full    - the Pi Zero 2 W appliance: + kernel, raspi-firmware, Wi-Fi firmware, SSH, wpa_supplicant
#
# The tarball is cached in image/cache/ under a key made of the profile's package list, the dpkg excludes
# and this script, so an unchanged recipe is built once per machine. mmdebstrap honours SOURCE_DATE_EPOCH.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
profile="${1:?profile: minimal|full}"
out="${2:?output tarball}"
cache="${MEMENTO_IMAGE_CACHE:-$here/cache}"
suite="${MEMENTO_SUITE:-bookworm}"
mirror="${MEMENTO_MIRROR:-http://deb.debian.org/debian}"
security="${MEMENTO_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

base_pkgs=(systemd-sysv udev dbus python3 python3-venv ca-certificates avahi-daemon iproute2 kmod)
full_pkgs=(
  # boot: kernel, Raspberry Pi firmware + config.txt hooks, initramfs, Wi-Fi firmware (non-free-firmware)
  linux-image-arm64 raspi-firmware firmware-brcm80211 initramfs-tools zstd
  # network + access
  openssh-server wpasupplicant wireless-regdb systemd-resolved systemd-timesyncd fake-hwclock sudo
  # first boot: grow the root partition and filesystem
  fdisk e2fsprogs
  # the boot test reads RSS and boot time via SSH; procps gives ps/free to operators
  procps
)
case "$profile" in
  minimal) pkgs=("${base_pkgs[@]}") ;;
  full) pkgs=("${base_pkgs[@]}" "${full_pkgs[@]}") ;;
  *) echo "unknown profile: $profile" >&2; exit 2 ;;
esac

ensure_binfmt() {
  # qemu-user-static must be registered with binfmt_misc for the arm64 chroot to run.
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || update-binfmts --enable
  fi
  grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64
}

# Bump when the mmdebstrap invocation below changes meaningfully (the key covers packages and excludes).
recipe_version=1
key="$( { echo "$recipe_version $profile $suite $mirror"; printf '%s\n' "${pkgs[@]}"; cat "$here/files/dpkg-excludes.cfg"; } \
        | sha256sum | cut -c1-16)"
cached="$cache/rootfs-$profile-$key.tar"
mkdir -p "$cache"
if [ ! -s "$cached" ]; then
  ensure_binfmt
  include="$(IFS=,; echo "${pkgs[*]}")"
  t0=$(date +%s)
  # update-initramfs is diverted to /bin/true while packages install (the kernel and raspi-firmware would
  # each trigger a full initramfs build under emulation); image/build.sh builds it once at the end.
  timeout 3600 mmdebstrap --variant=minbase --arch=arm64 --format=tar --components=main,non-free-firmware \
    --dpkgopt="$here/files/dpkg-excludes.cfg" \
    --essential-hook='chroot "$1" dpkg-divert --local --rename --add /usr/sbin/update-initramfs' \
    --essential-hook='ln -sf /bin/true "$1/usr/sbin/update-initramfs"' \
    --essential-hook='mkdir -p "$1/boot/firmware"' \
    --include="$include" \
    "$suite" "$cached.tmp" \
    "deb $mirror $suite main non-free-firmware" \
    "deb $mirror $suite-updates main non-free-firmware" \
    "deb $security $suite-security main non-free-firmware"
  mv "$cached.tmp" "$cached"
  echo "rootfs: built $profile in $(( $(date +%s) - t0 )) s -> $cached" >&2
else
  echo "rootfs: cached $cached" >&2
fi
ln -f "$cached" "$out" 2>/dev/null || cp "$cached" "$out"
