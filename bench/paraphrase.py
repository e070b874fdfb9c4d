"""The everyday-paraphrase dev set: notes a person keeps, questions asked in other words.

``bench/data/paraphrase_notes.txt`` holds one note per line (``key<TAB>text``) and
``bench/data/paraphrase_questions.txt`` one question per line (``kind<TAB>note key<TAB>question``), all
written by hand for this project. The kinds say which trap a question sets:

- ``para``        - the same meaning in other words ("power bill" for "electricity bill");
- ``trap``        - the question shares a common word with a *different* note ("buy food" vs "buy a
  replacement washer"), so a keyword match on that word points the wrong way;
- ``contraction`` / ``possessive`` - "what's", "won't", "Tom's": fragments a naive keyword query
  turns into the terms s / t that match every possessive in the store;
- ``rare``        - an exact rare term (an IP, an error code, a name) that the meaning alone cannot find.

Every question has exactly one right note. Questions are split into two halves by position (even lines
are half ``A``, odd lines half ``B``): tune on one, report on the other, and rotate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

DATA_DIR = Path(__file__).resolve().parent / "data"
HALVES = ("A", "B")


def load(data_dir: Path = DATA_DIR) -> Dict[str, Any]:
    """``{"notes": [{"key", "text"}], "questions": [{"kind", "note", "question", "half"}]}``."""
    notes = []
    for line in (data_dir / "paraphrase_notes.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            key, text = line.split("\t", 1)
            notes.append({"key": key, "text": text})
    keys = {n["key"] for n in notes}
    questions = []
    lines = [x for x in (data_dir / "paraphrase_questions.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    for n, line in enumerate(lines):
        kind, key, question = line.split("\t", 2)
        if key not in keys:
            raise ValueError(f"question {n + 1} names an unknown note {key!r}")
        questions.append({"kind": kind, "note": key, "question": question, "half": HALVES[n % 2]})
    return {"notes": notes, "questions": questions}


def rank_metrics(ranked: Sequence[str], right: str) -> Dict[str, float]:
    """top-1 (the right note first), reciprocal rank (0 when absent) and hit@5 of one ranking."""
    rank = ranked.index(right) + 1 if right in ranked else None
    return {"top1": 1.0 if rank == 1 else 0.0, "mrr": 1.0 / rank if rank else 0.0,
            "hit@5": 1.0 if rank is not None and rank <= 5 else 0.0}


def mean_metrics(rows: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Mean of each metric over questions (plus ``n``)."""
    if not rows:
        return {"n": 0}
    out: Dict[str, float] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    out["n"] = len(rows)
    return out


def evaluate(ranker: Callable[[str], List[str]], questions: Sequence[Dict[str, Any]],
             half: Optional[str] = None) -> Dict[str, Any]:
    """Metrics of ``ranker`` (question -> note keys, best first) overall, per half and per kind."""
    rows = [(q, rank_metrics(ranker(q["question"]), q["note"])) for q in questions
            if half is None or q["half"] == half]
    out: Dict[str, Any] = mean_metrics([m for _, m in rows])
    out["per_half"] = {h: mean_metrics([m for q, m in rows if q["half"] == h]) for h in HALVES}
    out["per_kind"] = {k: mean_metrics([m for q, m in rows if q["kind"] == k])
                       for k in sorted({q["kind"] for q, _ in rows})}
    out["misses"] = [{"question": q["question"], "want": q["note"], "half": q["half"]}
                     for q, m in rows if m["top1"] < 1.0]
    return out


def fill(mem: Any, notes: Sequence[Dict[str, Any]]) -> Dict[int, str]:
    """Store the notes; memory id -> note key."""
    results = mem.remember_many([{"text": n["text"], "collection": "paraphrase"} for n in notes])
    return {int(r.id): n["key"] for r, n in zip(results, notes)}
