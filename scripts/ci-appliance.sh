#!/usr/bin/env bash
# What CI runs for the appliance (ansible/ + image/). Stages, each timed (seconds go to
# .cache/ci-appliance-times.json and the log):
#   setup     host tools (apt: mmdebstrap, qemu-user-static from bookworm-backports, qemu-system-arm, mtools,
#             dosfstools, fdisk) + the Ansible venv (.cache/ansible-venv, pinned in ansible/requirements.txt)
#   fast      pytest tests/test_ansible.py tests/test_firstboot.py: syntax-check, ansible-lint (production
#             profile), the first-boot file parser
# then for each board in $MEMENTO_CI_BOARDS (image/boards.sh; default "zero2w": the zero-w stages are opt-in,
# MEMENTO_CI_BOARDS="zero2w zero-w", until they have passed on a CI machine and been timed against the 60 min):
#   converge-B  MEMENTO_APPLIANCE=1 MEMENTO_IMAGE_BOARD=B pytest tests/test_ansible.py: the role into the board's
#             rootfs twice (changed=0) + checks (zero-w: armel, uname armv6l, Debian's Python packages)
#   image-B   image/build.sh --board B --profile ${MEMENTO_IMAGE_PROFILE:-full}
#   boot-B    image/boot-test.sh (QEMU, /healthz, remember/recall, RSS, systemd-analyze, N mixed requests;
#             zero2w adds --provision: ansible/site.yml over SSH against the booted image, changed=0;
#             zero-w: qemu-system-arm -M raspi0, MEMENTO_CI_ZERO_W_REQUESTS requests, see below)
#
#   scripts/ci-appliance.sh [--setup|--fast|--no-image|--all]      default: --all
#
# CI builds the full, flashable image: measured on a cold cache the whole of .ci/run stays under 60 min
# (see README), because the converge stage and the image share one Debian tarball (MEMENTO_IMAGE_PROFILE
# picks it for both; the initramfs is built inside it) and the image stage costs one converge, assembly
# and xz. MEMENTO_IMAGE_PROFILE=reduced (the same recipe minus raspi-firmware/firmware-brcm80211/
# wireless-regdb, no xz; 33 min for all of .ci/run cold) is the fallback should that stop holding.
# MEMENTO_IMAGE_CACHE may point outside the clone (.ci/run: /var/cache/memento-edge/image) so later runs
# on the same machine reuse the tarball.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
mode="${1:---all}"
export MEMENTO_IMAGE_PROFILE="${MEMENTO_IMAGE_PROFILE:-full}"   # read by tests/test_ansible.py too
boards="${MEMENTO_CI_BOARDS:-zero2w}"
venv="$repo/.cache/ansible-venv"
py="$repo/.venv/bin/python"
times="$repo/.cache/ci-appliance-times.json"
mkdir -p "$repo/.cache"
log() { printf '[ci-appliance %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
declare -A took=()
order=()
stage() {
  local stage_name="$1"; shift
  local t0; t0=$(date +%s)
  log "== $stage_name"
  "$@"
  took[$stage_name]=$(( $(date +%s) - t0 ))
  order+=("$stage_name")
  log "== $stage_name done in ${took[$stage_name]} s"
}

setup() {
  local need=()
  command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
  command -v mcopy >/dev/null || need+=(mtools)
  command -v mkfs.vfat >/dev/null || need+=(dosfstools)
  command -v sfdisk >/dev/null || need+=(fdisk)
  command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
  command -v qemu-img >/dev/null || need+=(qemu-utils)
  command -v debugfs >/dev/null || need+=(e2fsprogs)
  command -v update-binfmts >/dev/null || need+=(binfmt-support)
  command -v ssh >/dev/null || need+=(openssh-client)
  command -v arch-test >/dev/null || need+=(arch-test)
  command -v fdtput >/dev/null || need+=(device-tree-compiler)   # the raspi0 boot test patches the Zero W tree
  local qv
  # (|| true: on a fresh machine qemu-aarch64-static is absent, and pipefail would end the script here)
  qv="$(qemu-aarch64-static --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' || true)"
  if [ "${#need[@]}" -gt 0 ] || [ "${qv:-0}" -lt 8 ]; then
    local bpo=/etc/apt/sources.list.d/memento-bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$bpo"
    fi
    timeout 600 apt-get update -qq
    [ "${#need[@]}" -gt 0 ] && DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get install -y -qq "${need[@]}"
    # QEMU >= 8 user mode: 7.2 leaks the host's /proc/cpuinfo and onnxruntime crashes on import.
    [ "${qv:-0}" -lt 8 ] && DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get install -y -qq -t bookworm-backports qemu-user-static
  fi
  [ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  local h
  for h in qemu-aarch64 qemu-arm; do   # zero2w (arm64) and zero-w (armel) root filesystems
    [ -e "/proc/sys/fs/binfmt_misc/$h" ] && continue
    # QEMU >= 8 (qemu-user-binfmt) ships systemd binfmt.d files; 7.2 registers through binfmt-support.
    if [ -f "/usr/lib/binfmt.d/$h.conf" ] && [ -x /lib/systemd/systemd-binfmt ]; then
      /lib/systemd/systemd-binfmt "/usr/lib/binfmt.d/$h.conf"
    else
      update-binfmts --enable "$h" || update-binfmts --enable
    fi
  done
  if ! "$venv/bin/ansible-playbook" --version >/dev/null 2>&1 || \
     ! cmp -s "$repo/ansible/requirements.txt" "$venv/.requirements.txt"; then
    /usr/bin/python3 -m venv "$venv"
    timeout 1200 "$venv/bin/pip" install -q -r "$repo/ansible/requirements.txt"
    cp "$repo/ansible/requirements.txt" "$venv/.requirements.txt"
  fi
  [ -f "$repo/models/minilm-int8/manifest.json" ] || timeout 1800 "$repo/scripts/build-model"
}

fast() { timeout 1200 "$py" -m pytest -q tests/test_ansible.py tests/test_firstboot.py; }
converge() {  # converge BOARD
  MEMENTO_IMAGE_BOARD="$1" MEMENTO_APPLIANCE=1 timeout 3600 "$py" -m pytest -q tests/test_ansible.py \
    -k 'converge or service or files or model or config or unit or installed or python or armv6'
}
image() {  # image BOARD
  timeout 5400 "$repo/image/build.sh" --board "$1" --profile "$MEMENTO_IMAGE_PROFILE"
}
boot() {  # boot BOARD
  local img
  # shellcheck source=image/boards.sh
  source "$repo/image/boards.sh"
  board_config "$1"
  if [ "$MEMENTO_IMAGE_PROFILE" = full ]; then
    img="$(ls -1t "$repo"/image/out/memento-edge-*-"$BOARD_SLUG-$BOARD_ARCH".img | head -1)"
  else
    img="$(ls -1t "$repo"/image/out/memento-edge-*-"$BOARD_ARCH"-reduced.img | head -1)"
  fi
  if [ "$1" = zero-w ]; then
    timeout 5400 "$repo/image/boot-test.sh" "$img" --requests "${MEMENTO_CI_ZERO_W_REQUESTS:-100}"
  else
    # --provision: the "provision a live Pi" path, the only run of the role's tasks that need a running system.
    timeout 3000 "$repo/image/boot-test.sh" "$img" --requests "${MEMENTO_CI_BOOT_REQUESTS:-1000}" --provision
  fi
}

write_times() {
  {
    printf '{'
    local sep=""
    for s in "${order[@]}"; do printf '%s"%s": %d' "$sep" "$s" "${took[$s]}"; sep=", "; done
    printf '}\n'
  } > "$times"
  log "stage seconds: $(cat "$times")"
}
trap write_times EXIT

stage setup setup
case "$mode" in
  --setup) ;;
  --fast) stage fast fast ;;
  --no-image)
    stage fast fast
    for b in $boards; do stage "converge-$b" converge "$b"; done
    ;;
  --all)
    stage fast fast
    for b in $boards; do
      stage "converge-$b" converge "$b"
      stage "image-$b" image "$b"
      stage "boot-$b" boot "$b"
    done
    ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
