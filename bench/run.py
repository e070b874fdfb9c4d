"""Command line of the benchmark suite: ``python -m bench``.

::

    python -m bench [--profile full|short|emulated] [--out PREFIX] [--sizes 100,1000,10000,100000]
                    [--http] [--skip-baseline] [--platform NAME] [--sections LIST] [--quality MODE]

Writes ``PREFIX.json``, ``PREFIX.md`` and ``PREFIX-recall.png`` (the PNG needs matplotlib; without it
the report says so). The default prefix is ``bench/results/<YYYY-MM-DD>-<platform>``.

Profiles:

- ``full``     - everything, store sizes 100 / 1k / 10k / 100k, enough repetitions for p95 (tens of
  minutes on a 2-core x86).
- ``short``    - CI: sizes 100 / 1k, fewer repetitions, a 2,000-memory import for RSS; a few minutes.
- ``emulated`` - qemu-user runs of ARM root filesystems: tiny sizes, few repetitions, no 100k, one
  LoCoMo conversation (40 questions).

Every engine section runs in its own process for both sides (see :mod:`bench.engine`), so RSS numbers
belong to one side only and a crash in one section becomes an ``error`` row instead of a lost run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import engine
from .engine import NOT_MEASURABLE, REPO_ROOT

PROFILES: Dict[str, Dict[str, Any]] = {
    "full": {
        "sizes": [100, 1000, 10_000, 100_000], "embed_reps": 200, "batch_reps": 20, "remember_reps": 100,
        "recall_queries": 200, "pool": 2000, "stress_inserts": [100, 500, 1000], "concurrent_each": 25,
        "cycles": 100, "rss_ops": 1000, "import_n": 10_000, "import_batch": 1000, "cold_runs": 5,
        "ablation_reps": 60, "quality": "full", "worker_timeout": 3600,
    },
    "short": {
        "sizes": [100, 1000], "embed_reps": 50, "batch_reps": 8, "remember_reps": 30, "recall_queries": 50,
        "pool": 500, "stress_inserts": [100, 500], "concurrent_each": 25, "cycles": 50,
        "rss_ops": 1000, "import_n": 2000, "import_batch": 1000, "cold_runs": 3, "ablation_reps": 20,
        "quality": "full", "worker_timeout": 900,
    },
    # qemu-user runs: every embedding is 10-50x slower under emulation, and the armv6 numpy-int8 fallback
    # is slower still, so every count is tiny; LoCoMo only on request (--quality subset).
    "emulated": {
        "sizes": [100, 1000], "embed_reps": 3, "long_reps": 2, "batch_reps": 1, "warmup": 1,
        "remember_reps": 3, "remember_warmup": 2, "recall_queries": 3, "pool": 10,
        "stress_inserts": [5, 10, 20], "concurrent_each": 2, "mixed_fill": 10, "cycles": 3,
        "rss_ops": 30, "import_n": 50, "import_batch": 25, "cold_runs": 1, "ablation_reps": 3,
        "quality": "none", "quality_conversations": ["30"], "quality_max_questions": 20,
        "worker_timeout": 3600, "request_timeout": 3600.0,
    },
}

ALL_SECTIONS = ["cold_start", "embedding", "store", "stress", "rss", "ablation", "quality"]

#: Session-option variants of the ablation (fields of memento_edge.embedder.EmbedderOptions). The
#: reference is onnxruntime's defaults with the project's threading (1 intra-op thread, sequential);
#: each "... off" variant switches one knob off; "tuned" is the shipped profile (arena, mem pattern and
#: spinning off; prepacking on).
_ORT_DEFAULTS = {"profile": "tuned", "cpu_mem_arena": True, "mem_pattern": True, "disable_prepacking": False,
                 "allow_spinning": True}
ABLATION_VARIANTS: Dict[str, Dict[str, Any]] = {
    "ORT defaults, 1 thread": dict(_ORT_DEFAULTS),
    "arena off": dict(_ORT_DEFAULTS, cpu_mem_arena=False),
    "mem pattern off": dict(_ORT_DEFAULTS, mem_pattern=False),
    "prepacking off": dict(_ORT_DEFAULTS, disable_prepacking=True),
    "spinning off": dict(_ORT_DEFAULTS, allow_spinning=False),
    "tuned (arena, mem pattern, spinning off) = memento-edge": {"profile": "tuned"},
    "tuned + padded batching": {"profile": "tuned", "batching": "padded"},
    "plain InferenceSession (seed-style, all cores)": {"profile": "default"},
}


def _log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def default_platform() -> str:
    """``x86_64`` natively (or whatever the machine reports); qemu runs pass ``--platform``."""
    return platform.machine() or "unknown"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="short")
    ap.add_argument("--out", help="output prefix (default bench/results/<date>-<platform>)")
    ap.add_argument("--sizes", help="store sizes for recall, comma separated (overrides the profile)")
    ap.add_argument("--http", action="store_true", help="also run bench/http_bench.py against a local server")
    ap.add_argument("--skip-baseline", action="store_true", help="measure memento-edge only")
    ap.add_argument("--platform", default=None, help="platform label (e.g. aarch64-qemu, armv6-qemu)")
    ap.add_argument("--model-dir", default=None,
                    help=f"model directory (default $MEMENTO_MODEL_DIR or {engine.DEFAULT_MODEL_DIR})")
    ap.add_argument("--sections", default=",".join(ALL_SECTIONS),
                    help=f"comma-separated subset of: {', '.join(ALL_SECTIONS)}")
    ap.add_argument("--quality", choices=["auto", "none", "subset", "full"], default="auto",
                    help="LoCoMo quality: auto = the profile's choice")
    ap.add_argument("--locomo-dir", default=None,
                    help="LoCoMo conversations (default shared/data/locomo-dev)")
    ap.add_argument("--fake", action="store_true",
                    help="use FakeEmbedder for both sides (harness smoke test only; numbers mean nothing)")
    return ap.parse_args(argv)


def build_params(args: argparse.Namespace) -> Dict[str, Any]:
    """Profile parameters with command-line overrides applied."""
    params = dict(PROFILES[args.profile])
    if args.sizes:
        params["sizes"] = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if args.quality != "auto":
        params["quality"] = args.quality
    if params["quality"] == "subset":
        params.setdefault("quality_conversations", ["30"])
        params.setdefault("quality_max_questions", 40)
    if args.locomo_dir:
        params["locomo_dir"] = args.locomo_dir
    return params


def _model_dir(args: argparse.Namespace) -> str:
    import os

    return str(Path(args.model_dir or os.environ.get("MEMENTO_MODEL_DIR") or engine.DEFAULT_MODEL_DIR))


HTTP_PARAMS: Dict[str, Dict[str, Any]] = {
    "full": {"memories": 10_000, "seconds": 10.0, "clients": (1, 4, 8)},
    "short": {"memories": 1000, "seconds": 3.0, "clients": (1, 4)},
    "emulated": {"memories": 200, "seconds": 3.0, "clients": (1,)},
}


def run_http(args: argparse.Namespace, model_dir: str) -> Dict[str, Any]:
    """Run ``bench.http_bench.run`` with the profile's parameters.

    Its Markdown (``http_bench.to_markdown``) is embedded in the report under ``"markdown"``.
    """
    if args.fake:
        return {"skipped": "the HTTP bench needs the real model (not run with --fake)"}
    try:
        from . import http_bench
    except ImportError as exc:
        return {"skipped": f"bench/http_bench.py not importable: {exc}"}
    offered: Dict[str, Any] = dict(HTTP_PARAMS.get(args.profile, HTTP_PARAMS["short"]))
    offered.update(model_dir=Path(model_dir), log=_log)
    try:
        result = dict(http_bench.run(**offered))
    except (Exception, SystemExit) as exc:  # http_bench exits when the model is missing
        import traceback

        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    try:
        result["markdown"] = http_bench.to_markdown(result)
    except Exception as exc:  # the raw dict is still in the JSON
        result["markdown_error"] = repr(exc)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    """Run the selected sections and write the report; exit status 0 unless the harness itself broke."""
    args = parse_args(argv)
    params = build_params(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in ALL_SECTIONS]
    if unknown:
        _log(f"unknown sections: {unknown}")
        return 2
    if params.get("quality") == "none" and "quality" in sections:
        sections.remove("quality")
    plat = args.platform or default_platform()
    started = _dt.datetime.now(_dt.timezone.utc)
    out_prefix = Path(args.out) if args.out else (
        REPO_ROOT / "bench" / "results" / f"{started.date().isoformat()}-{plat}")
    model_dir = _model_dir(args)
    timeout = float(params["worker_timeout"])

    settings_overrides: Dict[str, Any] = (
        {"request_timeout": params["request_timeout"]} if params.get("request_timeout") else {})
    specs: Dict[str, engine.Spec] = {
        "project": {"side": "project", "model_dir": model_dir, "fake": args.fake,
                    "settings": settings_overrides}}
    baseline_skip: Optional[str] = None
    if args.skip_baseline:
        baseline_skip = "skipped (--skip-baseline)"
    else:
        base_spec = {"side": "baseline", "model_dir": model_dir, "fake": args.fake,
                     "settings": settings_overrides}
        baseline_skip = engine.baseline_unavailable_reason(base_spec)
        if baseline_skip is None:
            specs["baseline"] = base_spec
    if not args.fake and not (Path(model_dir) / "manifest.json").exists():
        _log(f"warning: no model at {model_dir} (build it with `memento-edge model build`); "
             "embedding sections will report errors")

    results: Dict[str, Any] = {
        "meta": {
            "date": started.isoformat(timespec="seconds"),
            "platform": plat,
            "profile": args.profile,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "bench"]
                                + (sys.argv[1:] if argv is None else list(argv))),
            "machine": engine.platform_info(),
            "model_dir": model_dir,
            "fake_embedder": args.fake,
            "baseline_skipped": baseline_skip,
            "sections": sections,
        },
        "params": params,
        "sections": {},
        "timing_s": {},
    }
    work_sections: Dict[str, Callable[[], Dict[str, Any]]] = {}

    def per_side(section: str) -> Callable[[], Dict[str, Any]]:
        def run() -> Dict[str, Any]:
            out: Dict[str, Any] = {}
            for side, spec in specs.items():
                _log(f"{section}: {side} ...")
                if section == "cold_start":
                    out[side] = engine.measure_cold_start(spec, int(params["cold_runs"]))
                else:
                    out[side] = engine.run_worker(section, spec, params, timeout)
                if "error" in out[side]:
                    _log(f"{section}: {side} ERROR {out[side]['error']}")
            if "baseline" not in specs:
                out["baseline"] = {"skipped": baseline_skip}
            return out
        return run

    def ablation() -> Dict[str, Any]:
        if not args.fake and not engine.module_available("onnxruntime"):
            return {"skipped": f"{NOT_MEASURABLE}: onnxruntime not installed (numpy-int8 fallback backend)"}
        variants: Dict[str, Any] = {}
        for name, overrides in ABLATION_VARIANTS.items():
            _log(f"ablation: {name} ...")
            spec = dict(specs["project"], options=overrides)
            variants[name] = engine.run_worker("ablation", spec, params, timeout)
        return {"variants": variants}

    for name in ALL_SECTIONS:
        if name not in sections:
            continue
        work_sections[name] = ablation if name == "ablation" else per_side(name)
    for name, fn in work_sections.items():
        t = time.monotonic()
        results["sections"][name] = fn()
        results["timing_s"][name] = time.monotonic() - t
        _log(f"{name}: done in {results['timing_s'][name]:.1f} s")
    if args.http:
        t = time.monotonic()
        _log("http ...")
        results["sections"]["http"] = run_http(args, model_dir)
        results["timing_s"]["http"] = time.monotonic() - t
    results["timing_s"]["total"] = sum(results["timing_s"].values())
    results["meta"]["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    from . import report

    paths = report.write_all(results, out_prefix)
    for p in paths:
        _log(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
