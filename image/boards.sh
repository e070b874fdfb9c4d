# shellcheck shell=bash
# The boards the appliance image is built for: the one table image/build.sh, image/rootfs.sh and
# image/boot-test.sh read (sourced, never executed). A board's files that differ from image/files/ live in
# image/boards/<board>/ (same relative paths) and win over the common ones.
#
#   zero2w  Raspberry Pi Zero 2 W (BCM2710A1, Cortex-A53): Debian arm64, linux-image-arm64 (Debian's
#           raspi image-specs "family 3"), onnxruntime + sqlite-vec wheels from PyPI (the role's pip path)
#   zero-w  Raspberry Pi Zero / Zero W (BCM2835, ARM1176JZF-S, ARMv6): Debian armel, linux-image-rpi
#           (image-specs "family 1"); no PyPI wheels exist for armv6l, so the role installs numpy, Flask,
#           waitress, PyYAML and click from Debian and the package runs its numpy int8 backend
MEMENTO_BOARDS="zero2w zero-w"

# board_config BOARD: set BOARD_NAME, BOARD_SLUG (file names), BOARD_ARCH (Debian), BOARD_KERNEL (package),
# BOARD_QEMU_CPU (the CPU model qemu-user runs the board's binaries as), BOARD_UNAME (uname -m on the board),
# BOARD_DTB (the device tree the Pi's firmware loads from the FAT partition for this board).
# Returns 2 for an unknown board.
board_config() {
  case "$1" in
    zero2w)
      BOARD_NAME="Raspberry Pi Zero 2 W"; BOARD_SLUG=pizero2w; BOARD_ARCH=arm64
      BOARD_KERNEL=linux-image-arm64; BOARD_QEMU_CPU=cortex-a53; BOARD_UNAME=aarch64
      BOARD_DTB=bcm2837-rpi-zero-2-w.dtb ;;   # config.txt [pi02] device_tree=
    zero-w)
      BOARD_NAME="Raspberry Pi Zero / Zero W"; BOARD_SLUG=pizerow; BOARD_ARCH=armel
      BOARD_KERNEL=linux-image-rpi; BOARD_QEMU_CPU=arm1176; BOARD_UNAME=armv6l
      BOARD_DTB=bcm2835-rpi-zero-w.dtb ;;      # upstream name: raspi-firmware writes upstream_kernel=1 and copies it
    *) echo "unknown board: $1 ($MEMENTO_BOARDS)" >&2; return 2 ;;
  esac
  export BOARD_NAME BOARD_SLUG BOARD_ARCH BOARD_KERNEL BOARD_QEMU_CPU BOARD_UNAME BOARD_DTB
}

# board_file BOARD DIR RELPATH: the board's own copy of an image/files/ file if it has one, else the common.
board_file() {
  local board=$1 dir=$2 rel=$3
  if [ -f "$dir/boards/$board/$rel" ]; then echo "$dir/boards/$board/$rel"; else echo "$dir/files/$rel"; fi
}
