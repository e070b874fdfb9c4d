"""Retrieval quality on LoCoMo (evidence recall@k), per recall mode, project vs seed-style baseline.

Protocol (``shared/README.md``): one store per conversation; every turn is stored as
``"Speaker: text"`` with its dia_id, session and date as metadata; for each question whose category is
not 5 (adversarial) recall the top k; evidence recall@k = share of the question's evidence dia_ids found
in the top k; averaged over questions, then over conversations (macro). Malformed evidence ids
(``D:11:26``, ``D30:05``, ``"D8:6; D9:17"``) are normalised to ``D<session>:<turn>``; questions left
with no evidence id are skipped. The data is read from ``shared/data/locomo-dev`` at run time and never
copied into the repository or the results.

On the project side the harness also records, per question, the vector and keyword rankings (top
100) so that fusion variants (RRF k, per-list weights) can be scored offline without touching the store;
see :func:`fusion_experiments`.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .engine import REPO_ROOT, Spec, make_side_embedder, now_ms, open_memory, settings_for, side_modes

_SESSION_KEY = re.compile(r"session_(\d+)$")
_EVIDENCE = re.compile(r"D\s*:?\s*(\d+)\s*:\s*(\d+)")
KS = (5, 10)


def default_data_dir() -> Optional[Path]:
    """``shared/data/locomo-dev`` beside the checkout (CI) or at /work/shared (development)."""
    for cand in (REPO_ROOT.parent / "shared" / "data" / "locomo-dev", Path("/work/shared/data/locomo-dev")):
        if cand.is_dir():
            return cand
    return None


def normalise_dia_id(raw: str) -> List[str]:
    """All ``D<session>:<turn>`` ids in ``raw`` with leading zeros dropped (``"D30:05"`` -> ``D30:5``)."""
    return [f"D{int(s)}:{int(t)}" for s, t in _EVIDENCE.findall(str(raw))]


def normalise_evidence(evidence: Iterable[str]) -> List[str]:
    """Normalised, de-duplicated evidence ids of one question (order kept)."""
    out: List[str] = []
    for raw in evidence:
        for e in normalise_dia_id(raw):
            if e not in out:
                out.append(e)
    return out


def load_conversation(path: Path) -> Dict[str, Any]:
    """Turns (with session number and date) and scorable questions of one LoCoMo conversation file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    conv = data.get("conversation", data)
    turns = []
    for key in sorted((k for k in conv if _SESSION_KEY.match(k)), key=lambda k: int(k.split("_")[1])):
        n = int(_SESSION_KEY.match(key).group(1))  # type: ignore[union-attr]
        date = conv.get(f"{key}_date_time")
        for turn in conv[key]:
            ids = normalise_dia_id(turn["dia_id"])
            turns.append({"dia_id": ids[0] if ids else turn["dia_id"], "speaker": turn["speaker"],
                          "text": turn["text"], "session": n, "date": date})
    questions, skipped = [], 0
    for qa in data.get("qa", []):
        if qa.get("category") == 5:
            continue
        ev = normalise_evidence(qa.get("evidence", []))
        if not ev:
            skipped += 1
            continue
        questions.append({"question": qa["question"], "evidence": ev, "category": qa.get("category")})
    return {"id": path.stem, "turns": turns, "questions": questions, "skipped_no_evidence": skipped}


def score(ranked: Sequence[List[str]], evidence: Sequence[str]) -> Dict[str, float]:
    """R@k for k in :data:`KS` and hit@5 of one ranking (each rank holds the dia_ids of one memory)."""
    ev = set(evidence)
    out: Dict[str, float] = {}
    for k in KS:
        found = {d for hit in ranked[:k] for d in hit} & ev
        out[f"R@{k}"] = len(found) / len(ev)
    out["hit@5"] = 1.0 if {d for hit in ranked[:5] for d in hit} & ev else 0.0
    return out


def _mean_scores(rows: List[Dict[str, float]]) -> Dict[str, float]:
    keys = [f"R@{k}" for k in KS] + ["hit@5"]
    return {k: statistics.fmean(r[k] for r in rows) if rows else float("nan") for k in keys}


def macro(per_conv: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Average of per-conversation means."""
    keys = [f"R@{k}" for k in KS] + ["hit@5"]
    vals = list(per_conv.values())
    return {k: statistics.fmean(v[k] for v in vals) if vals else float("nan") for k in keys}


def rrf(lists: Sequence[Sequence[int]], k: float = 60.0,
        weights: Optional[Sequence[float]] = None) -> List[int]:
    """Reciprocal-rank fusion of ranked id lists: score(id) = sum_i w_i / (k + rank_i(id)), rank from 1."""
    weights = weights or [1.0] * len(lists)
    scores: Dict[int, float] = {}
    for w, ids in zip(weights, lists):
        for rank, mid in enumerate(ids, start=1):
            scores[mid] = scores.get(mid, 0.0) + w / (k + rank)
    return [mid for mid, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))]


FUSION_GRID: List[Tuple[float, float, float]] = [
    # (rrf_k, vector weight, keyword weight)
    (60, 1.0, 1.0), (30, 1.0, 1.0), (10, 1.0, 1.0), (5, 1.0, 1.0), (1, 1.0, 1.0),
    (60, 1.0, 0.5), (60, 0.5, 1.0), (10, 1.0, 0.5), (10, 0.5, 1.0), (10, 0.7, 1.0), (5, 0.7, 1.0),
]
#: Convex combination of per-query min-max normalised scores: alpha * cosine + (1 - alpha) * bm25.
SCORE_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7)
#: Keyword query constructions tried against the store's FTS5 table ("store" is what store.py does).
KEYWORD_VARIANTS = ("store", "or_all_terms", "or_no_speakers", "and_then_or")
#: Candidates per retriever before fusion: the product's HYBRID_POOL (memory.py) is 50.
FUSION_DEPTH = 50


def fuse_scores(vec: Sequence[Tuple[int, float]], kw: Sequence[Tuple[int, float]], alpha: float) -> List[int]:
    """Ids ranked by the product's own score fusion (``memory._fuse``) at weight ``alpha``."""
    from memento_edge.memory import _fuse

    return [mid for mid, _ in _fuse(vec, kw, alpha)]


def fusion_experiments(records: Dict[str, List[Dict[str, Any]]],
                       depth: int = FUSION_DEPTH) -> List[Dict[str, Any]]:
    """Score fusion variants offline from the recorded rankings of each question.

    ``records[conv]`` is a list of ``{"vector": [(id, cos)], "keyword": {variant: [(id, bm25)]},
    "evidence": [...], "dia": {id: [dia_ids]}}`` (top 100 each). Returns one dict per variant with
    macro R@5 / R@10 / hit@5; ``fusion`` is "rrf", "score" or "keyword-only".
    """
    variants: List[Tuple[str, Dict[str, Any], Any]] = []
    for kv in KEYWORD_VARIANTS:
        variants.append(("keyword-only", {"keyword_query": kv},
                         lambda r, kv=kv: [i for i, _ in r["keyword"][kv][:depth]]))
        for k, wv, wk in FUSION_GRID:
            variants.append(("rrf", {"keyword_query": kv, "rrf_k": k, "w_vector": wv, "w_keyword": wk},
                             lambda r, kv=kv, k=k, wv=wv, wk=wk: rrf(
                                 [[i for i, _ in r["vector"][:depth]],
                                  [i for i, _ in r["keyword"][kv][:depth]]],
                                 k=k, weights=[wv, wk])))
        for alpha in SCORE_ALPHAS:
            variants.append(("score", {"keyword_query": kv, "alpha": alpha},
                             lambda r, kv=kv, a=alpha: fuse_scores(r["vector"][:depth],
                                                                   r["keyword"][kv][:depth], a)))
    out = []
    for fusion, desc, fn in variants:
        per_conv = {}
        for conv, rows in records.items():
            scored = []
            for row in rows:
                ranked = [row["dia"].get(str(mid), []) for mid in fn(row)[: max(KS)]]
                scored.append(score(ranked, row["evidence"]))
            per_conv[conv] = _mean_scores(scored)
        out.append({"fusion": fusion, **desc, "depth": depth, **macro(per_conv),
                    "R@10_per_conversation": {c: v["R@10"] for c, v in per_conv.items()}})
    return out


def keyword_variant_query(variant: str, question: str, speakers: Sequence[str]) -> Optional[str]:
    """The FTS5 MATCH expression of one keyword-query construction (None: nothing to search)."""
    from memento_edge.store import fts_query

    if variant == "store":
        return fts_query(question)
    if variant == "or_all_terms":
        return fts_query(question, keep_stopwords=True)
    if variant == "or_no_speakers":
        # Every memory starts with "Speaker:", so a speaker's name matches half the conversation.
        names = {n.lower() for n in speakers}
        stripped = " ".join(w for w in re.findall(r"\w+", question) if w.lower() not in names
                            and w.lower().rstrip("s") not in names)
        return fts_query(stripped) or fts_query(question)
    if variant == "and_then_or":
        q = fts_query(question)
        return None if q is None else q  # the AND form is tried first in _keyword_hits
    raise ValueError(variant)


def _keyword_hits(mem: Any, variant: str, question: str, speakers: Sequence[str],
                  k: int) -> List[Tuple[int, float]]:
    """Top ``k`` (id, -bm25) straight from the store's FTS5 table for one query construction."""
    match = keyword_variant_query(variant, question, speakers)
    if match is None:
        return []
    sql = ("SELECT rowid, bm25(memories_fts) FROM memories_fts WHERE memories_fts MATCH ? "
           "ORDER BY 2 LIMIT ?")
    with mem.store.reader() as conn:
        rows: List[Any] = []
        if variant == "and_then_or":
            rows = conn.execute(sql, (match.replace(" OR ", " AND "), k)).fetchall()
            seen = {r[0] for r in rows}
            if len(rows) < k:
                extra = [r for r in conn.execute(sql, (match, k)).fetchall() if r[0] not in seen]
                rows += extra[: k - len(rows)]
        else:
            rows = conn.execute(sql, (match, k)).fetchall()
    return [(int(r[0]), -float(r[1])) for r in rows]


def _remember_turns(mem: Any, conv: Dict[str, Any]) -> Dict[int, List[str]]:
    """Store every turn; map memory id -> dia_ids (identical turns share one memory when deduplicated)."""
    items = [{"text": f"{t['speaker']}: {t['text']}", "collection": f"locomo-{conv['id']}",
              "session_id": f"S{t['session']}",
              "metadata": {"dia_id": t["dia_id"], "session": t["session"], "date": t["date"]}}
             for t in conv["turns"]]
    results = mem.remember_many(items)
    dia: Dict[int, List[str]] = {}
    for turn, r in zip(conv["turns"], results):
        mid = r.id if r.created or r.duplicate_of is None else r.duplicate_of
        dia.setdefault(int(mid), []).append(turn["dia_id"])
    return dia


def evaluate_side(spec: Spec, params: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """Evidence R@5 / R@10 / hit@5 per recall mode of one side (worker section ``quality``)."""
    data_dir = Path(params["locomo_dir"]) if params.get("locomo_dir") else default_data_dir()
    if data_dir is None or not data_dir.is_dir():
        return {"skipped": "LoCoMo data not found (expected shared/data/locomo-dev beside the checkout)"}
    files = sorted(data_dir.glob("*.json"))
    wanted = params.get("quality_conversations")
    if wanted:
        files = [f for f in files if f.stem in {str(w) for w in wanted}]
    max_q = params.get("quality_max_questions")
    modes = side_modes(spec)
    emb = make_side_embedder(spec, work)
    emb.load()
    per_mode: Dict[str, Dict[str, Dict[str, float]]] = {m: {} for m in modes}
    per_cat: Dict[str, Dict[str, List[Dict[str, float]]]] = {m: {} for m in modes}
    records: Dict[str, List[Dict[str, Any]]] = {}
    notes = set()
    counts = {}
    t0 = now_ms()
    record = spec["side"] == "project" and params.get("quality_experiments", True)
    for path in files:
        conv = load_conversation(path)
        qs = conv["questions"][: int(max_q)] if max_q else conv["questions"]
        counts[conv["id"]] = {"turns": len(conv["turns"]), "questions": len(qs),
                              "skipped_no_evidence": conv["skipped_no_evidence"]}
        mem = open_memory(settings_for(spec, work, f"locomo-{conv['id']}.db"), emb)
        try:
            dia = _remember_turns(mem, conv)
            known = {d for ds in dia.values() for d in ds}
            counts[conv["id"]]["evidence_ids_not_in_turns"] = sum(
                1 for q in qs for e in q["evidence"] if e not in known)
            for mode in modes:
                rows = []
                for q in qs:
                    res = mem.recall(q["question"], topk=max(KS), mode=mode)
                    if getattr(res, "note", None):
                        notes.add(f"{mode}: {res.note}")
                    ranked = [dia.get(int(h.id), []) for h in res.hits]
                    s = score(ranked, q["evidence"])
                    rows.append(s)
                    per_cat[mode].setdefault(str(q["category"]), []).append(s)
                per_mode[mode][conv["id"]] = _mean_scores(rows)
            if record:
                speakers = sorted({t["speaker"] for t in conv["turns"]})
                recs = []
                for q in qs:
                    qvec = emb.embed(q["question"])
                    vec = [(int(i), float(sc)) for i, sc in mem.store.vector_search(qvec, 100)]
                    kw = {v: _keyword_hits(mem, v, q["question"], speakers, 100) for v in KEYWORD_VARIANTS}
                    recs.append({"vector": vec, "keyword": kw, "evidence": q["evidence"],
                                 "dia": {str(k): v for k, v in dia.items()}})
                records[conv["id"]] = recs
        finally:
            mem.close()
    out: Dict[str, Any] = {
        "backend": getattr(emb, "backend", "?"),
        "conversations": counts,
        "modes": {m: {**macro(per_mode[m]), "per_conversation": per_mode[m],
                      "per_category": {c: _mean_scores(v) for c, v in sorted(per_cat[m].items())}}
                  for m in modes},
        "notes": sorted(notes),
        "seconds": (now_ms() - t0) / 1000.0,
        "protocol": "one store per conversation, turns as 'Speaker: text' with dia_id/session/date metadata, "
                    "categories 1-4, evidence recall@k macro-averaged over conversations",
    }
    if records:
        out["fusion_experiments"] = fusion_experiments(records)
    return out


# --- the recall-quality command: ``python -m bench.quality`` ----------------------------------------
def _project_spec(model_dir: Optional[str]) -> Spec:
    from .engine import DEFAULT_MODEL_DIR

    return {"side": "project", "model_dir": str(model_dir or DEFAULT_MODEL_DIR)}


def paraphrase_modes(spec: Spec, work: Path, modes: Sequence[str], embedder: Any = None) -> Dict[str, Any]:
    """top-1 / MRR / hit@5 per recall mode on the paraphrase dev set (see :mod:`bench.paraphrase`);
    ``embedder`` replaces the side's (bench/static_table.py scores its table this way)."""
    from . import paraphrase

    data = paraphrase.load()
    emb = embedder if embedder is not None else make_side_embedder(spec, work)
    mem = open_memory(settings_for(spec, work, "paraphrase.db"), emb)
    try:
        key_of = paraphrase.fill(mem, data["notes"])
        out = {}
        for mode in modes:
            def ranker(q: str, mode: str = mode) -> List[str]:
                return [key_of[int(h.id)] for h in mem.recall(q, topk=10, mode=mode).hits]
            out[mode] = paraphrase.evaluate(ranker, data["questions"])
        return {"notes": len(data["notes"]), "questions": len(data["questions"]), "modes": out}
    finally:
        mem.close()


def locomo_modes(spec: Spec, work: Path, modes: Sequence[str],
                 data_dir: Optional[Path] = None, embedder: Any = None) -> Dict[str, Any]:
    """Evidence R@5 / R@10 / hit@5 per recall mode and per LoCoMo dev conversation (``embedder``
    replaces the side's).

    Shipped modes have no per-fold parameter, so each conversation's figure is already a held-out one
    as long as the shipped parameters were not chosen on it (see ``held_out_note``).
    """
    data_dir = data_dir or default_data_dir()
    if data_dir is None:
        return {"skipped": "LoCoMo data not found"}
    emb = embedder if embedder is not None else make_side_embedder(spec, work)
    per_mode: Dict[str, Dict[str, Dict[str, float]]] = {m: {} for m in modes}
    for path in sorted(data_dir.glob("*.json")):
        conv = load_conversation(path)
        mem = open_memory(settings_for(spec, work, f"cv-locomo-{conv['id']}.db"), emb)
        try:
            dia = _remember_turns(mem, conv)
            for mode in modes:
                rows = [score([dia.get(int(h.id), []) for h in mem.recall(q["question"], topk=max(KS),
                                                                             mode=mode).hits], q["evidence"])
                        for q in conv["questions"]]
                per_mode[mode][conv["id"]] = _mean_scores(rows)
        finally:
            mem.close()
    return {m: {**macro(v), "per_conversation": v} for m, v in per_mode.items()}


def _print_summary(result: Dict[str, Any]) -> None:
    para = result.get("paraphrase")
    if para:
        print(f"paraphrase set: {para['notes']} notes, {para['questions']} questions")
        for mode, m in para["modes"].items():
            halves = "  ".join(f"{h}: top-1 {v['top1']:.3f}" for h, v in m["per_half"].items())
            print(f"  {mode:8s} top-1 {m['top1']:.3f}  MRR {m['mrr']:.3f}  hit@5 {m['hit@5']:.3f}   ({halves})")
    loc = result.get("locomo")
    if loc and "skipped" not in loc:
        print("LoCoMo dev, evidence recall (per conversation = held out when nothing was tuned on it)")
        for mode, m in loc.items():
            per = "  ".join(f"{c}: {v['R@10']:.3f}" for c, v in m["per_conversation"].items())
            print(f"  {mode:8s} R@10 {m['R@10']:.3f}  R@5 {m['R@5']:.3f}   ({per})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Recall quality of the shipped modes on the paraphrase dev set and on LoCoMo dev."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=main.__doc__)
    ap.add_argument("--sets", default="paraphrase,locomo", help="comma list: paraphrase, locomo")
    ap.add_argument("--modes", default="hybrid,vector,keyword")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the full result here")
    args = ap.parse_args(argv)
    spec = _project_spec(args.model_dir)
    modes = [m for m in args.modes.split(",") if m]
    sets = set(args.sets.split(","))
    result: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="memento-quality-") as tmp:
        work = Path(tmp)
        if "paraphrase" in sets:
            result["paraphrase"] = paraphrase_modes(spec, work, modes)
        if "locomo" in sets:
            result["locomo"] = locomo_modes(spec, work, modes)
    _print_summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
