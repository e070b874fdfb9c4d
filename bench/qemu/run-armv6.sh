#!/bin/bash
# Run memento-edge's benchmark in an emulated Debian bookworm armel rootfs (Pi Zero / Zero W, ARM1176).
#
#   bench/qemu/run-armv6.sh [--profile emulated|short|full] [--out-dir DIR] [--timeout SECONDS] [-- BENCH_ARGS...]
#
# No PyPI wheels exist for armv6l, so Python, numpy, Flask, waitress, PyYAML, click and SQLite (with
# FTS5) come from Debian; the project wheel goes in with `pip install --no-deps` into a venv with
# --system-site-packages. Without onnxruntime/tokenizers the embedder is the numpy int8 fallback and,
# without sqlite-vec, the store uses its numpy vector index. Checks the fallback's golden embedding
# against the host's onnxruntime int8 vector (cosine >= 0.999), then runs `python -m bench
# --platform armv6-qemu` under qemu-arm with QEMU_CPU=arm1176. Writes DIR/<date>-armv6-qemu.{json,md}
# (default DIR bench/results). Needs root. Exit: 0 ok, 3 check failed, 4 bench failed.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

parse_run_args "$@"
# shellcheck disable=SC2034  # the T_* settings are read by run_target (lib.sh)
{
    T_NAME=armv6 T_ARCH=armel T_CPU=arm1176
    T_VENV_ARGS="--system-site-packages" T_PIP_ARGS="--no-deps --no-index"
    T_BACKEND=numpy-int8 T_NEED_VEC=0
    T_BASE_MODS="numpy sqlite3"
}
run_target
