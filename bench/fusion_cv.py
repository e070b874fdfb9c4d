"""Hybrid fusion variants, scored offline with cross-validation: ``python -m bench.fusion_cv``.

For every question of the paraphrase dev set (:mod:`bench.paraphrase`) and of the three LoCoMo dev
conversations it records, once, what both retrievers see with the real model: the vector side's top
candidates with exact cosines, the keyword side's top candidates with BM25, every candidate's cosine,
the query's keyword terms with their document counts, and which terms each candidate contains. Fusion
variants are then ranked from these records without touching a store.

Candidates include the turns next to a candidate in its session (the dialogue context of fusion.fuse).

Cross-validation: six folds, each holding out one LoCoMo conversation *and* one half of the
paraphrase questions. A variant's free parameters are chosen on the rest (mean of paraphrase top-1 and
LoCoMo evidence R@10, equally weighted) and scored on what was held out. Reported per variant: the
held-out paraphrase top-1 / MRR and LoCoMo R@10, each the mean and standard deviation over the six
folds (each LoCoMo conversation scored with parameters chosen without it). Nothing reported is tuned on
itself.

Query gate (issue #10, shipped): the "query gate" families weigh the keyword evidence by fusion's gate,
which lets it count only for a query with an exact token (identifier, number, quoted phrase, name) whose
vector side is not decisive, or for a memory holding every query term (shipped: "... full coverage not
gated"); the others are its ablations.

External word frequency (issue #10, not shipped: it did not improve the held-out figures): when the
``wordfreq`` package is installed (``pip install wordfreq``; code Apache-2.0, data CC BY-SA 4.0, used
here only at bench time and never copied into the repository), three more families discount the keyword
evidence of words that are common in English ("buy", "food", "run") even where a small store's IDF
calls them rare; identifiers, numbers and words not in the table keep their full weight. Without the
package those families are skipped and say so.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import paraphrase, quality
from .engine import make_side_embedder, open_memory, settings_for

POOL = 50  # candidates per side, as memory.HYBRID_POOL


# --- recording ------------------------------------------------------------------------------------
def record_question(mem: Any, emb: Any, question: str, relevant: Sequence[int], pool: int = POOL) -> Dict[str, Any]:
    """What both retrievers see for one question (see the module docstring)."""
    from memento_edge.store import query_terms

    store = mem.store
    qvec = np.asarray(emb.embed(question), dtype=np.float32)
    vec = store.vector_search(qvec, pool)
    kw = store.keyword_search(question, pool)
    ids = sorted({i for i, _ in vec} | {i for i, _ in kw})
    near = store.session_neighbours(ids)
    ids = sorted(set(ids) | set(near))
    sims = store.exact_similarities(qvec, ids)
    terms = query_terms(question)
    n, df, matched = store.term_matches(terms, ids)
    return {"vector": [int(i) for i, _ in vec], "keyword": [[int(i), float(s)] for i, s in kw],
            "sims": {int(i): float(s) for i, s in sims.items()}, "terms": [t.text for t in terms],
            "docs": n, "df": df, "matched": {int(k): v for k, v in matched.items()},
            "near": {int(k): v for k, v in near.items()}, "relevant": sorted(int(i) for i in relevant)}


def record_paraphrase(spec: Dict[str, Any], work: Path) -> List[Dict[str, Any]]:
    """Records of every paraphrase question (``half`` and ``kind`` kept)."""
    data = paraphrase.load()
    emb = make_side_embedder(spec, work)
    mem = open_memory(settings_for(spec, work, "fcv-paraphrase.db"), emb)
    try:
        key_of = paraphrase.fill(mem, data["notes"])
        id_of = {k: i for i, k in key_of.items()}
        return [{**record_question(mem, emb, q["question"], [id_of[q["note"]]]), "half": q["half"],
                 "kind": q["kind"], "question": q["question"]} for q in data["questions"]]
    finally:
        mem.close()


def record_locomo(spec: Dict[str, Any], work: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Records of every scorable question per LoCoMo dev conversation (relevant = evidence turns)."""
    data_dir = quality.default_data_dir()
    if data_dir is None:
        return {}
    emb = make_side_embedder(spec, work)
    out = {}
    for path in sorted(data_dir.glob("*.json")):
        conv = quality.load_conversation(path)
        mem = open_memory(settings_for(spec, work, f"fcv-locomo-{conv['id']}.db"), emb)
        try:
            dia = quality._remember_turns(mem, conv)
            recs = []
            for q in conv["questions"]:
                rel = [i for i, ds in dia.items() if set(ds) & set(q["evidence"])]
                rec = record_question(mem, emb, q["question"], rel)
                rec["evidence"] = q["evidence"]
                rec["question"] = q["question"]
                rec["dia"] = {int(i): ds for i, ds in dia.items() if i in rec["sims"]}
                recs.append(rec)
            out[conv["id"]] = recs
        finally:
            mem.close()
    return out


# --- features and variants ------------------------------------------------------------------------
def features(rec: Dict[str, Any]) -> Tuple[List[int], np.ndarray]:
    """Candidate ids and a feature matrix: similarity, coverage, best matched IDF / max IDF, bm25 rank score."""
    from memento_edge.fusion import coverage, idf

    ids = sorted(int(i) for i in rec["sims"])
    weights = [idf(d, rec["docs"]) for d in rec["df"]]
    top = idf(0, rec["docs"]) if rec["docs"] else 1.0
    bm = {int(i): s for i, s in rec["keyword"]}
    bmax = max(bm.values()) if bm else 1.0
    rows = []
    for i in ids:
        idx = rec["matched"].get(i, rec["matched"].get(str(i), []))
        rare = max((weights[t] for t in idx), default=0.0) / top
        rows.append([rec["sims"].get(i, rec["sims"].get(str(i), 0.0)), coverage(idx, weights), rare,
                     bm.get(i, 0.0) / bmax if bmax > 0 else 0.0])
    return ids, np.asarray(rows, dtype=np.float64).reshape(len(ids), 4)


Ranker = Callable[[Dict[str, Any]], List[int]]


def _by(ids: List[int], s: np.ndarray) -> List[int]:
    order = sorted(range(len(ids)), key=lambda n: (-s[n], ids[n]))
    return [ids[n] for n in order]


def linear(lam: float, mu: float = 0.0, p: float = 1.0, beta: float = 0.0, margin: float = float("inf"),
           floor: float = 1.0, lead_only: bool = False, full: bool = False) -> Ranker:
    """e = similarity + g * (lam * coverage**p + mu * coverage**p * rarity), plus beta times the better
    session neighbour's e (the logistic score's ranking, fusion.fuse). g is fusion's query gate with
    ``gate_margin`` ``margin`` and ``gate_floor`` ``floor`` (the defaults: always 1); ``lead_only``: the
    gate ignores the query's tokens (every query counts as having an exact one); ``full``: a memory holding
    every query term is not gated (as fusion.fuse)."""
    from memento_edge.fusion import FULL_COVERAGE, PARAMS, keyword_weight

    params = dataclasses.replace(PARAMS, gate_margin=margin, gate_floor=floor)

    def rank(rec: Dict[str, Any]) -> List[int]:
        ids, f = rec["_f"]
        c = f[:, 1] ** p
        g = keyword_weight(lead_only or rec["_exact"], rec["sims"], params)
        if full:
            g = np.where(f[:, 1] >= FULL_COVERAGE, 1.0, g)
        e = f[:, 0] + g * (lam * c + mu * c * f[:, 2])
        if beta and rec.get("near"):
            row = {i: n for n, i in enumerate(ids)}
            near = rec["near"]
            e = e + beta * np.array([max([0.0] + [e[row[j]] for j in near.get(i, ()) if j in row]) for i in ids])
        return _by(ids, e)
    return rank


def minmax(alpha: float) -> Ranker:
    """The shipped fusion before this change: convex mix of per-pool min-max normalised scores."""
    from memento_edge.memory import _fuse

    def rank(rec: Dict[str, Any]) -> List[int]:
        vec = [(i, rec["sims"][i]) for i in rec["vector"]]
        return [i for i, _ in _fuse(vec, [(i, s) for i, s in rec["keyword"]], alpha)]
    return rank


def rrf(k: float) -> Ranker:
    def rank(rec: Dict[str, Any]) -> List[int]:
        return quality.rrf([rec["vector"], [i for i, _ in rec["keyword"]]], k=k)
    return rank


def vector_only(rec: Dict[str, Any]) -> List[int]:
    return list(rec["vector"])


def keyword_only(rec: Dict[str, Any]) -> List[int]:
    return [i for i, _ in rec["keyword"]]


# --- external word frequency (see the module docstring) ----------------------------------------------
def _zipf_table() -> Optional[Callable[[str], float]]:
    """word -> Zipf frequency in English (log10 per billion words; "the" 7.7, "buy" 5.3, unknown 0), or
    None without the ``wordfreq`` package. Identifiers, phrases and anything with a digit count as unknown."""
    try:
        from wordfreq import zipf_frequency
    except ImportError:
        return None

    def zipf(term: str) -> float:
        return float(zipf_frequency(term, "en")) if term.isalpha() else 0.0
    return zipf


def _term_arrays(rec: Dict[str, Any], zipf: Callable[[str], float]) -> Dict[str, Any]:
    """Per record, cached: candidate ids, the candidates x terms match matrix, store IDFs, Zipf values and
    each candidate's session neighbours as row indices (padded with the index one past the last row)."""
    from memento_edge.fusion import idf

    if "_t" not in rec:
        ids = sorted(int(i) for i in rec["sims"])
        match = np.zeros((len(ids), max(len(rec["terms"]), 1)))
        for n, i in enumerate(ids):
            for t in rec["matched"].get(i, ()):
                match[n, t] = 1.0
        row = {i: n for n, i in enumerate(ids)}
        near = [[row[j] for j in rec.get("near", {}).get(i, ()) if j in row] for i in ids]
        width = max([len(x) for x in near] + [1])
        rec["_t"] = {"ids": np.asarray(ids), "sim": np.asarray([rec["sims"][i] for i in ids]), "m": match,
                     "idf": np.asarray([idf(d, rec["docs"]) for d in rec["df"]] or [0.0]),
                     "top": idf(0, rec["docs"]) if rec["docs"] else 1.0,
                     "zipf": np.asarray([zipf(t) for t in rec["terms"]] or [0.0]),
                     "near": np.asarray([x + [len(ids)] * (width - len(x)) for x in near], dtype=int)}
    return rec["_t"]


def _ranked(t: Dict[str, Any], e: np.ndarray, beta: float) -> List[int]:
    """Ids by evidence ``e`` plus ``beta`` times the better session neighbour's (as fusion.fuse), top 10."""
    if beta:
        padded = np.append(e, 0.0)
        e = e + beta * np.maximum(padded[t["near"]].max(axis=1), 0.0)
    return [int(i) for i in t["ids"][np.lexsort((t["ids"], -e))[:10]]]


def discounted(zipf: Callable[[str], float], lam: float, mu: float, p: float, beta: float, z0: float,
               s: float, prior: float) -> Ranker:
    """The shipped ranking with each matched term's IDF times ``g = 1 / (1 + exp(s * (zipf - z0)))`` (a
    word above Zipf ``z0`` counts for little). The coverage's denominator keeps the plain IDFs, so a
    common word's evidence shrinks instead of its share growing. The discount fades as the store grows,
    ``1 - (1 - g) * prior / (prior + N)``: a large store's own IDF is trusted (``prior`` inf: never fades)."""
    def rank(rec: Dict[str, Any]) -> List[int]:
        t = _term_arrays(rec, zipf)
        g = 1.0 / (1.0 + np.exp(s * (t["zipf"] - z0)))
        fade = 1.0 if prior == float("inf") else prior / (prior + rec["docs"])
        w = t["idf"] * (1.0 - (1.0 - g) * fade)
        total = t["idf"].sum()
        k = ((t["m"] @ w) / total if total > 0 else np.zeros(len(t["ids"]))) ** p
        return _ranked(t, t["sim"] + k * (lam + mu * (t["m"] * w).max(axis=1) / t["top"]), beta)
    return rank


def smoothed_idf(zipf: Callable[[str], float], lam: float, mu: float, p: float, beta: float, prior: float,
                 zref: float) -> Ranker:
    """The shipped ranking on an IDF smoothed by ``prior`` pseudo-documents of general English, in which a
    word of Zipf z occurs in a share ``min(1, 10 ** (z - zref))`` (a Bayesian prior that a large store
    outweighs; identifiers and unknown words occur in none)."""
    def rank(rec: Dict[str, Any]) -> List[int]:
        t = _term_arrays(rec, zipf)
        share = np.minimum(1.0, 10.0 ** (t["zipf"] - zref)) * (t["zipf"] > 0)
        df = np.asarray(rec["df"] or [0], dtype=float) + prior * share
        docs = rec["docs"] + prior
        w = np.log(1.0 + (np.maximum(docs - df, 0.0) + 0.5) / (df + 0.5))
        top = float(np.log(1.0 + (docs + 0.5) / 0.5))
        total = w.sum()
        k = ((t["m"] @ w) / total if total > 0 else np.zeros(len(t["ids"]))) ** p
        return _ranked(t, t["sim"] + k * (lam + mu * (t["m"] * w).max(axis=1) / top), beta)
    return rank


def external_families(zipf: Callable[[str], float]) -> Dict[str, List[Tuple[Dict[str, float], Ranker]]]:
    """The word-frequency families (see :func:`discounted` and :func:`smoothed_idf`)."""
    grid = list(itertools.product((0.3, 0.4, 0.6), (0.6, 1.0), (1.5, 2), (4.5, 5.0, 5.5), (2, 4)))
    return {
        "common-word discount": [({"lam": lam, "mu": mu, "p": p, "z0": z0, "s": s},
                                  discounted(zipf, lam, mu, p, 0.3, z0, s, float("inf")))
                                 for lam, mu, p, z0, s in grid],
        "common-word discount fading with N": [({"lam": lam, "mu": mu, "p": p, "z0": z0, "s": s, "prior": pr},
                                                discounted(zipf, lam, mu, p, 0.3, z0, s, pr))
                                               for (lam, mu, p, z0, s), pr in itertools.product(
                                                   grid, (0, 100, 300, 1000))],
        "IDF smoothed by word frequency": [({"lam": lam, "mu": mu, "p": p, "prior": pr, "zref": z},
                                            smoothed_idf(zipf, lam, mu, p, 0.3, pr, z))
                                           for lam, mu, p, pr, z in itertools.product(
                                               (0.3, 0.4, 0.6), (0.6, 1.0), (1.5, 2), (0, 100, 300, 1000, 3000),
                                               (6.5, 7.0, 7.5))],
    }


FAMILIES: Dict[str, List[Tuple[Dict[str, float], Ranker]]] = {
    "vector": [({}, vector_only)],
    "keyword": [({}, keyword_only)],
    "minmax (shipped before)": [({"alpha": a}, minmax(a)) for a in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)],
    "rrf": [({"k": k}, rrf(k)) for k in (5, 20, 60)],
    "sim + lam*coverage": [({"lam": lam}, linear(lam)) for lam in
                           (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5)],
    "sim + lam*cov + mu*cov*rarity": [({"lam": lam, "mu": mu}, linear(lam, mu)) for lam, mu in
                                      itertools.product((0.0, 0.1, 0.2, 0.3, 0.4, 0.6),
                                                        (0.1, 0.2, 0.4, 0.6, 1.0))],
    "sim + lam*coverage**p": [({"lam": lam, "p": p}, linear(lam, 0.0, p)) for lam, p in
                              itertools.product((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0), (1.5, 2, 3))],
    "sim + lam*cov**p + mu*cov**p*rarity": [({"lam": lam, "mu": mu, "p": p}, linear(lam, mu, p))
                                            for lam, mu, p in itertools.product(
                                                (0.0, 0.1, 0.2, 0.3, 0.4), (0.2, 0.4, 0.6, 1.0), (1.5, 2, 3))],
    "... + beta*session neighbour": [({"lam": lam, "mu": mu, "p": p, "beta": b}, linear(lam, mu, p, b))
                                     for lam, mu, p, b in itertools.product(
                                         (0.2, 0.3, 0.4), (0.4, 0.6, 1.0), (1.5, 2), (0.0, 0.2, 0.3, 0.4, 0.5))],
    # fusion's query gate: keyword evidence only for a query with an exact token (identifier, number,
    # quoted phrase, capitalised name) whose vector side leads by less than `margin`, else times `floor`
    "query gate (exact tokens)": [({"lam": lam, "mu": mu, "p": p, "floor": g0}, linear(lam, mu, p, 0.3, floor=g0))
                                  for lam, mu, p, g0 in itertools.product(
                                      (0.3, 0.4, 0.6), (0.4, 0.6, 1.0), (1.5, 2), (0.0, 0.1, 0.25, 0.5))],
    "query gate (exact tokens, vector lead)": [({"lam": lam, "mu": mu, "p": p, "floor": g0, "margin": m},
                                                linear(lam, mu, p, 0.3, m, g0))
                                               for lam, mu, p, g0, m in itertools.product(
                                                   (0.3, 0.4, 0.6), (0.4, 0.6, 1.0), (1.5, 2), (0.0, 0.25),
                                                   (0.1, 0.15, 0.2, 0.3))],
    "query gate (exact tokens, vector lead; full coverage not gated)": [
        ({"lam": lam, "mu": mu, "p": p, "floor": g0, "margin": m}, linear(lam, mu, p, 0.3, m, g0, full=True))
        for lam, mu, p, g0, m in itertools.product((0.3, 0.4, 0.6), (0.4, 0.6, 1.0), (1.5, 2), (0.0, 0.25),
                                                   (0.1, 0.15, 0.2, 0.3))],
    "query gate (vector lead only)": [({"lam": lam, "mu": mu, "p": p, "floor": g0, "margin": m},
                                       linear(lam, mu, p, 0.3, m, g0, lead_only=True))
                                      for lam, mu, p, g0, m in itertools.product(
                                          (0.3, 0.4, 0.6), (0.4, 0.6, 1.0), (1.5, 2), (0.0, 0.25),
                                          (0.05, 0.1, 0.15, 0.2, 0.3))],
}


# --- metrics and cross-validation -----------------------------------------------------------------
def para_metrics(recs: Sequence[Dict[str, Any]], ranker: Ranker) -> Dict[str, float]:
    rows = [paraphrase.rank_metrics([str(i) for i in ranker(r)[:10]], str(r["relevant"][0])) for r in recs]
    return paraphrase.mean_metrics(rows)


def locomo_r10(recs: Sequence[Dict[str, Any]], ranker: Ranker) -> float:
    vals = []
    for r in recs:
        dia = r["dia"]
        ranked = [dia.get(i, dia.get(str(i), [])) for i in ranker(r)[:10]]
        vals.append(quality.score(ranked, r["evidence"])["R@10"])
    return statistics.fmean(vals) if vals else float("nan")


def cross_validate(para: List[Dict[str, Any]], loc: Dict[str, List[Dict[str, Any]]],
                   families: Optional[Dict[str, List[Tuple[Dict[str, float], Ranker]]]] = None,
                   bar: bool = False) -> Dict[str, Any]:
    """Held-out figures per family (see the module docstring) and the parameters chosen on all data.

    ``bar``: choose parameters by issue #10's bar instead of the equal-weight mean: first reach vector's
    paraphrase top-1 on the training half (each point short costs 1.0), then the best training LoCoMo R@10.
    """
    from memento_edge.fusion import has_exact_tokens

    for r in para + [r for rs in loc.values() for r in rs]:
        r["_f"] = features(r)
        r["_exact"] = has_exact_tokens(r["question"])
    convs = sorted(loc)
    out: Dict[str, Any] = {}
    for name, grid in (FAMILIES if families is None else families).items():
        cache: Dict[Tuple[int, str], float] = {}

        def objective(n: int, halves: Sequence[str], cs: Sequence[str],
                      grid: List[Tuple[Dict[str, float], Ranker]] = grid,
                      cache: Dict[Tuple[int, str], float] = cache) -> float:
            ranker = grid[n][1]
            ps = [r for r in para if r["half"] in halves]
            key = (n, "para" + "".join(halves))
            if key not in cache:
                cache[key] = para_metrics(ps, ranker)["top1"]
            lv = []
            for c in cs:
                if (n, c) not in cache:
                    cache[(n, c)] = locomo_r10(loc[c], ranker)
                lv.append(cache[(n, c)])
            lmean = statistics.fmean(lv) if lv else 0.0
            if bar:
                return min(cache[key] - para_metrics(ps, vector_only)["top1"], 0.0) * 100 + lmean
            return 0.5 * cache[key] + 0.5 * lmean

        held_para, held_loc = [], {c: [] for c in convs}  # type: List[Dict[str, float]], Dict[str, List[float]]
        fold_loc: List[float] = []
        choices = []
        for c, h in itertools.product(convs, paraphrase.HALVES):
            train_h = [x for x in paraphrase.HALVES if x != h]
            train_c = [x for x in convs if x != c]
            best = max(range(len(grid)), key=lambda n: (objective(n, train_h, train_c), -n))
            choices.append(grid[best][0])
            held_para.append(para_metrics([r for r in para if r["half"] == h], grid[best][1]))
            held_loc[c].append(locomo_r10(loc[c], grid[best][1]))
            fold_loc.append(held_loc[c][-1])
        final = max(range(len(grid)), key=lambda n: (objective(n, paraphrase.HALVES, convs), -n))
        out[name] = {
            "paraphrase_top1_heldout": statistics.fmean(m["top1"] for m in held_para),
            "paraphrase_mrr_heldout": statistics.fmean(m["mrr"] for m in held_para),
            "paraphrase_top1_per_fold": [m["top1"] for m in held_para],
            "paraphrase_mrr_per_fold": [m["mrr"] for m in held_para],
            "locomo_r10_per_fold": fold_loc,
            "locomo_r10_heldout": statistics.fmean(statistics.fmean(v) for v in held_loc.values()) if convs else None,
            "locomo_r10_heldout_per_conversation": {c: statistics.fmean(v) for c, v in held_loc.items()},
            "chosen_per_fold": choices,
            "chosen_on_all": grid[final][0],
        }
    return out


def _add_questions(loc: Dict[str, List[Dict[str, Any]]]) -> None:
    """Records written before they carried the LoCoMo question text get it from the data (same order)."""
    data_dir = quality.default_data_dir()
    for cid, recs in loc.items():
        if recs and "question" not in recs[0] and data_dir is not None:
            questions = quality.load_conversation(data_dir / f"{cid}.json")["questions"]
            if len(questions) != len(recs):
                raise SystemExit(f"records of conversation {cid} do not match its data: record again")
            for rec, q in zip(recs, questions):
                rec["question"] = q["question"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Record both dev sets with the real model and cross-validate every fusion family."""
    ap = argparse.ArgumentParser(prog="python -m bench.fusion_cv", description=main.__doc__)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--records", default=None, help="reuse (or write) the records in this JSON file")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--objective", choices=("mean", "bar"), default="mean",
                    help="how a fold chooses parameters: mean of paraphrase top-1 and LoCoMo R@10 (default), or "
                         "bar: reach vector's paraphrase top-1 first, then the best LoCoMo R@10")
    args = ap.parse_args(argv)
    recs_path = Path(args.records) if args.records else None
    if recs_path and recs_path.exists():
        recs = json.loads(recs_path.read_text(encoding="utf-8"))
    else:
        spec = quality._project_spec(args.model_dir)
        with tempfile.TemporaryDirectory(prefix="memento-fcv-") as tmp:
            recs = {"paraphrase": record_paraphrase(spec, Path(tmp)), "locomo": record_locomo(spec, Path(tmp))}
        if recs_path:
            recs_path.write_text(json.dumps(recs), encoding="utf-8")
    for rec in recs["paraphrase"] + [r for rs in recs["locomo"].values() for r in rs]:
        for key in ("sims", "matched", "dia", "near"):  # JSON object keys are strings
            if key in rec:
                rec[key] = {int(k): v for k, v in rec[key].items()}
    _add_questions(recs["locomo"])
    families = dict(FAMILIES)
    zipf = _zipf_table()
    if zipf is None:
        print("wordfreq is not installed: the word-frequency families are skipped (pip install wordfreq)")
    else:
        families.update(external_families(zipf))
    res = cross_validate(recs["paraphrase"], recs["locomo"], families, bar=args.objective == "bar")
    print("held out, mean (sd over the six folds)")
    for name, r in res.items():
        loc = r["locomo_r10_heldout"]
        folds = r["paraphrase_top1_per_fold"]
        per = " ".join(f"{c}: {v:.3f}" for c, v in r["locomo_r10_heldout_per_conversation"].items())
        loc_sd = statistics.pstdev(r["locomo_r10_per_fold"]) if r["locomo_r10_per_fold"] else float("nan")
        print(f"{name:36s} paraphrase top-1 {r['paraphrase_top1_heldout']:.3f} ({statistics.pstdev(folds):.3f}, "
              f"folds {min(folds):.3f}-{max(folds):.3f}) MRR {r['paraphrase_mrr_heldout']:.3f} "
              f"({statistics.pstdev(r['paraphrase_mrr_per_fold']):.3f})  LoCoMo R@10 "
              f"{loc if loc is None else round(loc, 3)} ({loc_sd:.3f}; {per})  chosen on all: {r['chosen_on_all']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
