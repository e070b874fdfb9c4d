#!/bin/bash
# Run memento-edge's benchmark in an emulated Debian bookworm arm64 rootfs (Pi Zero 2 W, Cortex-A53).
#
#   bench/qemu/run-aarch64.sh [--profile emulated|short|full] [--out-dir DIR] [--timeout SECONDS] [-- BENCH_ARGS...]
#
# Builds/reuses the arm64 rootfs (build-rootfs.sh), installs the project wheel with aarch64 wheels
# from PyPI (onnxruntime, sqlite-vec, tokenizers, numpy) in a venv inside it, copies the model dir
# in, checks sqlite-vec's vec_version() and the golden embedding against the host (cosine >= 0.999),
# measures the emulator's RSS baseline, then runs `python -m bench --platform aarch64-qemu` under
# qemu-aarch64 with QEMU_CPU=cortex-a53 (the default `max` CPU has dot-product instructions the A53
# lacks, and onnxruntime would use them). Writes DIR/<date>-aarch64-qemu.{json,md} (default DIR
# bench/results) with an "emulation" block. Needs root. Exit: 0 ok, 3 check failed, 4 bench failed.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

parse_run_args "$@"
# shellcheck disable=SC2034  # the T_* settings are read by run_target (lib.sh)
{
    T_NAME=aarch64 T_ARCH=arm64 T_CPU=cortex-a53
    T_VENV_ARGS="" T_PIP_ARGS=""
    T_BACKEND=onnxruntime T_NEED_VEC=1
    T_BASE_MODS="numpy onnxruntime sqlite3 tokenizers"
}
run_target
