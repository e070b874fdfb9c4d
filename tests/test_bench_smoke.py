"""Smoke test of the benchmark harness (bench/): FakeEmbedder, tiny sizes, no timing assertions.

It checks that ``python -m bench`` runs every section on both sides in worker processes and writes a
JSON + Markdown report with the expected rows, and that the LoCoMo scoring helpers normalise
evidence ids and compute recall@k as documented. Speed itself is measured by bench/, never here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is not part of the installed package

from bench import engine, paraphrase, quality, report, run  # noqa: E402

TINY = {
    "sizes": [20, 60], "embed_reps": 3, "batch_reps": 2, "remember_reps": 3, "recall_queries": 3, "pool": 10,
    "stress_inserts": [5, 10], "concurrent_each": 3, "cycles": 4, "rss_ops": 20, "import_n": 50,
    "import_batch": 25, "cold_runs": 1, "ablation_reps": 2, "quality": "full", "worker_timeout": 300,
}


def _write_locomo(dirpath: Path) -> None:
    """A two-session conversation in LoCoMo's layout, with malformed evidence ids."""
    conv = {
        "speaker_a": "Ann", "speaker_b": "Bob",
        "session_1_date_time": "1:00 pm on 1 May, 2023",
        "session_1": [
            {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a tabby kitten named Pixel yesterday."},
            {"speaker": "Bob", "dia_id": "D1:2", "text": "Congrats! My violin lessons start next week."},
            {"speaker": "Ann", "dia_id": "D1:3", "text": "We went hiking near the glacier lake."},
        ],
        "session_2_date_time": "2:00 pm on 9 May, 2023",
        "session_2": [
            {"speaker": "Bob", "dia_id": "D2:1", "text": "The violin teacher praised my scales."},
            {"speaker": "Ann", "dia_id": "D2:2", "text": "Pixel knocked the teapot off the shelf."},
        ],
        "qa": [
            {"question": "What is the name of Ann's kitten?", "answer": "Pixel", "evidence": ["D:1:1"],
             "category": 1},
            {"question": "Who takes violin lessons?", "answer": "Bob", "evidence": ["D1:02; D2:1"],
             "category": 4},
            {"question": "Where did Ann go hiking?", "answer": "glacier lake", "evidence": ["D01:3"],
             "category": 2},
            {"question": "What did Bob say about dragons?", "answer": "nothing", "evidence": [],
             "category": 5},
            {"question": "Unscorable question", "answer": "?", "evidence": ["none"], "category": 3},
        ],
    }
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "99.json").write_text(json.dumps(conv), encoding="utf-8")


def test_normalise_evidence_ids() -> None:
    assert quality.normalise_evidence(["D:11:26"]) == ["D11:26"]
    assert quality.normalise_evidence(["D30:05"]) == ["D30:5"]
    assert quality.normalise_evidence(["D8:6; D9:17"]) == ["D8:6", "D9:17"]
    assert quality.normalise_evidence(["D1:3", "D1:03"]) == ["D1:3"]
    assert quality.normalise_evidence(["none"]) == []


def test_score_recall_at_k_and_hit() -> None:
    ranked = [["D1:1"], ["D1:2"], [], [], [], ["D2:1"]]
    s = quality.score(ranked, ["D2:1", "D9:9"])
    assert s["R@5"] == 0.0 and s["hit@5"] == 0.0
    assert s["R@10"] == 0.5
    assert quality.score(ranked, ["D1:2"])["hit@5"] == 1.0


def test_rrf_prefers_items_ranked_by_both_lists() -> None:
    fused = quality.rrf([[1, 2, 3], [3, 4, 1]], k=60)
    assert fused[:2] == [1, 3] and set(fused) == {1, 2, 3, 4}
    assert quality.rrf([[1, 2], [2, 1]], k=60, weights=[1.0, 0.0])[0] == 1


def test_load_conversation_skips_category_5_and_empty_evidence(tmp_path: Path) -> None:
    _write_locomo(tmp_path)
    conv = quality.load_conversation(tmp_path / "99.json")
    assert len(conv["turns"]) == 5
    assert conv["turns"][3] == {"dia_id": "D2:1", "speaker": "Bob",
                                "text": "The violin teacher praised my scales.",
                                "session": 2, "date": "2:00 pm on 9 May, 2023"}
    assert [q["evidence"] for q in conv["questions"]] == [["D1:1"], ["D1:2", "D2:1"], ["D1:3"]]
    assert conv["skipped_no_evidence"] == 1


def test_paraphrase_set_is_well_formed_and_split_in_halves() -> None:
    data = paraphrase.load()
    assert len(data["notes"]) >= 60 and len(data["questions"]) >= 60
    assert len({n["key"] for n in data["notes"]}) == len(data["notes"])
    halves = [q["half"] for q in data["questions"]]
    assert abs(halves.count("A") - halves.count("B")) <= 1
    assert {q["kind"] for q in data["questions"]} == {"para", "trap", "contraction", "possessive", "rare"}
    # every note is the answer to some question, so no note is there only as a distractor by accident
    assert {q["note"] for q in data["questions"]} == {n["key"] for n in data["notes"]}


def test_rank_metrics_top1_and_reciprocal_rank() -> None:
    assert paraphrase.rank_metrics(["a", "b"], "a") == {"top1": 1.0, "mrr": 1.0, "hit@5": 1.0}
    assert paraphrase.rank_metrics(["b", "a"], "a")["mrr"] == 0.5
    assert paraphrase.rank_metrics(["b"], "a") == {"top1": 0.0, "mrr": 0.0, "hit@5": 0.0}


def test_quality_command_reports_each_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality, "_project_spec", lambda model_dir: {"side": "project", "model_dir": "-",
                                                                        "fake": True})
    out = tmp_path / "q.json"
    assert quality.main(["--sets", "paraphrase", "--json", str(out)]) == 0
    modes = json.loads(out.read_text())["paraphrase"]["modes"]
    assert set(modes) == {"hybrid", "vector", "keyword"}
    assert 0.0 <= modes["keyword"]["top1"] <= 1.0 and modes["keyword"]["n"] >= 60


def test_synthetic_texts_are_distinct_and_about_100_chars() -> None:
    texts = [engine.gen_text(i) for i in range(2000)]
    assert len(set(texts)) == len(texts)
    assert 60 <= sum(map(len, texts)) / len(texts) <= 140
    assert len({engine.gen_query(i) for i in range(500)}) == 500
    assert len(engine.gen_long(0).split()) > 100


def test_baseline_unavailable_without_fp32_graph(tmp_path: Path) -> None:
    reason = engine.baseline_unavailable_reason({"side": "baseline", "model_dir": str(tmp_path)})
    assert reason is not None and "fp32" in reason


def test_report_marks_pass_fail_and_not_measurable() -> None:
    reason = "not measurable on this platform: onnxruntime not installed"
    results = {"meta": {"baseline_skipped": reason}, "sections": {
        "embedding": {"project": {"uncached_short": {"median": 1.5}, "batch20_ms_per_item": {"median": 9.0}},
                      "baseline": {"skipped": reason}},
    }}
    rows = {r["metric"]: r for r in report.build_rows(results)}
    assert rows["Uncached embed, ~12 tokens: median"]["status"] == "PASS"
    assert rows["Batch of 20 mixed lengths: ms/item (median)"]["status"] == "FAIL"
    assert rows["Uncached embed, ~12 tokens: median"]["baseline_text"] == "n/m"
    assert rows["Cold start: new process → first embedding (median)"]["status"] == "not run"
    md = report.render_markdown(results, list(rows.values()), "no plot")
    assert reason in md


def test_bench_runs_end_to_end_with_fake_embedder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locomo = tmp_path / "locomo"
    _write_locomo(locomo)
    monkeypatch.setitem(run.PROFILES, "smoke", dict(TINY))
    prefix = tmp_path / "out" / "smoke"
    rc = run.main(["--profile", "smoke", "--fake", "--out", str(prefix), "--locomo-dir", str(locomo),
                   "--platform", "test"])
    assert rc == 0
    data = json.loads(prefix.with_suffix(".json").read_text(encoding="utf-8"))
    sections = data["sections"]
    assert set(sections) == set(run.ALL_SECTIONS)
    for name in ("cold_start", "embedding", "store", "stress", "rss", "quality"):
        for side in ("project", "baseline"):
            assert "error" not in sections[name][side], (name, side, sections[name][side])
    # every size measured, every mode on the project side, vector only on the baseline
    assert set(sections["store"]["project"]["recall"]) == {"20", "60"}
    assert set(sections["store"]["project"]["recall"]["60"]) == {"hybrid", "vector", "keyword"}
    assert set(sections["store"]["baseline"]["recall"]["60"]) == {"vector"}
    assert sections["store"]["project"]["final_count"] == 60
    assert sections["stress"]["project"]["concurrent_4x"]["count"] == 12
    assert sections["stress"]["project"]["mixed_2w3r"]["errors"] == 0
    assert sections["stress"]["project"]["create_delete"]["count_consistent"] is True
    assert sections["rss"]["project"]["db"]["memories"] == 50
    assert sections["rss"]["project"]["stages"]["after_model_load"]["rss_mb"] > 0
    assert set(sections["ablation"]["variants"]) == set(run.ABLATION_VARIANTS)
    q = sections["quality"]["project"]
    assert q["conversations"]["99"]["questions"] == 3
    # keyword recall finds the words of each question in its evidence turn
    assert q["modes"]["keyword"]["R@10"] == 1.0
    md = prefix.with_suffix(".md").read_text(encoding="utf-8")
    assert "FakeEmbedder run" in md
    assert "| Group | Metric | Seed | Target | memento-edge | Baseline | Status |" in md
    assert "Recall top-5 hybrid @ 60: p50" in md
    assert data["meta"]["platform"] == "test"
    assert {r["metric"] for r in data["rows"]} >= {"Cold start: new process → first embedding (median)"}


def test_skip_baseline_reports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(run.PROFILES, "smoke", dict(TINY))
    prefix = tmp_path / "skip"
    rc = run.main(["--profile", "smoke", "--fake", "--out", str(prefix), "--skip-baseline",
                   "--sections", "embedding"])
    assert rc == 0
    data = json.loads(prefix.with_suffix(".json").read_text(encoding="utf-8"))
    assert data["sections"]["embedding"]["baseline"] == {"skipped": "skipped (--skip-baseline)"}
    assert "skipped (--skip-baseline)" in prefix.with_suffix(".md").read_text(encoding="utf-8")
