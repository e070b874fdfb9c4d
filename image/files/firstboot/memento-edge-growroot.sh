#!/bin/sh
# Grow the root partition (the last one on the card) and its ext4 filesystem to fill the SD card.
# Safe to re-run: sfdisk leaves a partition that already fills the disk alone; resize2fs is a no-op then.
set -eu
rootdev=$(findmnt -no SOURCE /)
disk="/dev/$(lsblk -no PKNAME "$rootdev")"
partnum=$(cat "/sys/class/block/$(basename "$rootdev")/partition")
echo "growroot: $rootdev (partition $partnum of $disk)"
# ", +" = keep the start, take all free space after it.
echo ", +" | sfdisk --no-reread --no-tell-kernel -N "$partnum" "$disk" || true
partx -u -n "$partnum" "$disk" || true
resize2fs "$rootdev"
mkdir -p /var/lib/memento-edge-image
touch /var/lib/memento-edge-image/growroot.done
