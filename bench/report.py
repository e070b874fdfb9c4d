"""Turn a bench run into rows (seed / target / memento-edge / baseline / status); write JSON, Markdown, PNG.

Targets are those of the project brief for a 2-core x86 with one onnxruntime thread; seed numbers come
from ``shared/seed/BENCHMARK.md`` (the laptop project memento-edge descends from). A row gets a
pass/fail status only when the measured condition matches the target's (e.g. the "peak during a 10k
import" target is not judged on a 2,000-memory import).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

Row = Dict[str, Any]


def _get(d: Any, *keys: Any) -> Any:
    """Nested lookup that returns None instead of raising."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else None


def fmt(value: Any, unit: str = "") -> str:
    """Human formatting of a measured value."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if unit == "ms":
        v = float(value)
        return f"{v:.3f} ms" if v < 0.1 else f"{v:.2f} ms" if v < 100 else f"{v:,.0f} ms"
    if unit == "s":
        return f"{float(value):.2f} s"
    if unit == "MB":
        return f"{float(value):.1f} MB"
    if unit == "KiB":
        return f"{float(value):.2f} KiB"
    if unit == "x":
        return f"{float(value):,.0f}x"
    if unit == "":
        return f"{float(value):.3f}" if isinstance(value, float) else str(value)
    return f"{value} {unit}"


def _status(value: Optional[float], op: str, target: Optional[float], applicable: bool = True) -> str:
    if target is None or not applicable:
        return ""
    if value is None:
        return "no data"
    ok = value <= target if op == "<=" else value >= target
    return "PASS" if ok else "FAIL"


def _side_err(section: Any, side: str) -> Optional[str]:
    s = _get(section, side)
    if not isinstance(s, dict):
        return None
    if "skipped" in s:
        # The reason is printed once in the report header ("Baseline (seed-style): ... — reason").
        return "n/m" if side == "baseline" else f"skipped: {s['skipped']}"
    if "error" in s:
        return "error"
    return None


def build_rows(results: Dict[str, Any]) -> List[Row]:
    """All rows of the main table, in display order."""
    S = results.get("sections", {})
    rows: List[Row] = []

    def add(group: str, metric: str, seed: str, target: Optional[Tuple[str, float, str]], section: str,
            path: Tuple[Any, ...], unit: str, applicable: bool = True, baseline_note: str = "",
            transform: Any = None) -> None:
        sec = S.get(section)
        vals: Dict[str, Tuple[Optional[float], Optional[str]]] = {}
        for side in ("project", "baseline"):
            err = _side_err(sec, side) if sec is not None else "not run"
            if err:
                vals[side] = (None, err)
                continue
            raw = _get(sec, side, *path)
            if transform is not None and raw is not None:
                raw = transform(raw, _get(sec, side))
            vals[side] = (_num(raw), None)
        pv, perr = vals["project"]
        bv, berr = vals["baseline"]
        tgt_text = f"{target[0]} {fmt(target[1], target[2])}" if target else "—"
        rows.append({
            "group": group, "metric": metric, "seed": seed, "target": tgt_text, "unit": unit,
            "project": pv, "project_text": perr or fmt(pv, unit),
            "baseline": bv,
            "baseline_text": berr or (fmt(bv, unit) + baseline_note if bv is not None else "—"),
            "status": ("error" if perr == "error" else "not run" if perr == "not run"
                       else _status(pv, target[0], target[1], applicable) if target else ""),
        })

    emb = "embedding"
    add("Embedding", "Cold start: new process → first embedding (median)", "4,411 ms", ("<=", 400, "ms"),
        "cold_start", ("median_ms",), "ms")
    add("Embedding", "Uncached embed, ~12 tokens: median", "11.2 ms", ("<=", 2, "ms"), emb,
        ("uncached_short", "median"), "ms")
    add("Embedding", "Uncached embed, ~12 tokens: p95", "—", None, emb, ("uncached_short", "p95"), "ms")
    add("Embedding", "Uncached embed, ~200 tokens: median", "—", None, emb, ("uncached_long", "median"), "ms")
    add("Embedding", "Uncached embed, ~200 tokens: p95", "—", None, emb, ("uncached_long", "p95"), "ms")
    add("Embedding", "Warm embed (LRU cache hit): median", "0.006 ms", None, emb, ("cache_hit", "median"),
        "ms", baseline_note=" (no cache)")
    add("Embedding", "Cache speedup (uncached / hit)", "255x", None, emb, ("uncached_short", "median"), "x",
        transform=lambda v, side: v / max(_get(side, "cache_hit", "median") or 1e-9, 1e-9))
    add("Embedding", "Batch of 20 mixed lengths: ms/item (median)", "223 ms/item", ("<=", 5, "ms"), emb,
        ("batch20_ms_per_item", "median"), "ms")

    add("Store", "Remember, durable (synchronous=FULL): median", "20.4 ms", ("<=", 6, "ms"), "store",
        ("remember", "median"), "ms")
    add("Store", "Remember, durable: p95", "—", None, "store", ("remember", "p95"), "ms")
    add("Store", "Remember acknowledged, background embedding (durable): median", "—", ("<=", 50, "ms"),
        "store", ("remember_background", "median"), "ms")
    sizes = _get(S, "store", "project", "sizes") or _get(S, "store", "baseline", "sizes") or []
    for size in sizes:
        label = f"{size:,}"
        seed = "0.5 ms" if size == 100 else ("5.3 ms ¹" if size == 1000 else "—")
        seed95 = "6.5 ms ¹" if size == 1000 else "—"
        t50 = ("<=", 8, "ms") if size == 10_000 else ("<=", 60, "ms") if size == 100_000 else None
        t95 = ("<=", 12, "ms") if size == 10_000 else None
        add("Store", f"Recall top-5 hybrid @ {label}: p50", seed, t50, "store",
            ("recall", str(size), "hybrid", "uncached", "median"), "ms")
        _baseline_from(rows[-1], S, size, "median")
        add("Store", f"Recall top-5 hybrid @ {label}: p95", seed95, t95, "store",
            ("recall", str(size), "hybrid", "uncached", "p95"), "ms")
        _baseline_from(rows[-1], S, size, "p95")
        add("Store", f"Recall top-5 vector @ {label}: p50", "—", None, "store",
            ("recall", str(size), "vector", "uncached", "median"), "ms")
        add("Store", f"Recall top-5 keyword @ {label}: p50", "—", None, "store",
            ("recall", str(size), "keyword", "uncached", "median"), "ms")

    seeds = {100: "~5 s", 500: "~12 s", 1000: "~24 s"}
    for key in sorted((k for k in (_get(S, "stress", "project") or _get(S, "stress", "baseline") or {})
                       if k.startswith("insert_")), key=lambda k: int(k.split("_")[1])):
        n = int(key.split("_")[1])
        add("Stress", f"Insert {n:,} memories one by one (wall)", seeds.get(n, "—"), None, "stress",
            (key, "seconds"), "s")
    rows.extend(_stress_rows(S))

    rss = "rss"
    n_ops = _get(S, rss, "project", "mixed_ops", "n") or 1000
    n_imp = _get(S, rss, "project", "import", "n") or _get(S, rss, "baseline", "import", "n") or 10_000
    add("Memory", "VmRSS after import", "—", None, rss, ("stages", "after_import", "rss_mb"), "MB")
    add("Memory", "VmRSS after model load", "~85 MB (model estimate)", None, rss,
        ("stages", "after_model_load", "rss_mb"), "MB")
    add("Memory", f"VmRSS after model load + {n_ops:,} mixed ops", "1,316 MB", ("<=", 120, "MB"), rss,
        ("stages", "after_mixed_ops", "rss_mb"), "MB", applicable=n_ops >= 1000)
    add("Memory", f"RSS growth over {n_ops:,} mixed ops", "1.2 MB / 50 ops", None, rss,
        ("stages", "after_mixed_ops", "rss_mb"), "MB",
        transform=lambda v, side: v - (_get(side, "stages", "after_first_embed", "rss_mb") or v))
    add("Memory", f"Peak RSS (VmHWM) during a {n_imp:,}-memory import", "—", ("<=", 160, "MB"), rss,
        ("stages", "import_peak", "hwm_mb"), "MB", applicable=n_imp >= 10_000)
    add("Memory", f"VmRSS after the {n_imp:,}-memory import", "—", None, rss,
        ("stages", "after_import_n", "rss_mb"), "MB")
    add("Database", f"DB bytes per memory at {n_imp:,} (~100-char texts, after checkpoint)",
        "~19 KiB (at 100)", ("<=", 2.5, "KiB"), rss, ("db", "bytes_per_memory"), "KiB",
        applicable=n_imp >= 10_000, transform=lambda v, side: v / 1024.0)

    q = "quality"
    add("Quality", "LoCoMo evidence R@10, hybrid (baseline: fp32 vector)", "—", (">=", 0.66, ""), q,
        ("modes", "hybrid", "R@10"), "")
    _quality_baseline(rows[-1], S, "R@10")
    add("Quality", "LoCoMo evidence R@5, hybrid (baseline: fp32 vector)", "—", None, q,
        ("modes", "hybrid", "R@5"), "")
    _quality_baseline(rows[-1], S, "R@5")
    add("Quality", "LoCoMo hit@5, hybrid (baseline: fp32 vector)", "4/5 topics at 200 ²", None, q,
        ("modes", "hybrid", "hit@5"), "")
    _quality_baseline(rows[-1], S, "hit@5")
    return rows


def _baseline_from(row: Row, S: Dict[str, Any], size: int, stat: str) -> None:
    """Hybrid rows show the baseline's vector-only recall (the only mode the seed had)."""
    base = _get(S, "store", "baseline")
    if not isinstance(base, dict) or "skipped" in base or "error" in base:
        return
    v = _num(_get(base, "recall", str(size), "vector", "uncached", stat))
    row["baseline"] = v
    row["baseline_text"] = fmt(v, "ms") + " (vector-only)" if v is not None else "—"


def _quality_baseline(row: Row, S: Dict[str, Any], key: str) -> None:
    base = _get(S, "quality", "baseline")
    if not isinstance(base, dict) or "skipped" in base or "error" in base:
        return
    v = _num(_get(base, "modes", "vector", key))
    row["baseline"] = v
    row["baseline_text"] = fmt(v) if v is not None else "—"


def _stress_rows(S: Dict[str, Any]) -> List[Row]:
    rows = []
    specs = [("concurrent_4x", "4-thread concurrent writes (25 each)", "~8 s, PASS"),
             ("mixed_2w3r", "Mixed 2 writers + 3 readers", "FAIL (thread timeout crash)"),
             ("create_delete", "Create / get / delete cycles", "PASS")]
    for key, metric, seed in specs:
        texts = {}
        status = ""
        for side in ("project", "baseline"):
            err = _side_err(S.get("stress"), side) if "stress" in S else "not run"
            d = _get(S, "stress", side, key)
            if err or not isinstance(d, dict):
                texts[side] = err or "—"
                if side == "project" and err == "error":
                    status = "error"
                continue
            extra = ""
            if "expected" in d:
                extra = f", {d.get('count')}/{d['expected']} stored"
            if "cycles" in d:
                extra = f", {d['cycles']} cycles, count {'ok' if d.get('count_consistent') else 'WRONG'}"
            hung = f", {d['hung_threads']} hung" if d.get("hung_threads") else ""
            texts[side] = f"{d['seconds']:.2f} s, {d['errors']} errors{extra}{hung}"
            if side == "project":
                ok = (d["errors"] == 0 and not d.get("hung_threads")
                      and d.get("count", d.get("expected")) == d.get("expected")
                      and d.get("count_consistent", True))
                status = "PASS" if ok else "FAIL"
        rows.append({"group": "Stress", "metric": metric, "seed": seed, "target": "0 errors", "unit": "",
                     "project": None, "project_text": texts["project"], "baseline": None,
                     "baseline_text": texts["baseline"], "status": status})
    return rows


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def _md_table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(results: Dict[str, Any], rows: List[Row], png_note: str) -> str:
    """The Markdown report."""
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    S = results.get("sections", {})
    params = results.get("params", {})
    lines = [f"# memento-edge benchmark — {meta.get('platform')} — {meta.get('date', '')[:10]}", ""]
    if meta.get("fake_embedder"):
        lines += ["> **FakeEmbedder run (harness smoke test): the numbers below mean nothing.**", ""]
    lines += [
        f"- **Date:** {meta.get('date')} → {meta.get('finished')} (UTC)",
        f"- **Command:** `{meta.get('command')}`",
        f"- **Profile:** {meta.get('profile')} "
        f"(store sizes {', '.join(f'{s:,}' for s in params.get('sizes', []))})",
        f"- **Machine:** {m.get('cpu')}, {m.get('cores')} cores, {m.get('mem_total_mb', '?')} MB RAM, "
        f"{m.get('machine')}, Linux {m.get('kernel')}",
        f"- **Software:** Python {m.get('python')}, SQLite {m.get('sqlite')}, "
        f"onnxruntime {m.get('onnxruntime')}, "
        f"sqlite-vec {m.get('sqlite_vec')}, tokenizers {m.get('tokenizers')}, numpy {m.get('numpy')}, "
        f"memento-edge {m.get('memento_edge', '?')}",
        f"- **memento-edge:** int8 model, the embedder's tuned onnxruntime session (1 thread), LRU cache, "
        f"hybrid recall; backend `{_get(S, 'embedding', 'project', 'backend') or '?'}`",
        "- **Baseline (seed-style):** fp32 graph, onnxruntime `SessionOptions()` defaults (all cores), no "
        "embedding cache, vector-only recall, same store"
        + (f" — **{meta['baseline_skipped']}**" if meta.get("baseline_skipped") else ""),
        "",
        "Targets are for a 2-core x86 with one onnxruntime thread. Latencies are wall time through the "
        "public "
        "`Memory` / embedder API; recall latencies include embedding the (new, uncached) query.",
        "",
        "## Results",
        "",
    ]
    table = [[r["group"], r["metric"], r["seed"], r["target"], r["project_text"], r["baseline_text"],
              r["status"]] for r in rows]
    lines.append(_md_table(["Group", "Metric", "Seed", "Target", "memento-edge", "Baseline", "Status"],
                           table))
    passed = sum(r["status"] == "PASS" for r in rows)
    judged = sum(r["status"] in ("PASS", "FAIL", "error", "no data") for r in rows)
    lines += ["", f"**{passed} of {judged} targets met.**", "",
              "¹ the seed's \"Recall (5 results, seeded DB)\" figure; its store size is not stated.  ",
              "² the seed's \"search accuracy at 200\" test, not LoCoMo.", ""]

    lines += _recall_detail(S) + _fill_note(S) + _quality_section(S) + _ablation_section(S) + _http_section(S)
    lines += ["## Images", "", png_note, ""]
    lines += ["## Time per section", ""]
    lines.append(_md_table(["Section", "Seconds"],
                           [[k, f"{v:.1f}"] for k, v in results.get("timing_s", {}).items()]))
    errs = _errors(S)
    if errs:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errs]
    return "\n".join(lines) + "\n"


def _recall_detail(S: Dict[str, Any]) -> List[str]:
    out: List[List[List[str]]] = []
    for side in ("project", "baseline"):
        rec = _get(S, "store", side, "recall")
        if not isinstance(rec, dict):
            continue
        out.append([])
        for size, modes in sorted(rec.items(), key=lambda kv: int(kv[0])):
            for mode, d in modes.items():
                out[-1].append([side, f"{int(size):,}", mode, fmt(_get(d, "uncached", "median"), "ms"),
                                fmt(_get(d, "uncached", "p95"), "ms"), fmt(_get(d, "cached", "median"), "ms"),
                                fmt(_get(d, "cached", "p95"), "ms"), f"{d.get('mean_hits', 0):.1f}"])
    if not out:
        return []
    rows = [r for block in out for r in block]
    return ["## Recall latency detail (top-5)", "",
            "\"new query\" embeds the query (LRU miss); \"repeated\" runs the same queries again "
            "(the project's "
            "cache then holds the vectors, so this is ~search time; the baseline has no cache).", "",
            _md_table(["Side", "Memories", "Mode", "new query p50", "new query p95", "repeated p50",
                       "repeated p95", "hits"], rows), ""]


def _fill_note(S: Dict[str, Any]) -> List[str]:
    fill = _get(S, "store", "project", "fill")
    if not isinstance(fill, dict):
        return []
    secs = ", ".join(f"{int(k):,}: {v:.1f} s" for k, v in fill.get("seconds", {}).items())
    sizes = ", ".join(f"{int(k):,}: {v / 1e6:.1f} MB" for k, v in fill.get("db_bytes", {}).items())
    return ["### How the stores were filled", "", fill.get("method", ""), "",
            f"Cumulative fill time to each size (project): {secs}. Database size (file + WAL, before "
            f"checkpoint): {sizes}.", ""]


def _quality_section(S: Dict[str, Any]) -> List[str]:
    q = S.get("quality")
    if not isinstance(q, dict):
        return []
    out = ["## Retrieval quality (LoCoMo, evidence recall)", ""]
    rows = []
    for side in ("project", "baseline"):
        d = q.get(side)
        if not isinstance(d, dict):
            continue
        if "skipped" in d or "error" in d:
            rows.append([side, str(d.get("skipped") or d.get("error")), "", "", ""])
            continue
        for mode, v in d.get("modes", {}).items():
            label = ("memento-edge int8" if side == "project" else "baseline fp32")
            rows.append([label, mode, fmt(v.get("R@5")), fmt(v.get("R@10")), fmt(v.get("hit@5"))])
    out.append(_md_table(["Model", "Mode", "R@5", "R@10", "hit@5"], rows))
    proj: Dict[str, Any] = q["project"] if isinstance(q.get("project"), dict) else {}
    convs = proj.get("conversations") or {}
    if convs:
        out += ["", "Conversations: " + "; ".join(
            f"{c}: {v['turns']} turns, {v['questions']} questions" for c, v in convs.items())
            + ". " + str(proj.get("protocol", "")) + ".", ""]
        per = _get(proj, "modes", "hybrid", "per_conversation") or {}
        if per:
            out.append("Hybrid R@10 per conversation: "
                       + ", ".join(f"{c}: {v['R@10']:.3f}" for c, v in per.items())
                       + ".")
        cats = _get(proj, "modes", "hybrid", "per_category") or {}
        if cats:
            out.append("Hybrid R@10 per question category: " + ", ".join(
                f"{c}: {v['R@10']:.3f}" for c, v in cats.items()) + ".")
    for n in proj.get("notes", []) or []:
        out.append(f"Note: {n}")
    exps = proj.get("fusion_experiments")
    if exps:
        out += ["", "### Fusion experiments (offline, from each question's vector and keyword top-100)", "",
                "Each retriever contributes its top 50 (the product's HYBRID_POOL). keyword_query: `store` = "
                "store.fts_query (OR of quoted terms, stopwords dropped); `or_all_terms` keeps stopwords; "
                "`or_no_speakers` also drops the conversation's speaker names; `and_then_or` = AND of the "
                "terms, topped up with the OR results. rrf = reciprocal-rank fusion; score = alpha x min-max "
                "cosine + (1 - alpha) x min-max bm25 (the hybrid fusion before fusion.py; "
                "python -m bench.fusion_cv compares today's).", ""]
        current = [e for e in exps if e.get("fusion") == "rrf" and e.get("keyword_query") == "store"
                   and e.get("rrf_k") == 60 and e.get("w_vector") == 1.0 and e.get("w_keyword") == 1.0]
        best = sorted(exps, key=lambda e: (-e["R@10"], -e["R@5"]))[:12]
        kw_only = [e for e in exps if e.get("fusion") == "keyword-only"]
        shown = current + [e for e in best if e not in current] + [e for e in kw_only if e not in best]

        def desc(e: Dict[str, Any]) -> str:
            if e.get("fusion", "rrf") == "rrf":
                return f"rrf k={e['rrf_k']:g}, w_vec={e['w_vector']:g}, w_kw={e['w_keyword']:g}"
            if e.get("fusion") == "score":
                return f"score alpha={e['alpha']:g}"
            return "keyword only"

        out.append(_md_table(["Fusion", "keyword_query", "R@5", "R@10", "hit@5"],
                             [[desc(e), e.get("keyword_query", ""), fmt(e["R@5"]), fmt(e["R@10"]),
                               fmt(e["hit@5"])] for e in shown]))
    return out + [""]


def _ablation_section(S: Dict[str, Any]) -> List[str]:
    a = S.get("ablation")
    if not isinstance(a, dict):
        return []
    out = ["## onnxruntime session-option ablation (memento-edge int8, one process per variant)", ""]
    if "skipped" in a:
        return out + [_md_table(["Variant", "Result"], [["all", a["skipped"]]]), ""]
    rows = []
    for name, d in a.get("variants", {}).items():
        if "error" in d:
            rows.append([name, "error: " + str(d["error"])[:80], "", "", "", "", ""])
            continue
        rows.append([name, fmt(_get(d, "rss_after_load", "rss_mb"), "MB"),
                     fmt(_get(d, "rss_after", "rss_mb"), "MB"),
                     fmt(_get(d, "rss_after", "hwm_mb"), "MB"), fmt(_get(d, "short", "median"), "ms"),
                     fmt(_get(d, "long", "median"), "ms"),
                     fmt(_get(d, "batch20_ms_per_item", "median"), "ms")])
    out.append(_md_table(["Variant", "RSS after load", "RSS after runs", "VmHWM", "~12 tok median",
                          "~200 tok median", "batch-20 ms/item"], rows))
    return out + [""]


def _http_section(S: Dict[str, Any]) -> List[str]:
    h = S.get("http")
    if not isinstance(h, dict):
        return []
    if isinstance(h.get("markdown"), str):
        return [h["markdown"].rstrip(), ""]
    out = ["## HTTP (bench/http_bench.py)", ""]
    if "rows" in h and isinstance(h["rows"], list):
        rows = [[str(r.get("metric", "")),
                 str(r.get("value", "")) + (" " + r["unit"] if r.get("unit") else ""),
                 str(r.get("target", "")), str(r.get("status", ""))]
                for r in h["rows"] if isinstance(r, dict)]
        out.append(_md_table(["Metric", "Value", "Target", "Status"], rows))
    else:
        flat = [[k, json.dumps(v) if not isinstance(v, (int, float, str)) else str(v)] for k, v in h.items()]
        out.append(_md_table(["Key", "Value"], flat))
    return out + [""]


def _errors(S: Dict[str, Any]) -> List[str]:
    out = []
    for name, sec in S.items():
        if not isinstance(sec, dict):
            continue
        subs = sec.get("variants", sec) if name == "ablation" else sec
        for side, d in subs.items():
            if isinstance(d, dict) and "error" in d:
                out.append(f"{name} / {side}: {d['error']}")
        if "error" in sec and isinstance(sec["error"], str):
            out.append(f"{name}: {sec['error']}")
    return out


# ------------------------------------------------------------------------------------------------
# PNG
# ------------------------------------------------------------------------------------------------
def plot_recall(results: Dict[str, Any], path: Path) -> str:
    """Recall latency (p50, p95 dashed) vs store size per side and mode; returns a note for the report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Recall-latency plot skipped: matplotlib is not installed (`pip install matplotlib`)."
    S = results.get("sections", {})
    series = []
    for side in ("project", "baseline"):
        rec = _get(S, "store", side, "recall")
        if not isinstance(rec, dict):
            continue
        sizes = sorted(int(s) for s in rec)
        for mode in (["hybrid", "vector", "keyword"] if side == "project" else ["vector"]):
            p50 = [_get(rec, str(s), mode, "uncached", "median") for s in sizes]
            p95 = [_get(rec, str(s), mode, "uncached", "p95") for s in sizes]
            if all(v is not None for v in p50):
                label = ("memento-edge " if side == "project" else "baseline ") + mode
                series.append((label, sizes, p50, p95))
    if not series:
        return "Recall-latency plot skipped: no recall measurements."
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for label, sizes, p50, p95 in series:
        line = ax.plot(sizes, p50, marker="o", label=f"{label} p50")[0]
        ax.plot(sizes, p95, linestyle="--", color=line.get_color(), alpha=0.6)
    targets = [(10_000, 8, "target p50 @10k"), (100_000, 60, "target p50 @100k")]
    for x, y, lab in targets:
        if any(x in s[1] for s in series):
            ax.scatter([x], [y], marker="x", color="red", zorder=5)
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(-40, 6), fontsize=7, color="red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memories in the store")
    ax.set_ylabel("recall top-5 latency, ms (dashed: p95)")
    meta = results.get("meta", {})
    ax.set_title(f"memento-edge recall latency vs store size — {meta.get('platform')} "
                 f"({meta.get('profile')})",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"![recall latency vs store size]({path.name})"


def write_all(results: Dict[str, Any], prefix: Path) -> List[Path]:
    """Write ``PREFIX.json``, ``PREFIX.md`` and (with matplotlib) ``PREFIX-recall.png``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rows = build_rows(results)
    results["rows"] = rows
    png = prefix.parent / (prefix.name + "-recall.png")
    try:
        note = plot_recall(results, png)
    except Exception as exc:  # a plotting problem must not lose the measurements
        note = f"Recall-latency plot failed: {type(exc).__name__}: {exc}"
    paths = []
    js = prefix.parent / (prefix.name + ".json")
    js.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    paths.append(js)
    md = prefix.parent / (prefix.name + ".md")
    try:
        text = render_markdown(results, rows, note)
    except Exception as exc:  # never lose a run to a rendering bug: the JSON is already written
        import traceback

        text = (f"# memento-edge benchmark\n\nMarkdown rendering failed ({type(exc).__name__}: {exc}); "
                f"the measurements are in {js.name}.\n\n```\n{traceback.format_exc()[-2000:]}\n```\n")
    md.write_text(text, encoding="utf-8")
    paths.append(md)
    if png.exists() and note.startswith("!["):
        paths.append(png)
    return paths
