"""Sanity probes run inside an emulated rootfs (and on the host, for the golden vector).

Prints one JSON object on stdout. Modes:

``embed``     platform facts, the embedder backend, ``vec_version()`` when sqlite-vec is installed,
              FTS5 availability, and the embedding of the golden sentence (the host compares it with its
              own vector: a wrong-architecture native library fails silently otherwise). ``--exact``
              embeds with the numpy int8 runtime, the exact int8 arithmetic: the host uses it as the
              reference because onnxruntime on x86 CPUs without VNNI saturates some int8 dot products
              (tests/hardware.py), which ARM guests do not.
``baseline``  import the given modules and report the process's RSS: under qemu-user that RSS includes
              the emulator itself, so the bench's RSS minus this baseline approximates the guest's own.

Runs on the interpreters of both rootfs (Debian bookworm: Python 3.11) and must not need anything
beyond the standard library, numpy and memento_edge.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import resource
import sqlite3
import sys
import time
from typing import Any, Dict, List

GOLDEN_SENTENCE = "The spare key for the garden shed hangs on the hook behind the kitchen door."


def _rss_kib() -> Dict[str, int]:
    """Current and peak RSS in KiB from /proc/self/status, plus ru_maxrss (KiB on Linux)."""
    out: Dict[str, int] = {"ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key.lower() + "_kib"] = int(value.split()[0])
    except OSError:
        pass
    return out


def _fts5_available() -> bool:
    con = sqlite3.connect(":memory:")
    try:
        con.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


def _vec_version() -> Any:
    """sqlite-vec's version string, None when the package is absent, or the error text."""
    try:
        import sqlite_vec  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        con = sqlite3.connect(":memory:")
        con.enable_load_extension(True)
        sqlite_vec.load(con)
        con.enable_load_extension(False)
        version = con.execute("SELECT vec_version()").fetchone()[0]
        # A distance on known vectors catches a library that loads but computes garbage.
        dist = con.execute("SELECT vec_distance_l2(vec_f32('[1,2,3]'), vec_f32('[1,2,5]'))").fetchone()[0]
        con.close()
        return {"version": version, "l2_check": dist}
    except Exception as exc:  # report, the host decides
        return {"error": f"{type(exc).__name__}: {exc}"}


def mode_embed(model_dir: str, exact: bool = False) -> Dict[str, Any]:
    """Embed the golden sentence with the backend make_embedder picks here, or the exact int8 runtime."""
    from memento_edge.config import Settings

    settings = Settings.load(env={}, model_dir=model_dir)
    if exact:
        from memento_edge.fallback import NumpyEmbedder

        embedder: Any = NumpyEmbedder(settings)
    else:
        from memento_edge.embedder import make_embedder

        embedder = make_embedder(settings)
    t0 = time.perf_counter()
    vec = embedder.embed_batch([GOLDEN_SENTENCE])[0]
    took = time.perf_counter() - t0
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "fts5": _fts5_available(),
        "vec": _vec_version(),
        "backend": embedder.backend,
        "first_embed_s": round(took, 3),
        "sentence": GOLDEN_SENTENCE,
        "vector": [float(x) for x in vec],
        "rss": _rss_kib(),
    }


def mode_baseline(modules: List[str]) -> Dict[str, Any]:
    """Import ``modules`` (skipping absent ones, which are listed) and report RSS."""
    imported, missing = [], []
    for name in modules:
        try:
            importlib.import_module(name)
            imported.append(name)
        except ImportError:
            missing.append(name)
    return {"machine": platform.machine(), "imported": imported, "missing": missing, "rss": _rss_kib()}


def main(argv: List[str]) -> int:
    """Command-line entry: ``embed MODEL_DIR`` or ``baseline MODULE...``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p_embed = sub.add_parser("embed", help="golden embedding + platform facts")
    p_embed.add_argument("model_dir")
    p_embed.add_argument("--exact", action="store_true",
                         help="embed with the exact int8 runtime (the host's reference)")
    p_base = sub.add_parser("baseline", help="RSS after importing the given modules")
    p_base.add_argument("modules", nargs="+")
    args = ap.parse_args(argv)
    result = mode_embed(args.model_dir, args.exact) if args.mode == "embed" else mode_baseline(args.modules)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
