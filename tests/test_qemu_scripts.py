"""Light checks of bench/qemu: the scripts parse, lint clean and answer --help without root or QEMU; the
host-side verdict logic (golden check, RSS baseline subtraction, CI verify) does what it says.

The emulated runs themselves take minutes to hours and need root + qemu-user; they are run by
``bench/qemu/ci.sh``, not here.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict

import pytest

QEMU_DIR = Path(__file__).resolve().parent.parent / "bench" / "qemu"
SCRIPTS = ["build-rootfs.sh", "run-aarch64.sh", "run-armv6.sh", "ci.sh"]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"qemu_{name}", QEMU_DIR / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


emulation = _load("emulation")
guest_check = _load("guest_check")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_exits_zero_and_prints_usage(script: str) -> None:
    proc = subprocess.run(["bash", str(QEMU_DIR / script), "--help"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"bench/qemu/{script}" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_rejects_unknown_argument(script: str) -> None:
    proc = subprocess.run(["bash", str(QEMU_DIR / script), "--no-such-flag"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0
    assert "unknown argument" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS + ["lib.sh"])
def test_shell_scripts_are_shellcheck_clean(script: str) -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck not installed: run scripts/setup --test (it installs it)")
    proc = subprocess.run(["shellcheck", "-x", script], cwd=QEMU_DIR, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_rootfs_key_is_stable_and_per_arch() -> None:
    def key(arch: str) -> str:
        out = subprocess.run(["bash", "-c", f'source "{QEMU_DIR}/lib.sh"; rootfs_key {arch}'],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()

    a1, a2, b = key("arm64"), key("arm64"), key("armel")
    assert a1 == a2 and len(a1) == 16 and a1 != b


def _probe(vector: Any, backend: str = "onnxruntime", vec: Any = None, fts5: bool = True) -> Dict[str, Any]:
    return {"vector": list(vector), "backend": backend, "vec": vec, "fts5": fts5, "machine": "aarch64",
            "sentence": guest_check.GOLDEN_SENTENCE}


def test_check_passes_matching_guest() -> None:
    host = _probe([0.6, 0.8, 0.0])
    guest = _probe([0.6001, 0.7999, 0.0], vec={"version": "v0.1.9", "l2_check": 2.0})
    ok, facts = emulation.run_check(host, guest, "onnxruntime", True, "cortex-a53")
    assert ok and facts["failures"] == [] and facts["golden_cosine"] > 0.999


def test_check_fails_on_wrong_vector_backend_or_missing_vec() -> None:
    host = _probe([0.6, 0.8, 0.0])
    ok, facts = emulation.run_check(host, _probe([0.8, 0.6, 0.0], backend="numpy-int8"), "onnxruntime",
                                    True, "cortex-a53")
    assert not ok
    text = " ".join(facts["failures"])
    assert "golden cosine" in text and "backend" in text and "vec_version" in text


def test_check_fails_when_sqlite_vec_computes_garbage() -> None:
    host = _probe([1.0, 0.0])
    guest = _probe([1.0, 0.0], vec={"version": "v0.1.9", "l2_check": 0.0})
    ok, facts = emulation.run_check(host, guest, "onnxruntime", True, "cortex-a53")
    assert not ok and "vec_distance_l2" in facts["failures"][0]


def test_check_armv6_needs_no_vec_but_needs_fts5() -> None:
    host = _probe([1.0, 0.0])
    ok, _ = emulation.run_check(host, _probe([1.0, 0.0], backend="numpy-int8"), "numpy-int8", False,
                                "arm1176")
    assert ok
    ok, facts = emulation.run_check(host, _probe([1.0, 0.0], backend="numpy-int8", fts5=False), "numpy-int8",
                                    False, "arm1176")
    assert not ok and "FTS5" in facts["failures"][0]


def _result() -> Dict[str, Any]:
    return {
        "sections": {
            "embedding": {
                "project": {"backend": "onnxruntime", "uncached_short": {"median": 50.0}},
                "baseline": {"backend": "onnxruntime-fp32-default", "uncached_short": {"median": 150.0}},
            },
            "rss": {"project": {"stages": {"after_import": {"rss_mb": 300.0, "hwm_mb": 310.0},
                                           "import_peak": {"rss_mb": 400.0, "hwm_mb": None}}}},
        }
    }


def test_annotate_subtracts_emulator_baseline_and_reports_ratio() -> None:
    check = {"ok": True, "failures": [], "guest_machine": "aarch64"}
    baseline = {"imported": ["numpy", "sqlite3"], "missing": [],
                "rss": {"vmrss_kib": 100 * 1024, "vmhwm_kib": 120 * 1024}}
    emu = emulation.annotate(_result(), check, baseline, "10.0.2", "cortex-a53", "arm64", 10, 20, 0)
    rss = emu["rss"]
    assert rss["sections.rss.project.stages.after_import.rss_mb"] == {"measured_mb": 300.0,
                                                                      "minus_emulator_mb": 200.0}
    assert rss["sections.rss.project.stages.after_import.hwm_mb"]["minus_emulator_mb"] == 190.0
    assert "sections.rss.project.stages.import_peak.hwm_mb" not in rss  # None is not a number
    assert emu["int8_fp32_speed"]["uncached_short"]["fp32_over_int8"] == 3.0
    md = emulation.markdown(emu)
    assert "not board times" in md and "| 3.0x |" in md


def test_speed_ratio_says_why_when_fp32_side_is_missing() -> None:
    result = _result()
    result["sections"]["embedding"]["baseline"] = {"skipped": "onnxruntime not installed"}
    assert emulation.speed_ratios(result)["unavailable"] == "onnxruntime not installed"


def test_verify_reports_missing_files_failed_golden_and_section_errors(tmp_path: Path) -> None:
    prefix = tmp_path / "ci-armv6-qemu"
    assert any("missing result file" in p for p in emulation.verify(prefix))
    result = _result()
    result["sections"]["store"] = {"project": {"error": "Traceback: boom"}}
    result["emulation"] = {"golden_check": {"ok": False, "failures": ["golden cosine 0.5"]},
                           "bench_exit_status": 0}
    prefix.with_name(prefix.name + ".json").write_text(json.dumps(result))
    prefix.with_name(prefix.name + ".md").write_text("# report\n")
    problems = emulation.verify(prefix)
    assert any("golden check failed" in p for p in problems)
    assert any("sections.store.project" in p for p in problems)


def test_verify_passes_clean_run(tmp_path: Path) -> None:
    prefix = tmp_path / "ci-aarch64-qemu"
    result = _result()
    result["emulation"] = {"golden_check": {"ok": True}, "bench_exit_status": 0}
    prefix.with_name(prefix.name + ".json").write_text(json.dumps(result))
    prefix.with_name(prefix.name + ".md").write_text("# report\n")
    assert emulation.verify(prefix) == []


def test_guest_baseline_probe_reports_rss_and_missing_modules() -> None:
    proc = subprocess.run([sys.executable, str(QEMU_DIR / "guest_check.py"), "baseline", "sqlite3",
                           "no_such_module_xyz"], capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(proc.stdout)
    assert out["imported"] == ["sqlite3"] and out["missing"] == ["no_such_module_xyz"]
    assert out["rss"]["vmrss_kib"] > 0


def test_speed_ratio_from_store_vector_recall_of_a_new_query() -> None:
    vec = {"vector": {"uncached": {"median": 40.0}}}
    fp32 = {"vector": {"uncached": {"median": 100.0}}}
    result = {"sections": {"store": {"project": {"recall": {"100": vec, "1000": vec}},
                                     "baseline": {"recall": {"100": fp32}}}}}
    ratios = emulation.speed_ratios(result)
    assert ratios["vector_recall_new_query_at_100"]["fp32_over_int8"] == 2.5
    assert "vector_recall_new_query_at_1000" not in ratios
