#!/bin/bash
# Build (once) and cache a Debian root filesystem for emulated benchmarks.
#
#   bench/qemu/build-rootfs.sh arm64|armel [--force]
#
# Prints the rootfs path on stdout. The rootfs is cached under $MEMENTO_QEMU_CACHE
# (default bench/qemu/cache/), keyed on a hash of this script, packages-ARCH.txt, the Debian suite
# and mirror: edit any of them and the next call builds a fresh one (older ones are removed).
# debootstrap --foreign runs the first stage natively; the second stage runs under qemu-user via
# binfmt_misc. Needs root and network access to the Debian mirror. ~3 min for arm64 on 2 cores.
#
# Environment: MEMENTO_QEMU_CACHE (cache dir), MEMENTO_QEMU_SUITE (default bookworm),
# MEMENTO_QEMU_MIRROR (default http://deb.debian.org/debian), MEMENTO_QEMU_NO_INSTALL=1 (never
# apt-get install host tools; fail instead).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

arch="" force=0
for a in "$@"; do
    case "$a" in
        -h|--help) usage; exit 0 ;;
        --force) force=1 ;;
        arm64|armel) arch=$a ;;
        *) usage >&2; die "unknown argument: $a" ;;
    esac
done
[ -n "$arch" ] || { usage >&2; die "ARCH (arm64 or armel) is required"; }
[ -f "$QEMU_DIR/packages-$arch.txt" ] || die "missing $QEMU_DIR/packages-$arch.txt"

need_root
ensure_host_tools
mkdir -p "$QEMU_CACHE"

dir="$(rootfs_dir "$arch")"
# One builder per arch at a time (the run scripts and CI may start together).
exec 9>"$QEMU_CACHE/.lock-rootfs-$arch"
flock 9

if [ "$force" = 1 ]; then rm -rf "$dir"; fi
if [ -f "$dir/.memento-rootfs-complete" ]; then
    log "rootfs $arch cached: $dir"
    echo "$dir"
    exit 0
fi

pkgs="$(grep -v '^\s*#' "$QEMU_DIR/packages-$arch.txt" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')"
tmp="$dir.tmp"
rm -rf "$tmp"
start=$(date +%s)
log "debootstrap $DEBIAN_SUITE/$arch (first stage) -> $tmp"
timeout 1800 debootstrap --arch="$arch" --variant=minbase --foreign --include="$pkgs" \
    "$DEBIAN_SUITE" "$tmp" "$DEBIAN_MIRROR" >"$QEMU_CACHE/debootstrap-$arch.log" 2>&1 \
    || { tail -20 "$QEMU_CACHE/debootstrap-$arch.log" >&2; die "debootstrap first stage failed"; }
log "debootstrap second stage (emulated)"
# Private mount namespace: whatever debootstrap mounts inside the target is gone when it exits.
timeout 2400 unshare --mount --propagation private -- chroot "$tmp" /debootstrap/debootstrap --second-stage \
    >>"$QEMU_CACHE/debootstrap-$arch.log" 2>&1 \
    || { tail -20 "$QEMU_CACHE/debootstrap-$arch.log" >&2; die "debootstrap second stage failed"; }
# Keep the cache small: no .deb archives, no apt lists (nothing installs from apt later).
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
printf 'arch=%s\nsuite=%s\nmirror=%s\nkey=%s\nbuilt=%s\nseconds=%s\n' "$arch" "$DEBIAN_SUITE" \
    "$DEBIAN_MIRROR" "$(rootfs_key "$arch")" "$(date -u +%FT%TZ)" "$(( $(date +%s) - start ))" \
    >"$tmp/.memento-rootfs-complete"
mv "$tmp" "$dir"
# Drop rootfs built from older inputs for this arch.
for old in "$QEMU_CACHE"/rootfs-"$arch"-*; do
    [ -d "$old" ] && [ "$old" != "$dir" ] && { log "removing stale $old"; rm -rf "$old"; }
done
log "rootfs $arch built in $(( $(date +%s) - start ))s: $dir"
echo "$dir"
