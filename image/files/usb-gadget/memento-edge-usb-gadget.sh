#!/bin/sh
# USB gadget Ethernet on the Pi Zero's OTG port: g_ether, Linux's legacy Ethernet gadget, which both boards'
# Debian kernels build as a module (linux-image-arm64 and linux-image-rpi: CONFIG_USB_ETH=m with
# CONFIG_USB_ETH_RNDIS=y; neither builds g_ncm). One module with parameters, no configfs tree to assemble:
# CDC ECM for Linux and macOS, RNDIS for Windows. The interface is usb0 (10-usb-gadget.link), configured by
# 10-usb-gadget.network.
#
# The MAC addresses are derived from the machine-id (locally administered, unicast): random ones, g_ether's
# default, would make the laptop see a new adapter and the DHCP server a new client on every boot.
set -eu
if grep -qw g_ether /proc/modules; then exit 0; fi
h="$(sha256sum "${MEMENTO_MACHINE_ID_FILE:-/etc/machine-id}" | cut -c1-10)"   # (the variable: tests)
mac() {  # mac FIRST-OCTET: FIRST-OCTET followed by the five bytes of the hash
  printf '%s:%s:%s:%s:%s:%s' "$1" "$(echo "$h" | cut -c1-2)" "$(echo "$h" | cut -c3-4)" \
    "$(echo "$h" | cut -c5-6)" "$(echo "$h" | cut -c7-8)" "$(echo "$h" | cut -c9-10)"
}
modprobe g_ether dev_addr="$(mac 02)" host_addr="$(mac 06)" \
  iManufacturer=memento-edge iProduct="memento-edge USB Ethernet"
echo "memento-edge: USB gadget Ethernet loaded on $(ls /sys/class/udc): usb0 (device $(mac 02), host $(mac 06))"
