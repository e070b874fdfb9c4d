#!/usr/bin/env bash
# Build (or reuse from the cache) a Debian bookworm arm64 root filesystem tarball with mmdebstrap under
# qemu-user emulation.
#
#   image/rootfs.sh PROFILE OUT.tar
#
# PROFILE: full    - the Pi Zero 2 W appliance: systemd, python3-venv, avahi, the arm64 kernel, SSH,
#                    wpa_supplicant, + the Pi-only packages raspi-firmware (boot files, config.txt),
#                    firmware-brcm80211 (the Zero 2 W's Wi-Fi) and wireless-regdb
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
# per machine. mmdebstrap honours SOURCE_DATE_EPOCH.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
profile="${1:?profile: reduced|full}"
out="${2:?output tarball}"
cache="${MEMENTO_IMAGE_CACHE:-$here/cache}"
suite="${MEMENTO_SUITE:-bookworm}"
mirror="${MEMENTO_MIRROR:-http://deb.debian.org/debian}"
security="${MEMENTO_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

reduced_pkgs=(
  # what the role needs
  systemd-sysv udev dbus python3 python3-venv python3-packaging ca-certificates avahi-daemon iproute2 kmod
  # boot: kernel + initramfs (zstd: smaller and far faster to unpack on a Cortex-A53 than gzip)
  linux-image-arm64 initramfs-tools zstd
  # network + access (wpa_supplicant: the first-boot file configures Wi-Fi)
  openssh-server wpasupplicant systemd-resolved systemd-timesyncd fake-hwclock sudo
  # first boot: grow the root partition and filesystem
  fdisk e2fsprogs
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
# Files that shape /boot, relative to image/files/ and to the root: they go in before the initramfs build
# and are part of the cache key.
boot_inputs=(etc/fstab etc/default/raspi-firmware etc/default/raspi-firmware-custom
             etc/initramfs-tools/conf.d/memento-edge.conf)

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

# Bump when the mmdebstrap invocation below changes meaningfully (the key covers packages and files).
recipe_version=2
key="$( { echo "$recipe_version $profile $suite $mirror"; printf '%s\n' "${pkgs[@]}"; cat "$files/dpkg-excludes.cfg"; (cd "$files" && cat "${boot_inputs[@]}"); } \
        | sha256sum | cut -c1-16)"
cached="$cache/rootfs-$profile-$key.tar"
mkdir -p "$cache"
if [ ! -s "$cached" ]; then
  ensure_binfmt
  include="$(IFS=,; echo "${pkgs[*]}")"
  t0=$(date +%s)
  # update-initramfs is diverted to /bin/true while packages install (the kernel and raspi-firmware would
  # each trigger a full initramfs build under emulation); the customize hooks put the boot-shaping files in
  # place and build it once, which also runs raspi-firmware's hook (-> /boot/firmware, full profile).
  timeout 3600 mmdebstrap --variant=minbase --arch=arm64 --format=tar --components=main,non-free-firmware \
    --dpkgopt="$files/dpkg-excludes.cfg" \
    --essential-hook='chroot "$1" dpkg-divert --local --rename --add /usr/sbin/update-initramfs' \
    --essential-hook='ln -sf /bin/true "$1/usr/sbin/update-initramfs"' \
    --essential-hook='mkdir -p "$1/boot/firmware"' \
    --customize-hook="for f in ${boot_inputs[*]}; do install -D -m 0644 '$files'/\$f \"\$1\"/\$f; done" \
    --customize-hook='rm -f "$1/usr/sbin/update-initramfs"' \
    --customize-hook='chroot "$1" dpkg-divert --local --rename --remove /usr/sbin/update-initramfs' \
    --customize-hook='chroot "$1" update-initramfs -c -k all' \
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
