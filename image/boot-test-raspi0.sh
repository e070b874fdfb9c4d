# shellcheck shell=bash
# shellcheck disable=SC2154,SC2034  # work, netdev, ... come from boot-test.sh, which reads what this sets
# The Pi Zero / Zero W half of image/boot-test.sh: boot the zero-w image under `qemu-system-arm -M raspi0`
# (BCM2835, ARM1176JZF-S, 512 MB). Sourced by boot-test.sh, which sets work, total_timeout, netdev, p1_start
# and extracted $work/vmlinuz + $work/initrd.img from the image's root filesystem.
#
# What QEMU's raspi0 does instead of the Pi's firmware: it loads the kernel, the initrd and the device tree
# itself (no bootcode.bin/start.elf, no config.txt; it writes the memory size, the command line and the
# initrd's place into the tree's /chosen as the firmware would), so the test passes the same kernel, initrd
# and Zero W tree (bcm2835-rpi-zero-w.dtb: raspi-firmware's hook copies the upstream trees and sets upstream_kernel=1) by hand.

# raspi0_prepare: the device tree, the command line, the card, $qemu_desc and $dtb_patch (what was changed in
# the tree, and why).
raspi0_prepare() {
  local size pow=1 fat="$work/disk.img@@$((p1_start * 512))"
  MTOOLS_SKIP_CHECK=1 mcopy -n -i "$fat" ::/bcm2835-rpi-zero-w.dtb "$work/raspi0.dtb"
  # The command line the firmware would pass (raspi-firmware's hook wrote it from /etc/default/raspi-firmware).
  MTOOLS_SKIP_CHECK=1 mcopy -n -i "$fat" ::/cmdline.txt "$work/cmdline.txt"
  # 1. QEMU maps no BCM2835 AXI bridge (ASB, 0x7e00a000): with it in the PM node's registers, Linux's
  #    bcm2835-power driver reads it at probe and dies with an external abort ("Internal error: : 8 ...
  #    PC is at bcm2835_power_probe", measured with 6.1.0-rpi). Without the "asb" range the PM driver only
  #    registers the watchdog, which is what QEMU emulates.
  fdtput -t x "$work/raspi0.dtb" /soc/watchdog@7e100000 reg 7e100000 114
  fdtput -t s "$work/raspi0.dtb" /soc/watchdog@7e100000 reg-names pm
  # 2. QEMU's dwc2 model is a USB host port only; the Zero W tree declares the port "otg" (the board's
  #    firmware overlays may turn it into a USB gadget). As "host", the test's USB Ethernet device (QEMU has no
  #    emulated Wi-Fi chip) gives the guest its network.
  fdtput -t s "$work/raspi0.dtb" /soc/usb@7e980000 dr_mode host
  dtb_patch="PM node without the ASB register range (QEMU does not map it; bcm2835-power aborts reading it); USB port dr_mode otg -> host (QEMU's dwc2 is a host-only model; the network is a USB Ethernet device on it)"
  # QEMU's SD card model takes only sizes that are a power of two.
  size=$(stat -c %s "$work/disk.img")
  while [ "$pow" -lt "$size" ]; do pow=$((pow * 2)); done
  truncate -s "$pow" "$work/disk.img"
  qemu_desc="qemu-system-arm -M raspi0 (BCM2835, ARM1176, 512 MB of which QEMU keeps 64 MB as VideoCore RAM; USB Ethernet on dwc2)"
}

# raspi0_start: boot in the background; sets $qemu_pid. The console is the Zero W's GPIO UART, the mini UART
# (ttyS1, QEMU's second serial port); the PL011 drives Bluetooth under this tree.
raspi0_start() {
  timeout "$total_timeout" qemu-system-arm -M raspi0 \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" -dtb "$work/raspi0.dtb" \
    -append "$(tr -d '\n' < "$work/cmdline.txt") systemd.show_status=1" \
    -drive "file=$work/disk.img,format=raw,if=sd,cache=unsafe" \
    -netdev "$netdev" -device usb-net,netdev=n0 \
    -display none -serial null -serial "file:$work/serial.log" -monitor none -no-reboot &
  qemu_pid=$!
}
