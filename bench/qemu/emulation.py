"""Host-side half of the emulated benchmark runs (run by bench/qemu/*.sh with the project's venv).

``check``     compare the guest's golden embedding with the host's (cosine >= 0.999), check the guest
              picked the expected embedder backend, that sqlite-vec answers ``vec_version()`` and
              computes a known distance (when required), and that SQLite has FTS5. Exit 1 on failure.
``verify``    what CI checks of a finished run: the result JSON and Markdown exist, the golden check
              passed, the bench exited 0 and no section reports an ``error`` (timings never fail it).
``annotate``  add an ``emulation`` block to the bench's JSON and a matching section to its Markdown:
              QEMU version and CPU model, the golden check, RSS as measured and minus the emulator's own
              footprint (the same emulator running python with the same imports), and the int8/fp32
              speed ratio under emulation.

Absolute emulated times are not board times: QEMU user mode translates every ARM instruction to x86
on the fly. Ratios between two code paths measured in the same emulator (int8 vs fp32) are the
meaningful numbers; RSS minus the emulator baseline approximates the guest process's own memory.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

MIN_COSINE = 0.999
NOT_BOARD_TIMES = ("Absolute times in this report were measured under QEMU user-mode emulation on an x86_64 "
                   "host; they are not board times. Compare ratios measured in the same run instead.")
RSS_KEYS = ("rss_mb", "hwm_mb", "peak_mb")


def cosine(a: List[float], b: List[float]) -> float:
    """Cosine similarity of two equal-length vectors (0.0 when either is all zeros)."""
    if len(a) != len(b):
        raise ValueError(f"dimension mismatch: {len(a)} vs {len(b)}")
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def run_check(host: Dict[str, Any], guest: Dict[str, Any], backend: str, need_vec: bool,
              cpu: str) -> Tuple[bool, Dict[str, Any]]:
    """Evaluate the guest probe against the host's; returns (ok, facts incl. a list of failures)."""
    failures: List[str] = []
    cos = cosine(host["vector"], guest["vector"])
    if cos < MIN_COSINE:
        failures.append(f"golden cosine {cos:.6f} < {MIN_COSINE} (guest backend {guest.get('backend')})")
    if guest.get("backend") != backend:
        failures.append(f"guest embedder backend is {guest.get('backend')!r}, expected {backend!r}")
    vec = guest.get("vec")
    if need_vec:
        if not isinstance(vec, dict) or "version" not in vec:
            failures.append(f"sqlite-vec did not answer vec_version(): {vec!r}")
        elif abs(float(vec.get("l2_check", -1)) - 2.0) > 1e-5:
            failures.append("sqlite-vec computes vec_distance_l2([1,2,3],[1,2,5]) = "
                            f"{vec.get('l2_check')}, not 2")
    if not guest.get("fts5"):
        failures.append("guest SQLite has no FTS5")
    facts = {
        "ok": not failures,
        "failures": failures,
        "golden_sentence": guest.get("sentence"),
        "golden_cosine": round(cos, 7),
        "min_cosine": MIN_COSINE,
        "host_backend": host.get("backend"),
        "guest_backend": guest.get("backend"),
        "guest_machine": guest.get("machine"),
        "guest_python": guest.get("python"),
        "guest_sqlite": guest.get("sqlite"),
        "guest_fts5": guest.get("fts5"),
        "guest_vec": vec,
        "guest_first_embed_s": guest.get("first_embed_s"),
        "qemu_cpu": cpu,
    }
    return not failures, facts


def _rss_leaves(node: Any, path: Tuple[str, ...] = ()) -> Iterator[Tuple[str, float]]:
    """Every numeric ``*rss_mb`` / ``hwm_mb`` / ``peak_mb`` leaf of the bench JSON, with its dotted path."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "emulation":
                continue
            if key in RSS_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                yield ".".join(path + (key,)), float(value)
            else:
                yield from _rss_leaves(value, path + (str(key),))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _rss_leaves(value, path + (str(i),))


def _get(node: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def speed_ratios(result: Dict[str, Any]) -> Dict[str, Any]:
    """fp32 (seed-style baseline) median / int8 (project) median for the embedding measurements."""
    emb = _get(result, "sections", "embedding") or {}
    proj, base = emb.get("project") or {}, emb.get("baseline") or {}
    out: Dict[str, Any] = {}
    for key in ("uncached_short", "uncached_long", "batch20_ms_per_item"):
        p, b = _get(proj, key, "median"), _get(base, key, "median")
        if isinstance(p, (int, float)) and isinstance(b, (int, float)) and p > 0:
            out[key] = {"int8_ms": round(p, 2), "fp32_ms": round(b, 2), "fp32_over_int8": round(b / p, 2)}
    cp, cb = _get(result, "sections", "cold_start", "project", "median_ms"), \
        _get(result, "sections", "cold_start", "baseline", "median_ms")
    if isinstance(cp, (int, float)) and isinstance(cb, (int, float)) and cp > 0:
        # Process start + import + model load + first embed: a load-dominated ratio.
        out["cold_start"] = {"int8_ms": round(cp, 2), "fp32_ms": round(cb, 2),
                             "fp32_over_int8": round(cb / cp, 2)}
    # Store section: a new query's vector recall is dominated by embedding it (int8 vs fp32), at
    # the smallest store size both sides measured.
    sp = _get(result, "sections", "store", "project") or {}
    sb = _get(result, "sections", "store", "baseline") or {}
    for size in sorted((sp.get("recall") or {}).keys(), key=lambda k: int(k) if str(k).isdigit() else 0)[:1]:
        p = _get(sp, "recall", size, "vector", "uncached", "median")
        b = _get(sb, "recall", size, "vector", "uncached", "median")
        if isinstance(p, (int, float)) and isinstance(b, (int, float)) and p > 0:
            out[f"vector_recall_new_query_at_{size}"] = {"int8_ms": round(p, 2), "fp32_ms": round(b, 2),
                                                         "fp32_over_int8": round(b / p, 2)}
    if not out:
        reason = (base.get("skipped") or base.get("error") or proj.get("error")
                  or _get(result, "meta", "baseline_skipped")
                  or "embedding section not run (and no cold_start on both sides)")
        out["unavailable"] = str(reason)
    out["int8_backend"] = proj.get("backend")
    out["fp32_backend"] = base.get("backend")
    return out


def annotate(result: Dict[str, Any], check: Dict[str, Any], baseline: Dict[str, Any], qemu_version: str,
             cpu: str, arch: str, setup_s: Optional[int], bench_s: Optional[int],
             bench_exit: int) -> Dict[str, Any]:
    """Build the ``emulation`` block for ``result`` (does not modify ``result``)."""
    base_rss = baseline.get("rss", {})
    base_mb = base_rss.get("vmrss_kib", base_rss.get("ru_maxrss_kib", 0)) / 1024.0
    base_hwm_mb = base_rss.get("vmhwm_kib", base_rss.get("ru_maxrss_kib", 0)) / 1024.0
    rss: Dict[str, Any] = {}
    for path, value in _rss_leaves(result):
        sub = base_hwm_mb if path.endswith("hwm_mb") else base_mb
        # Stages measured before the guest imported what the baseline imports (e.g. before the model
        # load pulls in onnxruntime) fall below the baseline: no meaningful difference there.
        rss[path] = {"measured_mb": round(value, 1),
                     "minus_emulator_mb": round(value - sub, 1) if value >= sub else None}
    return {
        "emulator": "qemu-user (binfmt_misc, chroot)",
        "qemu_version": qemu_version,
        "qemu_cpu": cpu,
        "debian_arch": arch,
        "guest_machine": check.get("guest_machine"),
        "guest_python": check.get("guest_python"),
        "guest_sqlite": check.get("guest_sqlite"),
        "golden_check": {k: check.get(k) for k in ("ok", "failures", "golden_sentence", "golden_cosine",
                                                   "min_cosine", "host_backend", "guest_backend",
                                                   "guest_vec", "guest_fts5")},
        "rss_baseline": {
            "what": "VmRSS/VmHWM of the same qemu-user + guest python after importing only: "
                    + ", ".join(baseline.get("imported", [])),
            "missing_modules": baseline.get("missing", []),
            "rss_mb": round(base_mb, 1),
            "hwm_mb": round(base_hwm_mb, 1),
        },
        "rss": rss,
        "rss_note": "measured_mb = what the guest sees in /proc/self/status under qemu-user, which "
                    "includes the emulator's own memory (translated code cache, its heap); "
                    "minus_emulator_mb subtracts rss_baseline (VmHWM rows subtract its VmHWM). "
                    "An approximation of the board's RSS, not a measurement of it; null where the stage "
                    "precedes the imports the baseline made (the difference would be negative).",
        "int8_fp32_speed": speed_ratios(result),
        "times_note": NOT_BOARD_TIMES,
        "wall_seconds": {"setup": setup_s, "bench": bench_s},
        "bench_exit_status": bench_exit,
    }


def markdown(emu: Dict[str, Any]) -> str:
    """The Markdown section appended to the bench report."""
    g = emu["golden_check"]
    vec = g.get("guest_vec")
    vec_txt = vec.get("version", vec) if isinstance(vec, dict) else "not installed (numpy vector index)"
    verdict = "ok" if g.get("ok") else "FAILED " + "; ".join(g.get("failures") or [])
    lines = [
        "", "## Emulation", "",
        f"> {emu['times_note']}", "",
        "| | |", "|---|---|",
        f"| emulator | {emu['emulator']} |",
        f"| QEMU | {emu['qemu_version']} |",
        f"| CPU model | `{emu['qemu_cpu']}` (guest `uname -m`: {emu['guest_machine']}) |",
        f"| Debian arch | {emu['debian_arch']} "
        f"(Python {emu['guest_python']}, SQLite {emu['guest_sqlite']}) |",
        f"| embedder backend | {g.get('guest_backend')} |",
        f"| golden vector | cosine {g.get('golden_cosine')} vs host {g.get('host_backend')} "
        f"(min {g.get('min_cosine')}): {verdict} |",
        f"| sqlite-vec | {vec_txt} |",
        f"| FTS5 | {'yes' if g.get('guest_fts5') else 'no'} |",
        f"| guest config.yaml | `{emu.get('guest_config') or '-'}` |",
        f"| wall time | setup {emu['wall_seconds']['setup']} s, bench {emu['wall_seconds']['bench']} s |",
        "",
        "### int8 vs fp32 under emulation", "",
    ]
    sp = emu["int8_fp32_speed"]
    rows = [(k, v) for k, v in sp.items() if isinstance(v, dict)]
    if rows:
        lines += ["| embedding (median) | int8 ms | fp32 ms | fp32 / int8 |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['int8_ms']} | {v['fp32_ms']} | {v['fp32_over_int8']}x |" for k, v in rows]
    else:
        lines.append(f"Not measured: {sp.get('unavailable')}")
    base = emu["rss_baseline"]
    missing = base["missing_modules"]
    lines += [
        "", "### RSS: as measured and minus the emulator", "",
        f"Baseline: {base['what']} = {base['rss_mb']} MB RSS ({base['hwm_mb']} MB HWM)"
        + (f"; not importable in the guest: {', '.join(missing)}" if missing else "")
        + ".", "",
        "| stage | measured MB (includes QEMU) | minus emulator MB |", "|---|---:|---:|",
    ]
    lines += [f"| {path} | {v['measured_mb']} | "
              f"{'n/a (below baseline)' if v['minus_emulator_mb'] is None else v['minus_emulator_mb']} |"
              for path, v in emu["rss"].items()]
    lines += ["", emu["rss_note"], ""]
    return "\n".join(lines)


def _errors(node: Any, path: Tuple[str, ...] = ()) -> Iterator[str]:
    """Dotted paths of every ``error`` entry in the bench's sections."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "error" and value:
                yield ".".join(path) + f": {str(value)[:200]}"
            else:
                yield from _errors(value, path + (str(key),))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _errors(value, path + (str(i),))


def verify(prefix: Path) -> List[str]:
    """Problems with the run written at ``prefix`` (.json/.md); empty when CI should pass it."""
    problems: List[str] = []
    js, md = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    for p in (js, md):
        if not p.is_file() or p.stat().st_size == 0:
            problems.append(f"missing result file {p}")
    if not js.is_file():
        return problems
    try:
        result = json.loads(js.read_text())
    except ValueError as exc:
        return problems + [f"{js} is not JSON: {exc}"]
    emu = result.get("emulation")
    if not isinstance(emu, dict):
        return problems + [f"{js} has no emulation block"]
    if not (emu.get("golden_check") or {}).get("ok"):
        problems.append(f"golden check failed: {(emu.get('golden_check') or {}).get('failures')}")
    if emu.get("bench_exit_status") != 0:
        problems.append(f"bench exited {emu.get('bench_exit_status')}")
    problems += [f"section error {e}" for e in _errors(result.get("sections", {}), ("sections",))]
    return problems


def main(argv: List[str]) -> int:
    """Command-line entry (``check`` / ``annotate``); see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="golden vector + sqlite-vec + FTS5 checks of the guest probe")
    c.add_argument("host_json")
    c.add_argument("guest_json")
    c.add_argument("--backend", required=True, help="embedder backend the guest must use")
    c.add_argument("--need-vec", type=int, choices=(0, 1), default=1)
    c.add_argument("--cpu", required=True)
    c.add_argument("--out", required=True, help="where to write the check facts (JSON)")
    a = sub.add_parser("annotate", help="add the emulation block to a bench result")
    a.add_argument("result_json")
    a.add_argument("result_md")
    a.add_argument("--check", required=True)
    a.add_argument("--baseline", required=True)
    a.add_argument("--qemu-version", required=True)
    a.add_argument("--cpu", required=True)
    a.add_argument("--arch", required=True)
    a.add_argument("--setup-seconds", type=int)
    a.add_argument("--bench-seconds", type=int)
    a.add_argument("--bench-exit", type=int, default=0)
    a.add_argument("--guest-config", default="", help="settings written to the guest's config.yaml")
    v = sub.add_parser("verify", help="CI verdict on a finished run (exit 1 on any problem)")
    v.add_argument("prefix", help="result prefix, e.g. bench/results/2026-01-01-armv6-qemu")
    args = ap.parse_args(argv)

    if args.cmd == "verify":
        problems = verify(Path(args.prefix))
        for p in problems:
            print(f"VERIFY FAILED {args.prefix}: {p}", file=sys.stderr)
        if not problems:
            print(f"verified {args.prefix}: files present, golden ok, no section errors", file=sys.stderr)
        return 1 if problems else 0

    if args.cmd == "check":
        host = json.loads(Path(args.host_json).read_text())
        guest = json.loads(Path(args.guest_json).read_text())
        ok, facts = run_check(host, guest, args.backend, bool(args.need_vec), args.cpu)
        Path(args.out).write_text(json.dumps(facts, indent=2) + "\n")
        vec = facts["guest_vec"]
        print(f"golden cosine {facts['golden_cosine']} (guest {facts['guest_backend']} on "
              f"{facts['guest_machine']}, host {facts['host_backend']}); vec {vec}; "
              f"fts5 {facts['guest_fts5']}", file=sys.stderr)
        for f in facts["failures"]:
            print(f"CHECK FAILED: {f}", file=sys.stderr)
        return 0 if ok else 1

    result_path = Path(args.result_json)
    result = json.loads(result_path.read_text())
    check = json.loads(Path(args.check).read_text())
    baseline = json.loads(Path(args.baseline).read_text())
    emu = annotate(result, check, baseline, args.qemu_version, args.cpu, args.arch, args.setup_seconds,
                   args.bench_seconds, args.bench_exit)
    emu["guest_config"] = args.guest_config
    result["emulation"] = emu
    tmp = result_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(result_path)
    md_path = Path(args.result_md)
    md = md_path.read_text() if md_path.exists() else ""
    marker = "\n## Emulation\n"
    if marker in md:  # re-annotating replaces the old section
        md = md.split(marker)[0]
    md_path.write_text(md.rstrip("\n") + "\n" + markdown(emu))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
