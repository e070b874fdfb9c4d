#!/bin/bash
# python -m bench.backlog inside the armel bench rootfs (built by bench/qemu/run-armv6.sh) under
# qemu-user with QEMU_CPU=arm1176 - emulated Pi Zero figures, not board times. Needs root (unshare,
# mount, chroot) and the binfmt_misc registration run-armv6.sh makes. Runs in a private mount namespace:
# the project and the model are copied into a tmpfs over the rootfs's /tmp, so nothing persists in the
# shared rootfs; the database goes to the rootfs's /var/tmp (disk: writes pay a real fsync).
#   sudo bench/backlog_armv6.sh --seed 3 --backlog 8 --queries 4      # arguments go to bench.backlog
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MEMENTO_QEMU_CACHE:-$SRC/bench/qemu/cache}
R=${MEMENTO_ARMEL_ROOTFS:-$(find "$CACHE" -maxdepth 1 -name "rootfs-armel-*" -type d 2>/dev/null | head -1)}
[ -d "$R/usr/bin" ] || { echo "no armel rootfs in $CACHE: run bench/qemu/run-armv6.sh once" >&2; exit 2; }
# shellcheck disable=SC2016  # the inner script expands its own positional parameters
unshare --mount --propagation private -- /bin/bash -euc '
R=$1; SRC=$2; shift 2
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o size=400m tmpfs "$R/tmp"
mkdir -p "$R/tmp/p/bench" "$R/tmp/p/models/minilm-int8"
cp -r "$SRC/memento_edge" "$R/tmp/p/"
cp "$SRC"/bench/*.py "$R/tmp/p/bench/"
find -L "$SRC/models/minilm-int8" -maxdepth 1 -type f -exec cp {} "$R/tmp/p/models/minilm-int8/" \;
exec chroot "$R" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU=arm1176 \
    PYTHONPATH=/tmp/p PYTHONDONTWRITEBYTECODE=1 TMPDIR=/var/tmp \
    /usr/bin/python3 -m bench.backlog --model-dir /tmp/p/models/minilm-int8 "$@"
' run "$R" "$SRC" "$@"
