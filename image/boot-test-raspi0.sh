# shellcheck shell=bash
# shellcheck disable=SC2154,SC2034  # work, netdev, ... come from boot-test.sh, which reads what this sets
# The Raspberry Pi machines of image/boot-test.sh: the zero-w image under `qemu-system-arm -M raspi0`
# (BCM2835, ARM1176JZF-S, 512 MB), and, opt-in (MEMENTO_BOOT_MACHINE=raspi3b), the zero2w image under
# `qemu-system-aarch64 -M raspi3b` (BCM2837, the Zero 2 W's SoC family: 4x Cortex-A53; QEMU gives it 1 GB,
# the command line caps Linux at the Zero 2 W's 512 MB less gpu_mem=16). Sourced by boot-test.sh, which sets
# work, total_timeout, netdev, p1_start and extracted $work/vmlinuz + $work/initrd.img from the image.
#
# What QEMU's raspi machines do instead of the Pi's firmware: they load the kernel, the initrd and the device
# tree themselves (no bootcode.bin/start.elf, no config.txt; QEMU writes the memory size, the command line and
# the initrd's place into the tree's /chosen as the firmware would), so the test passes the same kernel, initrd
# and board tree ($BOARD_DTB, the copy raspi-firmware's hook puts on the FAT partition) by hand, root on the
# emulated SD card by LABEL from cmdline.txt.

# raspi_prepare: the device tree, the command line, the card and $dtb_patch (what was changed in the tree,
# and why). The two changes hold for the BCM2835 and BCM2837 trees alike (same PM and USB nodes).
raspi_prepare() {
  local size pow=1 fat="$work/disk.img@@$((p1_start * 512))"
  MTOOLS_SKIP_CHECK=1 mcopy -n -i "$fat" "::/$BOARD_DTB" "$work/raspi.dtb"
  # The command line the firmware would pass (raspi-firmware's hook wrote it from /etc/default/raspi-firmware).
  MTOOLS_SKIP_CHECK=1 mcopy -n -i "$fat" ::/cmdline.txt "$work/cmdline.txt"
  # 1. QEMU maps no BCM2835 AXI bridge (ASB, 0x7e00a000): with it in the PM node's registers, Linux's
  #    bcm2835-power driver reads it at probe and dies with an external abort ("Internal error: : 8 ...
  #    PC is at bcm2835_power_probe", measured with 6.1.0-rpi). Without the "asb" range the PM driver only
  #    registers the watchdog, which is what QEMU emulates.
  fdtput -t x "$work/raspi.dtb" /soc/watchdog@7e100000 reg 7e100000 114
  fdtput -t s "$work/raspi.dtb" /soc/watchdog@7e100000 reg-names pm
  # 2. QEMU's dwc2 model is a USB host port only; the Zero trees declare the port "otg" (on the board it is
  #    the USB gadget's port). As "host", the test's USB Ethernet device (QEMU has no emulated Wi-Fi chip)
  #    gives the guest its network; the guest names it usb0 and gives it the gadget's address, 10.55.0.1.
  fdtput -t s "$work/raspi.dtb" /soc/usb@7e980000 dr_mode host
  # 3. The SD host without DMA (PIO): with DMA, a starved emulated CPU (QEMU's raspi0 runs one ARM1176 on one
  #    host thread) hit "sdhost-bcm2835: timeout waiting for hardware interrupt" and then a NULL dereference in
  #    bcm2835_finish_data (2026-12-03, bench/results/2026-12-03-zero-w-armel-converge-image-boot.md).
  fdtput -d "$work/raspi.dtb" /soc/mmc@7e202000 dmas
  fdtput -d "$work/raspi.dtb" /soc/mmc@7e202000 dma-names
  dtb_patch="PM node without the ASB register range (QEMU does not map it; bcm2835-power aborts reading it); USB port dr_mode otg -> host (QEMU's dwc2 is a host-only model; the network is a USB Ethernet device on it); SD host in PIO mode (DMA completions timed out under the slow emulated CPU)"
  # QEMU's SD card model takes only sizes that are a power of two.
  size=$(stat -c %s "$work/disk.img")
  while [ "$pow" -lt "$size" ]; do pow=$((pow * 2)); done
  truncate -s "$pow" "$work/disk.img"
}

# Emulation only: the emulated board runs tens of times slower than a real one, and systemd's 90 s device
# timeout expired before udev had even started (emergency mode, measured 2026-12-03); the card's own
# cmdline.txt is unchanged.
slow_boot="systemd.default_device_timeout_sec=1800 systemd.default_timeout_start_sec=1800"

# raspi_qemu BINARY MACHINE [KERNEL_ARGS]: boot the card's kernel, initrd and tree in the background; sets
# $qemu_pid. The console is the board's GPIO UART, the mini UART (ttyS1, QEMU's second serial port).
raspi_qemu() {
  timeout "$total_timeout" "$1" -M "$2" \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" -dtb "$work/raspi.dtb" \
    -append "$(tr -d '\n' < "$work/cmdline.txt")${3:+ $3} systemd.show_status=1 $slow_boot" \
    -drive "file=$work/disk.img,format=raw,if=sd,cache=unsafe" \
    -netdev "$netdev" -device usb-net,netdev=n0 \
    -display none -serial null -serial "file:$work/serial.log" -monitor none -no-reboot &
  qemu_pid=$!
}

# raspi0_start: the Zero / Zero W image on QEMU's BCM2835 board (the PL011 drives Bluetooth under this tree).
raspi0_start() {
  qemu_desc="qemu-system-arm -M raspi0 (BCM2835, ARM1176, 512 MB of which QEMU keeps 64 MB as VideoCore RAM; USB Ethernet on dwc2)"
  raspi_qemu qemu-system-arm raspi0
}

# raspi3b_start: the Zero 2 W image on QEMU's BCM2837 board. mem=496M: the RAM Linux gets on the board (512 MB
# less gpu_mem=16); QEMU's raspi3b has 1 GB and no option to shrink it.
raspi3b_start() {
  qemu_desc="qemu-system-aarch64 -M raspi3b (BCM2837, 4x Cortex-A53, 1 GB capped to 496 MB by mem=; USB Ethernet on dwc2)"
  raspi_qemu qemu-system-aarch64 raspi3b mem=496M
}
