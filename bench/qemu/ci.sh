#!/bin/bash
# What CI runs for "benchmarks under QEMU": both emulated benches in a short profile.
#
#   bench/qemu/ci.sh [--out-dir DIR] [--profile NAME] [--only aarch64|armv6]
#
# Builds (or reuses, from $MEMENTO_QEMU_CACHE) the arm64 and armel rootfs in parallel, then runs
# run-aarch64.sh and run-armv6.sh one after the other with the bench's `emulated` profile limited to
# the sections in $MEMENTO_QEMU_CI_SECTIONS (default cold_start,store: start-up, remember, and
# recall in hybrid / vector / keyword mode at 100 memories; no fp32 baseline, no LoCoMo), and
# verifies each run: result .json and .md present, golden vector + sqlite-vec check passed, bench
# exit 0, no section reporting an error. Timings never fail it. Results go to DIR (default
# $MEMENTO_QEMU_CACHE/ci-results, so CI never writes into bench/results). Exit 1 if anything failed.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

out_dir="$QEMU_CACHE/ci-results" profile=emulated only=""
sections="${MEMENTO_QEMU_CI_SECTIONS:-cold_start,store}"
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out-dir) out_dir=${2:?}; shift 2 ;;
        --profile) profile=${2:?}; shift 2 ;;
        --only) only=${2:?}; shift 2 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

need_root
t0=$(date +%s)
ensure_host_tools
mkdir -p "$out_dir"
date_tag="ci"

# The two rootfs builds are mostly download + dpkg under emulation: overlap them.
pids=()
for arch in arm64 armel; do
    if [ "$only" = aarch64 ] && [ "$arch" = armel ]; then continue; fi
    if [ "$only" = armv6 ] && [ "$arch" = arm64 ]; then continue; fi
    "$QEMU_DIR/build-rootfs.sh" "$arch" >/dev/null &
    pids+=("$!")
done
for pid in "${pids[@]}"; do wait "$pid" || die "rootfs build failed"; done
t_rootfs=$(( $(date +%s) - t0 ))

status=0
declare -A took
for target in aarch64 armv6; do
    if [ -n "$only" ] && [ "$only" != "$target" ]; then continue; fi
    t=$(date +%s)
    rc=0
    DATE_TAG=$date_tag "$QEMU_DIR/run-$target.sh" --profile "$profile" --out-dir "$out_dir" \
        -- --sections "$sections" --sizes 100 --quality none --skip-baseline || rc=$?
    took[$target]=$(( $(date +%s) - t ))
    if [ "$rc" != 0 ]; then
        log "$target: run exited $rc"
        status=1
    fi
    "$HOST_PYTHON" "$QEMU_DIR/emulation.py" verify "$out_dir/$date_tag-$target-qemu" || status=1
done

log "wall time: rootfs ${t_rootfs}s, aarch64 ${took[aarch64]:--}s, armv6 ${took[armv6]:--}s," \
    "total $(( $(date +%s) - t0 ))s"
if [ "$status" = 0 ]; then log "qemu benches: OK"; else log "qemu benches: FAILED"; fi
exit "$status"
