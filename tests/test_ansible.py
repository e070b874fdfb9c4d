"""Checks of the appliance's Ansible role (ansible/) and first-boot script (image/files/firstboot/).

Fast checks (always run when the Ansible venv exists): ``ansible-playbook --syntax-check``, ``ansible-lint``
(production profile, no skip list). The first-boot file parser has its own tests (tests/test_firstboot.py).

Slow checks (``MEMENTO_APPLIANCE=1``, run by ``scripts/ci-appliance.sh``): converge the role into an
emulated Debian bookworm root filesystem of the board ``MEMENTO_IMAGE_BOARD`` names (``zero2w``: arm64,
Python dependencies from PyPI; ``zero-w``: armel with the CPU model ARM1176, so ``uname -m`` says armv6l as
on a Pi Zero W and the role takes Debian's packages), through mmdebstrap + qemu-user and the
``community.general.chroot`` connection; converge again and require ``changed=0``, then inspect the files,
the user, the unit, the permissions and the Python environment it left. The armel root filesystem stands
in for Raspberry Pi OS Lite (32-bit), which is not available here. Needs root, binfmt_misc with
qemu-aarch64 / qemu-arm, and the network to PyPI and Debian.

The Ansible tools live in their own venv (``.cache/ansible-venv``; ``scripts/ci-appliance.sh --setup``
makes it) so they never mix with the project's runtime dependencies.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, Iterator

import pytest
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ANSIBLE_DIR = REPO / "ansible"
ANSIBLE_VENV = Path(os.environ.get("MEMENTO_ANSIBLE_VENV", REPO / ".cache" / "ansible-venv"))
ANSIBLE_BIN = ANSIBLE_VENV / "bin"
MODEL_DIR = Path(os.environ.get("MEMENTO_MODEL_SRC", REPO / "models" / "minilm-int8"))
SLOW = os.environ.get("MEMENTO_APPLIANCE") == "1"
BOARD = os.environ.get("MEMENTO_IMAGE_BOARD", "zero2w")

needs_ansible = pytest.mark.skipif(
    not (ANSIBLE_BIN / "ansible-playbook").exists(),
    reason=f"no Ansible venv at {ANSIBLE_VENV}: run scripts/ci-appliance.sh --setup",
)


def _board_facts(board: str) -> Dict[str, str]:
    """image/boards.sh's facts for ``board`` (BOARD_ARCH, BOARD_QEMU_CPU, ...): the one table, read via bash."""
    res = subprocess.run(["bash", "-c", 'source image/boards.sh && board_config "$1" && env', "_", board],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return dict(ln.split("=", 1) for ln in res.stdout.splitlines() if ln.startswith("BOARD_"))


def test_board_table_names_both_boards() -> None:
    """zero2w is the arm64 board, zero-w the armv6 one; an unknown board is refused."""
    assert _board_facts("zero2w")["BOARD_ARCH"] == "arm64"
    zero_w = _board_facts("zero-w")
    assert (zero_w["BOARD_ARCH"], zero_w["BOARD_UNAME"], zero_w["BOARD_KERNEL"]) == ("armel", "armv6l",
                                                                                      "linux-image-rpi")
    res = subprocess.run(["bash", "-c", "source image/boards.sh && board_config zero-x"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "unknown board: zero-x" in res.stderr


def _ansible_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ANSIBLE_DIR / "ansible.cfg")
    env["PATH"] = f"{ANSIBLE_BIN}:{env.get('PATH', '')}"
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    return env


# --- fast ---------------------------------------------------------------------------------------------------
@needs_ansible
def test_playbook_syntax_check() -> None:
    """site.yml with the role parses (ansible-playbook --syntax-check)."""
    res = subprocess.run([str(ANSIBLE_BIN / "ansible-playbook"), "--syntax-check", "site.yml"],
                         cwd=ANSIBLE_DIR, env=_ansible_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_ansible
def test_ansible_lint_production_profile() -> None:
    """ansible-lint passes at the strictest (production) profile with no rule skipped."""
    res = subprocess.run([str(ANSIBLE_BIN / "ansible-lint"), "--profile", "production", "site.yml"],
                         cwd=ANSIBLE_DIR, env=_ansible_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def test_role_variables_are_prefixed() -> None:
    """Every default of the role is named memento_edge_* (no collisions with other roles)."""
    defaults = (ANSIBLE_DIR / "roles/memento_edge/defaults/main.yml").read_text()
    names = re.findall(r"^([A-Za-z_][A-Za-z0-9_]*):", defaults, flags=re.M)
    assert names, "no variables found"
    assert [n for n in names if not n.startswith("memento_edge_")] == []


def test_role_service_defaults_agree_with_the_settings_table() -> None:
    """The role's service defaults are valid settings, and the per-client cap is below the connection limit
    (the role's limit, 16, was below the settings default cap, 20: one address could hold every socket)."""
    import yaml

    from memento_edge.config import SETTINGS, Settings

    defaults = yaml.safe_load((ANSIBLE_DIR / "roles/memento_edge/defaults/main.yml").read_text())
    tasks = (ANSIBLE_DIR / "roles/memento_edge/tasks/config.yml").read_text()
    role = {s.name: defaults[f"memento_edge_{s.name}"] for s in SETTINGS
            if f"memento_edge_{s.name}" in defaults and s.name != "tokens"}  # tokens: only digests are written
    assert {"connection_limit", "connections_per_client", "threads", "rss_limit_mb"} <= set(role)
    for name in role:  # each one is written to config.yaml
        assert re.search(rf"'{name}': memento_edge_{name}\b", tasks), name
    settings = Settings.load(env={"MEMENTO_CONFIG": ""}).replace(**role)
    assert settings.connections_per_client < settings.connection_limit


# --- slow: converge into an emulated arm64 root filesystem -----------------------------------------------------
def _run_playbook(rootfs: Path, wheel: Path, log: Path) -> str:
    inventory = rootfs.parent / "inventory.yml"
    inventory.write_text(
        "memento_edge:\n  hosts:\n"
        f"    {rootfs}:\n      ansible_connection: community.general.chroot\n"
        "      ansible_python_interpreter: /usr/bin/python3\n")
    cmd = [str(ANSIBLE_BIN / "ansible-playbook"), "-i", str(inventory), "site.yml",
           "-e", f"memento_edge_wheel_src={wheel}", "-e", f"memento_edge_model_src={MODEL_DIR}",
           "-e", "memento_edge_pip_cert=/etc/ssl/certs/host-ca-bundle.crt",
           "-e", "memento_edge_generated_token_file=/etc/memento-edge/initial-token"]
    env = _ansible_env()
    # Read by the qemu-user that binfmt_misc starts for every guest binary: the board's CPU (on zero-w the
    # role's `uname -m` then says armv6l, as on a Pi Zero W).
    env["QEMU_CPU"] = _board_facts(BOARD)["BOARD_QEMU_CPU"]
    res = subprocess.run(cmd, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=3600)
    log.write_text(res.stdout + res.stderr)
    assert res.returncode == 0, f"converge failed (log {log}):\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _recap(stdout: str) -> Dict[str, int]:
    line = [ln for ln in stdout.splitlines() if re.search(r"\bok=\d+", ln)][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


# --- the device's pinned dependencies -------------------------------------------------------------------------
LOCK = ANSIBLE_DIR / "roles" / "memento_edge" / "files" / "requirements-device.txt"
# Declared by a pinned package but deliberately not installed on the device (reason in the lock file).
LOCK_LEFT_OUT = {"huggingface-hub"}


def _lock_pins() -> Dict[str, str]:
    """{canonical name: pinned version} from requirements-device.txt (every line must be `name==version`)."""
    from packaging.requirements import Requirement

    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line}"
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def test_lock_pins_every_direct_dependency() -> None:
    """Every run-time dependency in pyproject.toml is pinned in the device lock."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _lock_pins()
    missing = [d for d in deps if canonicalize_name(Requirement(d).name) not in pins]
    assert not missing, f"pyproject dependencies not pinned in {LOCK.name}: {missing}"


def test_lock_matches_the_tested_versions() -> None:
    """The device gets exactly the versions this test run uses."""
    from importlib.metadata import version

    pins = _lock_pins()
    wrong = {n: (v, version(n)) for n, v in pins.items() if version(n) != v}
    assert not wrong, f"lock pin vs installed here: {wrong}"


def test_lock_is_closed_under_dependencies() -> None:
    """Installing the lock with --no-deps leaves nothing out except the documented exclusions."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    pins = _lock_pins()
    missing = set()
    for name in pins:
        for spec in requires(name) or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(req.name) not in pins and canonicalize_name(req.name) not in LOCK_LEFT_OUT:
                missing.add(f"{name} -> {req.name}")
    assert not missing, f"dependencies missing from {LOCK.name}: {sorted(missing)}"


def test_tokenizer_works_without_huggingface_hub() -> None:
    """The engine's tokenizer path never imports huggingface_hub (so leaving it off the device is safe)."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'huggingface_hub': raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from tokenizers import Tokenizer\n"
        f"t = Tokenizer.from_file({str(MODEL_DIR / 'tokenizer.json')!r})\n"
        "assert t.encode('buy food').ids\n"
        "import memento_edge.embedder, memento_edge.web\n"
        "assert 'huggingface_hub' not in sys.modules\n"
    )
    if not (MODEL_DIR / "tokenizer.json").exists():
        pytest.fail(f"model dir {MODEL_DIR} missing: run scripts/build-model")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def converged(tmp_path_factory) -> Iterator[Dict[str, object]]:  # noqa: ANN001
    """Two converges of the role into a fresh rootfs of BOARD; yields paths and both outputs.

    The rootfs is image/rootfs.sh's tarball for MEMENTO_IMAGE_PROFILE (default full) and BOARD, the same one
    the image build starts from, so CI installs Debian under emulation once for both.
    """
    if not SLOW:
        pytest.skip("set MEMENTO_APPLIANCE=1")
    assert os.geteuid() == 0, "the converge test needs root (chroot)"
    assert (MODEL_DIR / "manifest.json").exists(), f"model dir {MODEL_DIR} missing: run scripts/build-model"
    # (Path("") is Path("."), which is truthy: test the variable, not the Path.)
    env_dir = os.environ.get("MEMENTO_CONVERGE_DIR")
    work = Path(env_dir).resolve() if env_dir else tmp_path_factory.mktemp("converge")
    work.mkdir(parents=True, exist_ok=True)
    dist = work / "dist"
    dist.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                   check=True, timeout=600)
    wheel = sorted(dist.glob("memento_edge-*.whl"))[-1]
    tarball = work / "rootfs.tar"
    profile = os.environ.get("MEMENTO_IMAGE_PROFILE", "full")
    subprocess.run([str(REPO / "image/rootfs.sh"), profile, str(tarball), BOARD], check=True, timeout=3600)
    rootfs = work / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    rootfs.mkdir()
    with tarfile.open(tarball) as tf:
        tf.extractall(rootfs, numeric_owner=True)  # noqa: S202 - our own mmdebstrap output
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/host-ca-bundle.crt")
    resolv = rootfs / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    shutil.copy("/etc/resolv.conf", resolv)
    mounts = [rootfs / "proc", rootfs / "dev"]
    subprocess.run(["mount", "-t", "proc", "proc", str(mounts[0])], check=True)
    subprocess.run(["mount", "--bind", "/dev", str(mounts[1])], check=True)
    try:
        first = _run_playbook(rootfs, wheel, work / "converge-1.log")
        second = _run_playbook(rootfs, wheel, work / "converge-2.log")
        yield {"rootfs": rootfs, "first": first, "second": second}
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", str(m)], check=False)


def _stat(path: Path) -> os.stat_result:
    return path.lstat()


def _owner(rootfs: Path, path: Path) -> str:
    """user:group of ``path`` resolved with the rootfs's own passwd/group files."""
    st = _stat(path)
    users = {int(f[2]): f[0] for f in (ln.split(":") for ln in (rootfs / "etc/passwd").read_text().splitlines())}
    groups = {int(f[2]): f[0] for f in (ln.split(":") for ln in (rootfs / "etc/group").read_text().splitlines())}
    return f"{users.get(st.st_uid, st.st_uid)}:{groups.get(st.st_gid, st.st_gid)}"


@pytest.mark.slow
def test_first_converge_changes_and_succeeds(converged) -> None:  # noqa: ANN001
    """The first converge into a fresh rootfs changes things and fails nothing."""
    recap = _recap(converged["first"])
    assert recap["failed"] == 0 and recap["unreachable"] == 0
    assert recap["changed"] > 0


@pytest.mark.slow
def test_second_converge_changes_nothing(converged) -> None:  # noqa: ANN001
    """Re-running the role is idempotent: changed=0."""
    recap = _recap(converged["second"])
    assert recap["failed"] == 0
    assert recap["changed"] == 0, converged["second"][-4000:]


@pytest.mark.slow
def test_service_user_is_unprivileged(converged) -> None:  # noqa: ANN001
    """memento-edge is a system user with no login shell and a locked password."""
    root: Path = converged["rootfs"]
    entry = [ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines() if ln.startswith("memento-edge:")]
    assert entry, "user memento-edge missing"
    uid, shell = int(entry[0][2]), entry[0][6]
    assert 0 < uid < 1000
    assert shell == "/usr/sbin/nologin"
    shadow = [ln.split(":") for ln in (root / "etc/shadow").read_text().splitlines() if ln.startswith("memento-edge:")]
    assert shadow[0][1] in ("!", "*", "!*")


@pytest.mark.slow
def test_files_and_permissions(converged) -> None:  # noqa: ANN001
    """Code and model are root-owned and read-only to the service; only the data dir is its own."""
    root: Path = converged["rootfs"]
    expect = {
        "opt/memento-edge/venv/bin/memento-edge": ("root:root", None),
        "opt/memento-edge/model": ("root:root", 0o755),
        "var/lib/memento-edge": ("memento-edge:memento-edge", 0o750),
        "var/lib/memento-edge/backups": ("memento-edge:memento-edge", 0o750),
        "etc/memento-edge": ("root:memento-edge", 0o750),
        "etc/memento-edge/config.yaml": ("root:memento-edge", 0o640),
        "etc/memento-edge/initial-token": ("root:root", 0o600),
        "etc/systemd/system/memento-edge.service": ("root:root", 0o644),
        "etc/systemd/journald.conf.d/memento-edge.conf": ("root:root", 0o644),
        "etc/avahi/services/memento.service": ("root:root", 0o644),
    }
    for rel, (owner, mode) in expect.items():
        p = root / rel
        assert p.exists(), f"/{rel} missing"
        assert _owner(root, p) == owner, f"/{rel}: owner {_owner(root, p)}, want {owner}"
        if mode is not None:
            assert _stat(p).st_mode & 0o7777 == mode, f"/{rel}: mode {oct(_stat(p).st_mode & 0o7777)}"


@pytest.mark.slow
def test_model_matches_manifest(converged) -> None:  # noqa: ANN001
    """Every file named in the model manifest is on the target with the same sha256; fp32/ is not copied."""
    root: Path = converged["rootfs"]
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    target = root / "opt/memento-edge/model"
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((target / name).read_bytes()).hexdigest() == digest, name
    assert not (target / "fp32").exists()


@pytest.mark.slow
def test_config_holds_only_token_digest(converged) -> None:  # noqa: ANN001
    """The generated token is shown once, stored root-only, and config.yaml holds only its sha256."""
    import yaml

    root: Path = converged["rootfs"]
    token = (root / "etc/memento-edge/initial-token").read_text().strip()
    cfg = yaml.safe_load((root / "etc/memento-edge/config.yaml").read_text())
    assert token not in (root / "etc/memento-edge/config.yaml").read_text()
    assert [t["sha256"] for t in cfg["tokens"]] == [hashlib.sha256(token.encode()).hexdigest()]
    assert cfg["home"] == "/var/lib/memento-edge" and cfg["model_dir"] == "/opt/memento-edge/model"
    assert token in converged["first"], "the generated token is shown to the operator on the first run"
    assert token not in converged["second"], "a re-run neither regenerates nor shows the token"


@pytest.mark.slow
def test_config_loads_with_project_settings(converged) -> None:  # noqa: ANN001
    """config.yaml uses only known settings: memento_edge.config.Settings.load accepts it."""
    from memento_edge.config import Settings

    root: Path = converged["rootfs"]
    s = Settings.load(config_file=str(root / "etc/memento-edge/config.yaml"), env={})
    assert s.port == 8077 and s.host == "0.0.0.0" and len(s.tokens) == 1


@pytest.mark.slow
def test_unit_is_hardened_and_enabled(converged) -> None:  # noqa: ANN001
    """The unit runs unprivileged with the hardening list and a memory ceiling, and is enabled."""
    root: Path = converged["rootfs"]
    unit = (root / "etc/systemd/system/memento-edge.service").read_text()
    for line in ("User=memento-edge", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "ReadWritePaths=/var/lib/memento-edge", "MemoryMax=200M",
                 "Restart=on-failure", "CapabilityBoundingSet=", "MemoryDenyWriteExecute=yes",
                 "ExecStart=/opt/memento-edge/venv/bin/memento-edge --config /etc/memento-edge/config.yaml serve"):
        assert re.search(rf"^{re.escape(line)}$", unit, flags=re.M), line
    wants = root / "etc/systemd/system/multi-user.target.wants/memento-edge.service"
    assert wants.is_symlink(), "memento-edge.service is not enabled"
    assert (root / "etc/systemd/system/timers.target.wants/memento-edge-backup.timer").is_symlink()


def _in_guest(root: Path, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``argv`` in the converged rootfs under qemu-user with the board's CPU model."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "QEMU_CPU": _board_facts(BOARD)["BOARD_QEMU_CPU"]}
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_python_dependencies_come_from_the_boards_source(converged) -> None:  # noqa: ANN001
    """armv6l (zero-w): Debian's numpy/Flask/... in a --system-site-packages venv; else a plain venv (PyPI)."""
    root: Path = converged["rootfs"]
    machine = _in_guest(root, "uname", "-m").stdout.strip()
    assert machine == _board_facts(BOARD)["BOARD_UNAME"]
    cfg = (root / "opt/memento-edge/venv/pyvenv.cfg").read_text()
    debian = machine == "armv6l"
    assert f"include-system-site-packages = {'true' if debian else 'false'}" in cfg, cfg
    code = ("import json, numpy, flask, waitress, yaml, click; "
            "print(json.dumps({m.__name__: m.__file__ for m in (numpy, flask, waitress, yaml, click)}))")
    res = _in_guest(root, "/opt/memento-edge/venv/bin/python", "-c", code)
    assert res.returncode == 0, res.stderr[-3000:]
    where = json.loads(res.stdout)
    wanted = "/usr/lib/python3/dist-packages/" if debian else "/opt/memento-edge/venv/lib/"
    assert all(path.startswith(wanted) for path in where.values()), where


@pytest.mark.slow
@pytest.mark.skipif(BOARD != "zero-w", reason="the armv6 board's backend (MEMENTO_IMAGE_BOARD=zero-w)")
def test_armv6_runs_the_numpy_backend(converged) -> None:  # noqa: ANN001
    """On armv6l the service's settings load the numpy int8 embedder and embed with the device's model."""
    root: Path = converged["rootfs"]
    code = ("import importlib.util as u, numpy as np; from memento_edge.config import Settings; "
            "from memento_edge.embedder import make_embedder; "
            "assert all(u.find_spec(m) is None for m in ('onnxruntime', 'tokenizers', 'sqlite_vec')); "
            "e = make_embedder(Settings.load(config_file='/etc/memento-edge/config.yaml', env={})); "
            "v = np.asarray(e.embed('the spare key is under the blue flower pot')); "
            "print(e.backend, v.shape[0], round(float(np.linalg.norm(v)), 3))")
    res = _in_guest(root, "/opt/memento-edge/venv/bin/python", "-c", code, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["numpy-int8", "384", "1.0"]


@pytest.mark.slow
@pytest.mark.skipif(BOARD == "zero-w", reason="the PyPI-wheel boards (armv6 has no such wheels)")
def test_installed_package_runs_under_emulation(converged) -> None:  # noqa: ANN001
    """The venv on the arm64 rootfs imports the package and its runtime deps (qemu-user)."""
    root: Path = converged["rootfs"]
    code = ("import importlib.util, memento_edge, numpy, onnxruntime, tokenizers, sqlite_vec, flask, waitress, yaml, "
            "click; assert importlib.util.find_spec('huggingface_hub') is None, 'left out on purpose'; print('ok')")
    res = subprocess.run(["chroot", str(root), "/opt/memento-edge/venv/bin/python", "-c", code],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
