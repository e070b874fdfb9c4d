"""Light checks of the appliance scripts (image/, scripts/ci-appliance.sh, .ci/run): they lint clean and
refuse an unknown profile before doing anything. The builds and the QEMU boot test themselves need root,
qemu and tens of minutes; CI runs them through ``scripts/ci-appliance.sh`` (stage 4 of ``.ci/run``).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["image/build.sh", "image/rootfs.sh", "image/boot-test.sh", "image/boot-test-raspi0.sh", "image/boards.sh",
           "scripts/ci-appliance.sh", ".ci/run",
           "scripts/setup", "scripts/test", "scripts/build-model"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_have_no_shellcheck_warnings(script: str) -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck not installed: run scripts/setup --test (it installs it)")
    proc = subprocess.run(["shellcheck", "-S", "warning", "-x", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("argv", [["image/build.sh", "--profile", "tiny"],
                                  ["image/rootfs.sh", "tiny", "/nonexistent/x.tar"]])
def test_unknown_image_profile_is_refused_before_any_work(argv: List[str], tmp_path: Path) -> None:
    proc = subprocess.run(["bash", *argv], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "MEMENTO_IMAGE_OUT": str(tmp_path / "out"),
                               "MEMENTO_IMAGE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert "unknown profile: tiny" in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["image/build.sh", "--board", "zero-x"],
                                  ["image/rootfs.sh", "full", "/nonexistent/x.tar", "zero-x"]])
def test_unknown_board_is_refused_before_any_work(argv: List[str], tmp_path: Path) -> None:
    proc = subprocess.run(["bash", *argv], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "MEMENTO_IMAGE_OUT": str(tmp_path / "out"),
                               "MEMENTO_IMAGE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert "unknown board: zero-x" in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
