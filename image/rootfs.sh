#!/usr/bin/env bash
# Build (or reuse from the cache) a Debian bookworm root filesystem tarball for one board with mmdebstrap
# under qemu-user emulation.
#
#   image/rootfs.sh PROFILE OUT.tar [BOARD]
#
# BOARD: zero2w (default, or $MEMENTO_IMAGE_BOARD; arm64) or zero-w (armel, linux-image-rpi): see
# image/boards.sh.
#
# PROFILE: full    - the appliance: systemd, python3-venv, avahi, the board's kernel, SSH,
#                    wpa_supplicant, + the Pi-only packages raspi-firmware (boot files, config.txt),
#                    firmware-brcm80211 (the Zero 2 W's and Zero W's Wi-Fi) and wireless-regdb
#          reduced - the same minus the Pi-only packages: what a QEMU `virt` boot can exercise.
# The Ansible converge test takes the tarball of the profile the image build uses (MEMENTO_IMAGE_PROFILE),
# so one cold Debian install serves both in CI.
#
# The expensive, input-only work happens here, once per recipe: the emulated Debian install and the one
# initramfs build (~4.5 min under qemu-user, MODULES=most) with the appliance's initramfs/raspi-firmware
# settings and fstab already in place. Nothing the Ansible role or the wheel does touches /boot, so
# image/build.sh starts from a tarball whose /boot is final. The tarball is cached in
# $MEMENTO_IMAGE_CACHE (default image/cache/) under a key made of the profile's package list, the dpkg
# excludes, the boot-related files and this script's recipe version, so an unchanged recipe is built once
# per machine. mmdebstrap honours SOURCE_DATE_EPOCH and is bounded by MEMENTO_ROOTFS_TIMEOUT (default
# 3600 s; an armel install on a loaded 2-core host took longer than that).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
profile="${1:?profile: reduced|full}"
out="${2:?output tarball}"
board="${3:-${MEMENTO_IMAGE_BOARD:-zero2w}}"
# shellcheck source=image/boards.sh
source "$here/boards.sh"
board_config "$board" || exit 2
cache="${MEMENTO_IMAGE_CACHE:-$here/cache}"
suite="${MEMENTO_SUITE:-bookworm}"
mirror="${MEMENTO_MIRROR:-http://deb.debian.org/debian}"
security="${MEMENTO_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

reduced_pkgs=(
  # what the role needs
  systemd-sysv udev dbus python3 python3-venv python3-packaging ca-certificates avahi-daemon iproute2 kmod
  # boot: kernel + initramfs (zstd: smaller and far faster to unpack on a Cortex-A53 than gzip)
  "$BOARD_KERNEL" initramfs-tools zstd
  # network + access (wpa_supplicant: the first-boot file configures Wi-Fi)
  openssh-server wpasupplicant systemd-resolved systemd-timesyncd fake-hwclock sudo
  # first boot: grow the root partition and filesystem
  fdisk e2fsprogs
  # compressed swap in RAM (image/files/etc/systemd/zram-generator.conf); a Rust generator, no daemon
  systemd-zram-generator
  # the boot test reads RSS and boot time via SSH; procps gives ps/free to operators
  procps
)
# Only a real Pi uses these: the GPU firmware + config.txt/cmdline.txt hook, the Wi-Fi chip's firmware and
# the regulatory database (non-free-firmware).
pi_pkgs=(raspi-firmware firmware-brcm80211 wireless-regdb)
case "$profile" in
  reduced) pkgs=("${reduced_pkgs[@]}") ;;
  full) pkgs=("${reduced_pkgs[@]}" "${pi_pkgs[@]}") ;;
  *) echo "unknown profile: $profile" >&2; exit 2 ;;
esac
files="$here/files"
# Files that shape /boot, relative to image/files/ (or the board's image/boards/<board>/) and to the root:
# they go in before the initramfs build and are part of the cache key.
boot_inputs=(etc/fstab etc/default/raspi-firmware etc/default/raspi-firmware-custom
             etc/initramfs-tools/conf.d/memento-edge.conf)
boot_srcs=()
for f in "${boot_inputs[@]}"; do boot_srcs+=("$(board_file "$board" "$here" "$f")"); done

ensure_binfmt() {
  # qemu-user-static must be registered with binfmt_misc for the board's chroot to run.
  local handler=qemu-aarch64
  [ "$BOARD_ARCH" = arm64 ] || handler=qemu-arm
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e "/proc/sys/fs/binfmt_misc/$handler" ]; then
    # QEMU >= 8 (qemu-user-binfmt) ships systemd binfmt.d files; 7.2 registers through binfmt-support.
    if [ -f "/usr/lib/binfmt.d/$handler.conf" ] && [ -x /lib/systemd/systemd-binfmt ]; then
      /lib/systemd/systemd-binfmt "/usr/lib/binfmt.d/$handler.conf"
    else
      update-binfmts --enable "$handler" 2>/dev/null || update-binfmts --enable
    fi
  fi
  grep -q enabled "/proc/sys/fs/binfmt_misc/$handler"
}

# Bump when the mmdebstrap invocation below changes meaningfully (the key covers packages and files).
recipe_version=2
key="$( { echo "$recipe_version $board $BOARD_ARCH $profile $suite $mirror"; printf '%s\n' "${pkgs[@]}"; cat "$files/dpkg-excludes.cfg"; cat "${boot_srcs[@]}"; } \
        | sha256sum | cut -c1-16)"
cached="$cache/rootfs-$board-$profile-$key.tar"
mkdir -p "$cache"
if [ ! -s "$cached" ]; then
  ensure_binfmt
  include="$(IFS=,; echo "${pkgs[*]}")"
  t0=$(date +%s)
  # update-initramfs is diverted to /bin/true while packages install (the kernel and raspi-firmware would
  # each trigger a full initramfs build under emulation); the customize hooks put the boot-shaping files in
  # place and build it once, which also runs raspi-firmware's hook (-> /boot/firmware, full profile).
  timeout "${MEMENTO_ROOTFS_TIMEOUT:-3600}" mmdebstrap --variant=minbase --arch="$BOARD_ARCH" --format=tar --components=main,non-free-firmware \
    --dpkgopt="$files/dpkg-excludes.cfg" \
    --essential-hook='chroot "$1" dpkg-divert --local --rename --add /usr/sbin/update-initramfs' \
    --essential-hook='ln -sf /bin/true "$1/usr/sbin/update-initramfs"' \
    --essential-hook='mkdir -p "$1/boot/firmware"' \
    --customize-hook="$(for i in "${!boot_inputs[@]}"; do printf 'install -D -m 0644 %q "$1"/%q; ' "${boot_srcs[$i]}" "${boot_inputs[$i]}"; done)" \
    --customize-hook='rm -f "$1/usr/sbin/update-initramfs"' \
    --customize-hook='chroot "$1" dpkg-divert --local --rename --remove /usr/sbin/update-initramfs' \
    --customize-hook='chroot "$1" update-initramfs -c -k all' \
    --include="$include" \
    "$suite" "$cached.tmp" \
    "deb $mirror $suite main non-free-firmware" \
    "deb $mirror $suite-updates main non-free-firmware" \
    "deb $security $suite-security main non-free-firmware"
  mv "$cached.tmp" "$cached"
  echo "rootfs: built $board $profile in $(( $(date +%s) - t0 )) s -> $cached" >&2
else
  echo "rootfs: cached $cached" >&2
fi
ln -f "$cached" "$out" 2>/dev/null || cp "$cached" "$out"
