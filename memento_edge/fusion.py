"""Hybrid recall scoring: one 0..1 score per memory from the strength of both retrievers' evidence.

Each candidate (the vector side's and the keyword side's top memories) gets two measurements that
mean the same thing in every query and every store:

- ``similarity`` - the cosine between the query's and the memory's embeddings. With the bundled
  MiniLM, unrelated texts sit around 0.0-0.2, a paraphrase of the same fact around 0.4-0.7.
- ``coverage`` - how much of the query's *keyword weight* the memory contains: each query term weighs
  its inverse document frequency (BM25's IDF over the whole store), and coverage is the matched share,
  0..1. A word found in many memories ("buy", a speaker's name in a chat log) weighs little; a term
  found in one (an IP address, an error code, a name) weighs a lot.

The score is a logistic function of both, ``1 / (1 + exp(-(bias + w_sim * similarity + k * (w_cov +
w_rare * rarity))))`` with ``k = coverage ** power`` and ``rarity`` the IDF of the rarest matched term
relative to a term found in no memory. Raising coverage to a power > 1 makes half a query's keyword
weight count for much less than all of it, so one shared common word ("buy", "holidays") cannot outweigh
a clearly closer meaning, while a memory holding every rare term of the query (an IP address, an error
code, a name) still wins.

Dialogue context: a memory with a ``session_id`` (a turn of a conversation) also gets ``w_context`` times
the linear strength of the better of the turns just before and after it in its session, when that is
positive. In a chat log the turn that matches a question's words is often the question, and the answer
is the next turn. Notes without a session are not affected.

The parameters were chosen by cross-validation on the project's dev sets
(``python -m bench.fusion_cv``) and the bias and scale fitted so that the score is calibrated on the
everyday-notes set: of the hits scoring about 0.8, about 80 % were the note asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple


@dataclass(frozen=True)
class FusionParams:
    """Weights of the logistic score (see the module docstring)."""

    bias: float
    w_similarity: float
    w_coverage: float
    w_rare: float
    power: float
    w_context: float = 0.0


# Ranking: similarity + 0.4 * k + 0.6 * k * rarity, k = coverage ** 1.5 (python -m bench.fusion_cv: chosen
# by six-fold cross-validation over the paraphrase halves and the LoCoMo dev conversations); the scale
# 16.88 and bias -9.89 are a logistic fit of "this hit is the note asked for" on the paraphrase set.
PARAMS = FusionParams(bias=-9.89, w_similarity=16.88, w_coverage=0.4 * 16.88, w_rare=0.6 * 16.88, power=1.5,
                      w_context=0.3)


@dataclass(frozen=True)
class KeywordEvidence:
    """The keyword side's view of one query: its terms, their document counts, what each memory matched."""

    terms: Sequence[str]
    docs: int
    df: Sequence[int]
    matched: Mapping[int, Sequence[int]]

    def weights(self) -> List[float]:
        """IDF of each term (BM25's form, always > 0; a term in no memory weighs the most)."""
        return [idf(d, self.docs) for d in self.df]


@dataclass(frozen=True)
class Scored:
    """One fused candidate: its score and the evidence behind it."""

    id: int
    score: float
    similarity: float
    coverage: float
    matched: Tuple[str, ...]


def idf(df: int, docs: int) -> float:
    """BM25 inverse document frequency, ``ln(1 + (N - df + 0.5) / (df + 0.5))``."""
    return math.log(1.0 + (max(docs - df, 0) + 0.5) / (df + 0.5))


def coverage(matched: Sequence[int], weights: Sequence[float]) -> float:
    """Share of the query's IDF weight carried by the ``matched`` term indices (0..1)."""
    total = sum(weights)
    return sum(weights[t] for t in set(matched)) / total if total > 0 else 0.0


def logistic(x: float) -> float:
    """The logistic function, safe for large ``|x|``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def strength(similarity: float, cov: float, rarity: float, params: FusionParams = PARAMS) -> float:
    """The linear evidence of one memory alone (the score before its bias and the logistic)."""
    k = cov ** params.power
    return params.w_similarity * similarity + k * (params.w_coverage + params.w_rare * rarity)


def score(similarity: float, cov: float, rarity: float, params: FusionParams = PARAMS) -> float:
    """The 0..1 hybrid score of one memory without dialogue context."""
    return logistic(params.bias + strength(similarity, cov, rarity, params))


def fuse(similarity: Mapping[int, float], evidence: Optional[KeywordEvidence],
         params: FusionParams = PARAMS, limit: Optional[int] = None,
         neighbours: Optional[Mapping[int, Sequence[int]]] = None,
         only: Optional[Sequence[int]] = None) -> List[Scored]:
    """The candidates of ``similarity`` (id -> cosine; every candidate must have one) scored and ordered
    best first (ties by id, so the order is stable); only the best ``limit`` when given.

    ``neighbours`` (id -> the memories next to it in its session, each with a cosine in ``similarity``)
    adds ``w_context`` times the better neighbour's own evidence: the answer to a question asked in a
    dialogue often sits in the turn after the one that matches the question's words. ``only`` restricts
    the result to those ids (the others still lend their evidence as neighbours).
    """
    weights = evidence.weights() if evidence else []
    total = sum(weights)
    top = idf(0, evidence.docs) if evidence else 1.0
    matched = evidence.matched if evidence else {}
    shown = list(similarity) if only is None else list(only)
    needed = set(shown)
    if neighbours and params.w_context:
        needed.update(n for mid in shown for n in neighbours.get(mid, ()) if n in similarity)
    own: Dict[int, Tuple[float, float]] = {}  # id -> (strength, coverage)
    for mid in needed:
        sim = similarity[mid]
        idx = matched.get(mid)
        cov = rarity = 0.0
        if idx and total > 0:
            uniq = set(idx)
            cov = sum(weights[t] for t in uniq) / total
            rarity = max(weights[t] for t in uniq) / top
        own[mid] = (strength(sim, cov, rarity, params), cov)
    keyed = []
    for mid in shown:
        x, cov = own[mid]
        if neighbours and params.w_context:
            context = max((own[n][0] for n in neighbours.get(mid, ()) if n in own), default=0.0)
            x += params.w_context * max(context, 0.0)
        keyed.append((logistic(params.bias + x), mid, similarity[mid], cov))
    keyed.sort(key=lambda t: (-t[0], t[1]))
    if limit is not None:
        keyed = keyed[:limit]
    terms = evidence.terms if evidence else ()
    return [Scored(mid, sc, sim, cov, tuple(terms[t] for t in sorted(set(matched.get(mid, ())))))
            for sc, mid, sim, cov in keyed]


def matched_terms(evidence: Optional[KeywordEvidence]) -> Dict[int, Tuple[str, ...]]:
    """id -> the query terms it matched (keyword mode reports them too)."""
    if evidence is None:
        return {}
    return {mid: tuple(evidence.terms[t] for t in sorted(set(idx))) for mid, idx in evidence.matched.items()}
