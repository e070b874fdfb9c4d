# shellcheck shell=bash
# Shared helpers for the bench/qemu scripts. Sourced, never executed.
#
# Everything here runs as root on a Debian bookworm x86_64 host: debootstrap, chroot and
# mount need it. State lives under $QEMU_CACHE (default bench/qemu/cache/, gitignored).

set -euo pipefail

QEMU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$QEMU_DIR/../.." && pwd)"
QEMU_CACHE="${MEMENTO_QEMU_CACHE:-$QEMU_DIR/cache}"
DEBIAN_SUITE="${MEMENTO_QEMU_SUITE:-bookworm}"
DEBIAN_MIRROR="${MEMENTO_QEMU_MIRROR:-http://deb.debian.org/debian}"
# The project's Python on the host (Debian's 3.11 venv; its sqlite3 can load extensions).
HOST_PYTHON="${MEMENTO_HOST_PYTHON:-$REPO_ROOT/.venv/bin/python}"
# Where the int8 model dir is taken from (platform-neutral; copied into the rootfs).
MODEL_SRC="${MEMENTO_QEMU_MODEL_DIR:-${MEMENTO_MODEL_DIR:-$REPO_ROOT/models/minilm-int8}}"
# request_timeout written into the guest's /etc/memento-edge/config.yaml (seconds).
GUEST_REQUEST_TIMEOUT="${MEMENTO_QEMU_REQUEST_TIMEOUT:-900}"

log() { printf '[qemu %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot and mount need it)"
}

# qemu_major: major version of the installed qemu-user, 0 when absent.
qemu_major() {
    local v
    v="$(qemu-aarch64 --version 2>/dev/null | sed -n 's/^qemu-aarch64 version \([0-9]*\)\..*/\1/p')"
    echo "${v:-0}"
}

# ensure_host_tools: debootstrap + qemu-user (static) + the binfmt handlers.
# QEMU >= 8 is preferred: 7.2 (bookworm) passes the host's x86 /proc/cpuinfo and /sys through,
# which makes onnxruntime segfault on import; QEMU 10 from bookworm-backports emulates cpuinfo
# and ran int8 inference 2.6x faster on this hardware. Set MEMENTO_QEMU_NO_INSTALL=1 to only check.
ensure_host_tools() {
    local want_install=0
    command -v debootstrap >/dev/null || want_install=1
    [ "$(qemu_major)" -ge 8 ] || want_install=1
    if [ "$want_install" = 1 ] && [ "${MEMENTO_QEMU_NO_INSTALL:-0}" != 1 ]; then
        log "installing host tools (debootstrap, qemu-user-static)"
        local bpo=/etc/apt/sources.list.d/memento-bookworm-backports.sources
        if [ ! -e "$bpo" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            cat >"$bpo" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        fi
        timeout 600 apt-get update -qq || log "apt-get update reported errors (continuing)"
        DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq debootstrap
        if apt-cache policy qemu-user-static | grep -q 'bookworm-backports'; then
            DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq -t bookworm-backports qemu-user-static
        else
            log "bookworm-backports unreachable: falling back to QEMU 7.2 (chroot runs without /sys)"
            DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq qemu-user-static binfmt-support
        fi
    fi
    command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
    command -v qemu-aarch64-static >/dev/null || die "qemu-user-static missing"
    ensure_binfmt
}

# ensure_binfmt: binfmt_misc is not mounted on a fresh machine, and nothing (no systemd) registers
# the handlers. Register qemu-aarch64 and qemu-arm with the F flag (interpreter opened at
# registration, so the chroot needs no copy of qemu).
ensure_binfmt() {
    local bm=/proc/sys/fs/binfmt_misc name conf
    [ -e "$bm/register" ] || mount -t binfmt_misc binfmt_misc "$bm" || die "cannot mount binfmt_misc"
    for name in aarch64 arm; do
        [ -e "$bm/qemu-$name" ] && continue
        conf="/usr/lib/binfmt.d/qemu-$name.conf"
        if [ -f "$conf" ] && [ -x /lib/systemd/systemd-binfmt ]; then
            /lib/systemd/systemd-binfmt "$conf"                 # QEMU >= 8 (qemu-user-binfmt)
        elif command -v update-binfmts >/dev/null; then
            update-binfmts --enable "qemu-$name" || true        # QEMU 7.2 (binfmt-support)
        fi
        [ -e "$bm/qemu-$name" ] || die "binfmt handler qemu-$name not registered"
    done
    [ "$(cat "$bm/status")" = enabled ] || echo 1 >"$bm/status"
}

# rootfs_key ARCH: hash of everything the rootfs is built from (the builder, the package list,
# suite and mirror). A change in any of them builds a fresh rootfs next to the old one. The run
# logic in this file is not part of it: runs stage their files into /opt/memento afresh.
rootfs_key() {
    local arch=$1
    cat "$QEMU_DIR/build-rootfs.sh" "$QEMU_DIR/packages-$arch.txt" \
        | { cat; printf '%s\n%s\n' "$DEBIAN_SUITE" "$DEBIAN_MIRROR"; } | sha256sum | cut -c1-16
}

rootfs_dir() { echo "$QEMU_CACHE/rootfs-$1-$DEBIAN_SUITE-$(rootfs_key "$1")"; }

# in_chroot ROOT [--no-sys] -- CMD...: run CMD inside ROOT in a private mount namespace, so /proc,
# /dev and /sys mounts vanish when the command ends, even on kill. The environment is clean
# (the host's pip config points at paths that do not exist in the rootfs); pass extra variables
# via the CHROOT_ENV array (NAME=VALUE words); CHROOT_TIMEOUT bounds the run (default 3600 s).
in_chroot() {
    local root=$1; shift
    local with_sys=1
    if [ "${1:-}" = --no-sys ]; then with_sys=0; shift; fi
    [ "${1:-}" = -- ] && shift
    # QEMU 7.2 shows the host's /sys (x86 topology) to the guest: onnxruntime crashes on it.
    [ "$(qemu_major)" -ge 8 ] || with_sys=0
    local envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
                SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt PIP_CERT=/etc/ssl/certs/host-ca.crt
                PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PYTHONDONTWRITEBYTECODE=1)
    if [ -n "${CHROOT_ENV+x}" ]; then envs+=("${CHROOT_ENV[@]}"); fi
    # pip needs the host's CA bundle (this network re-signs TLS); copied fresh on every entry.
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        mkdir -p "$root/etc/ssl/certs"
        cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/host-ca.crt"
    fi
    # shellcheck disable=SC2016  # the inner script expands its own positional parameters
    timeout "${CHROOT_TIMEOUT:-3600}" unshare --mount --propagation private -- /bin/bash -euc '
        root=$1; with_sys=$2; shift 2
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        if [ "$with_sys" = 1 ]; then mount --rbind /sys "$root/sys"; fi
        exec chroot "$root" /usr/bin/env -i "$@"
    ' in_chroot "$root" "$with_sys" "${envs[@]}" "$@"
}

# build_project_wheel OUTDIR: the project's own wheel (pure Python), built from a copy of the tree
# so nothing (build/, *.egg-info) is written into the work tree other helpers share.
build_project_wheel() {
    local out=$1 src
    src="$(mktemp -d)"
    cp -a "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/memento_edge" "$src/"
    # pyproject names README.md; a stub keeps the build going before the README exists.
    cp "$REPO_ROOT/README.md" "$src/" 2>/dev/null || echo "# memento-edge" >"$src/README.md"
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    mkdir -p "$out"
    # setuptools' deprecation banners are noise here: keep them in a log, show it on failure.
    timeout 600 "$HOST_PYTHON" -m pip wheel -q --no-deps -w "$out" "$src" >"$QEMU_CACHE/wheel-build.log" 2>&1 \
        || { tail -30 "$QEMU_CACHE/wheel-build.log" >&2; rm -rf "$src"; die "pip wheel of the project failed"; }
    rm -rf "$src"
    ls "$out"/memento_edge-*.whl >/dev/null || die "no memento_edge wheel in $out"
}

# stage_project ROOT: fresh /opt/memento in the rootfs with the project wheel, the bench package,
# the probe script and the model dir at src/models/minilm-int8 (the bench's default location).
stage_project() {
    local root=$1 dst
    dst="$root/opt/memento"
    [ -f "$MODEL_SRC/manifest.json" ] \
        || die "model dir $MODEL_SRC missing: build it with \`memento-edge model build --keep-fp32\` (or set MEMENTO_QEMU_MODEL_DIR)"
    rm -rf "$dst"
    mkdir -p "$dst/wheels" "$dst/src/models" "$dst/out"
    build_project_wheel "$dst/wheels"
    # The bench package without this directory (cache, rootfs) and without old results.
    tar -C "$REPO_ROOT" --exclude=bench/qemu --exclude=bench/results --exclude=__pycache__ -cf - bench \
        | tar -C "$dst/src" -xf -
    cp "$QEMU_DIR/guest_check.py" "$dst/guest_check.py"
    # The guest's device config: emulation is 10-100x slower than the board, so the embedder's
    # request_timeout (30 s by default; the bench reads /etc/memento-edge/config.yaml and no env)
    # would stop long-text embeds. Only this setting differs; the emulation block records it.
    mkdir -p "$root/etc/memento-edge"
    printf '# written by bench/qemu/lib.sh: emulated runs only\nrequest_timeout: %s\n' \
        "$GUEST_REQUEST_TIMEOUT" >"$root/etc/memento-edge/config.yaml"
    cp -a "$MODEL_SRC" "$dst/src/models/minilm-int8"
    # LoCoMo dev data for the quality section: bench.quality looks beside the checkout (src/..).
    local cand
    for cand in "$REPO_ROOT/../shared/data/locomo-dev" /work/shared/data/locomo-dev; do
        if [ -d "$cand" ]; then
            mkdir -p "$dst/shared/data" && cp -a "$cand" "$dst/shared/data/locomo-dev"
            break
        fi
    done
}

# qemu_version_string: "10.0.2 (Debian 1:10.0.2+ds-...)".
qemu_version_string() { qemu-aarch64 --version | sed -n 's/^qemu-aarch64 version //p'; }

# run_target: the whole emulated run for one board. The caller sets:
#   T_NAME        aarch64 | armv6 (results are <date>-T_NAME-qemu.{json,md})
#   T_ARCH        Debian arch of the rootfs (arm64 | armel)
#   T_CPU         QEMU CPU model (cortex-a53 | arm1176)
#   T_VENV_ARGS   extra `python3 -m venv` arguments (e.g. --system-site-packages)
#   T_PIP_ARGS    extra `pip install` arguments for the project wheel (e.g. --no-deps --no-index)
#   T_BACKEND     embedder backend the guest must pick (onnxruntime | numpy-int8)
#   T_NEED_VEC    1 when sqlite-vec must load in the guest
#   T_BASE_MODS   modules the RSS baseline imports (the ones the bench's process imports natively)
#   PROFILE OUT_DIR DATE_TAG BENCH_TIMEOUT BENCH_ARGS (set by parse_run_args)
# Exit codes: 0 ok, 3 golden/vec check failed, 4 bench failed or wrote no result.
run_target() {
    local t0 root dst work guest_py result_prefix
    t0=$(date +%s)
    need_root
    ensure_host_tools
    root="$("$QEMU_DIR/build-rootfs.sh" "$T_ARCH")"
    dst="$root/opt/memento"
    work="$(mktemp -d "${TMPDIR:-/tmp}/memento-qemu-$T_NAME.XXXXXX")"
    mkdir -p "$OUT_DIR"

    log "staging project into $dst"
    stage_project "$root"
    log "creating venv + installing the project in the guest (emulated pip)"
    # shellcheck disable=SC2086  # T_VENV_ARGS / T_PIP_ARGS are word lists on purpose
    CHROOT_ENV=()
    in_chroot "$root" -- /bin/sh -ec "
        python3 -m venv $T_VENV_ARGS /opt/memento/venv
        /opt/memento/venv/bin/pip install -q --cache-dir /var/cache/memento-pip $T_PIP_ARGS /opt/memento/wheels/memento_edge-*.whl
    " || die "pip install in the $T_ARCH rootfs failed"
    local t_setup=$(( $(date +%s) - t0 ))

    # From here on every guest process runs on the board's CPU model. QEMU_CPU is read by the
    # emulator that binfmt_misc starts (the environment passes through the kernel's exec).
    CHROOT_ENV=(QEMU_CPU="$T_CPU" MEMENTO_MODEL_DIR=/opt/memento/src/models/minilm-int8)
    guest_py=/opt/memento/venv/bin/python

    # The host's reference is the exact int8 arithmetic (numpy runtime), not the host's onnxruntime:
    # on x86 CPUs without VNNI onnxruntime saturates some int8 dot products (tests/hardware.py).
    log "golden check: host exact int8 vs guest ($T_CPU)"
    "$HOST_PYTHON" "$QEMU_DIR/guest_check.py" embed --exact "$MODEL_SRC" >"$work/host-golden.json" \
        || die "host golden embedding failed"
    CHROOT_TIMEOUT=1800 in_chroot "$root" -- \
        "$guest_py" /opt/memento/guest_check.py embed /opt/memento/src/models/minilm-int8 \
        >"$work/guest-golden.json" || die "guest golden embedding failed (see above)"
    "$HOST_PYTHON" "$QEMU_DIR/emulation.py" check "$work/host-golden.json" "$work/guest-golden.json" \
        --backend "$T_BACKEND" --need-vec "$T_NEED_VEC" --cpu "$T_CPU" --out "$work/check.json" \
        || { log "golden/vec check FAILED"; return 3; }

    log "RSS baseline: the emulator running python importing: $T_BASE_MODS"
    # shellcheck disable=SC2086
    CHROOT_TIMEOUT=1800 in_chroot "$root" -- \
        "$guest_py" /opt/memento/guest_check.py baseline $T_BASE_MODS >"$work/baseline.json" \
        || die "RSS baseline run failed"

    log "bench: profile $PROFILE under qemu ($T_CPU), timeout ${BENCH_TIMEOUT}s"
    local t_bench0 rc=0
    t_bench0=$(date +%s)
    result_prefix="/opt/memento/out/result"
    local extra=""
    if [ "${#BENCH_ARGS[@]}" -gt 0 ]; then extra="$(printf ' %q' "${BENCH_ARGS[@]}")"; fi
    CHROOT_TIMEOUT="$BENCH_TIMEOUT" in_chroot "$root" -- /bin/sh -ec "
        cd /opt/memento/src
        exec $guest_py -m bench --profile $PROFILE --platform $T_NAME-qemu --out $result_prefix$extra
    " || rc=$?
    local t_bench=$(( $(date +%s) - t_bench0 ))
    local out_base="$OUT_DIR/$DATE_TAG-$T_NAME-qemu"
    if [ ! -s "$dst/out/result.json" ]; then
        log "bench exited $rc and wrote no result.json"
        return 4
    fi
    cp "$dst/out/result.json" "$out_base.json"
    cp "$dst/out/result.md" "$out_base.md" 2>/dev/null || : >"$out_base.md"
    "$HOST_PYTHON" "$QEMU_DIR/emulation.py" annotate "$out_base.json" "$out_base.md" \
        --check "$work/check.json" --baseline "$work/baseline.json" --qemu-version "$(qemu_version_string)" \
        --cpu "$T_CPU" --arch "$T_ARCH" --setup-seconds "$t_setup" --bench-seconds "$t_bench" \
        --bench-exit "$rc" --guest-config "request_timeout: $GUEST_REQUEST_TIMEOUT" || die "annotating $out_base.json failed"
    rm -rf "$work"
    log "wrote $out_base.json and $out_base.md (bench exit $rc, ${t_bench}s; total $(( $(date +%s) - t0 ))s)"
    [ "$rc" = 0 ] || return 4
}

# parse_run_args "$@": the options shared by run-aarch64.sh and run-armv6.sh.
parse_run_args() {
    PROFILE="${PROFILE:-emulated}"
    OUT_DIR="${OUT_DIR:-$REPO_ROOT/bench/results}"
    DATE_TAG="${DATE_TAG:-$(date -u +%F)}"
    BENCH_TIMEOUT="${MEMENTO_QEMU_BENCH_TIMEOUT:-5400}"
    BENCH_ARGS=()
    while [ $# -gt 0 ]; do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --profile) PROFILE=${2:?--profile needs a value}; shift 2 ;;
            --profile=*) PROFILE=${1#*=}; shift ;;
            --out-dir) OUT_DIR=${2:?--out-dir needs a value}; shift 2 ;;
            --out-dir=*) OUT_DIR=${1#*=}; shift ;;
            --timeout) BENCH_TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
            --) shift; BENCH_ARGS=("$@"); break ;;
            *) usage >&2; die "unknown argument: $1" ;;
        esac
    done
    OUT_DIR="$(mkdir -p "$OUT_DIR" && cd "$OUT_DIR" && pwd)"
}
