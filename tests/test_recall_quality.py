"""Hybrid recall: scores that mean the same in every query, evidence weighed by strength (fusion.py).

The real-model tests store a handful of everyday notes in the spirit of the issue that asked for this
(#10): a question that shares one common word with the wrong note, a contraction, and a rare exact term
that only the keyword side can find. Quality as a number is measured by ``python -m bench.quality``.
"""
from __future__ import annotations

import dataclasses

import pytest

from memento_edge import fusion
from memento_edge.errors import InvalidInput

NOTES = [
    "get groceries after work",
    "The kitchen sink faucet drips, buy a replacement washer at the hardware store.",
    "Guest wifi network is Lantern-Guest, the password is sunflower42.",
    "Tom's birthday is on March 14th; he wants a new fishing reel.",
    "The wifi router is in the living room cupboard; restart it if the internet drops.",
    "Dentist appointment with Dr. Okafor on Tuesday at 9:30.",
    "The NAS lives at 192.168.1.40 and backs up the laptops every night.",
    "The printer on the third floor jams if you use thick paper.",
    "Pay the electricity bill before Friday to avoid the late fee.",
    "Buy tickets for the concert when sales open on Friday at 10.",
    "Maya is allergic to peanuts, so no satay at her party.",
    "Sarah's wedding is in Porto on 12 July; we still need to book the hotel.",
    "The production web server is at 10.20.0.7 behind the firewall.",
    "The staging cluster's load balancer IP is 10.20.0.15.",
]


# --- fusion on synthetic evidence ------------------------------------------------------------------
def _ev(terms, df, matched, docs=100):
    return fusion.KeywordEvidence(terms=terms, docs=docs, df=df, matched=matched)


def test_one_common_shared_word_does_not_outrank_a_strong_meaning_match():
    # id 1: close in meaning, no shared word; id 2: far in meaning, shares only "buy" (in 20 of 100)
    ev = _ev(["buy", "food"], [20, 0], {2: [0]})
    ranked = fusion.fuse({1: 0.50, 2: 0.06}, ev)
    assert [h.id for h in ranked] == [1, 2]
    assert ranked[1].matched == ("buy",)


def test_a_rare_exact_term_wins_over_a_vaguely_similar_memory():
    # the query is an IP address found in one memory whose text means little to the model
    ev = _ev(["192.168.1.40"], [1], {2: [0]})
    ranked = fusion.fuse({1: 0.45, 2: 0.30}, ev)
    assert ranked[0].id == 2 and ranked[0].coverage == 1.0


def test_score_is_absolute_not_relative_to_the_other_hits():
    # the same evidence gets the same score whatever else is in the pool (no min-max per query)
    ev = _ev(["x"], [3], {1: [0]})
    alone = fusion.fuse({1: 0.4}, ev)[0].score
    crowded = fusion.fuse({1: 0.4, 2: 0.9, 3: 0.0}, ev)
    assert [h.id for h in crowded][-1] == 3
    assert next(h.score for h in crowded if h.id == 1) == pytest.approx(alone)
    assert all(0.0 < h.score < 1.0 for h in crowded)


def test_score_rises_with_similarity_and_with_coverage():
    assert fusion.score(0.6, 0.0, 0.0) > fusion.score(0.3, 0.0, 0.0)
    assert fusion.score(0.3, 1.0, 0.5) > fusion.score(0.3, 0.5, 0.5) > fusion.score(0.3, 0.0, 0.0)
    # an unrelated memory scores near 0, a close paraphrase near or above one half
    assert fusion.score(0.05, 0.0, 0.0) < 0.01 and fusion.score(0.6, 0.0, 0.0) > 0.5


def test_coverage_weighs_rare_terms_more():
    w = [fusion.idf(d, 1000) for d in (500, 2)]  # a common and a rare term
    assert fusion.coverage([1], w) > 0.8 > 0.2 > fusion.coverage([0], w)
    assert fusion.coverage([0, 1, 1], w) == pytest.approx(1.0)
    assert fusion.coverage([], []) == 0.0


# --- the query gate: keyword evidence where the query carries an exact token -----------------------
@pytest.mark.parametrize("query", ["what is 10.20.0.7", "what does E1042 mean", "INV-2291", "who wrote report_v2",
                                   'find "blue folder"', "what gift would Anna like", "when is Tom's birthday",
                                   "the VPN keeps dropping", "Lars isn't around, ask Priya"])
def test_queries_with_an_exact_token(query):
    assert fusion.has_exact_tokens(query)


@pytest.mark.parametrize("query", ["buy food", "where does the live website run", "What's the internet code?",
                                   "can I release over the holidays", "Should we go out tonight?", ""])
def test_everyday_queries_have_no_exact_token(query):
    # a capital that only starts the sentence, and "I", name no one
    assert not fusion.has_exact_tokens(query)


def test_an_everyday_query_is_ranked_by_meaning_alone():
    # id 2 shares the query's rarest word but means something else; id 1 is the paraphrase
    ev = fusion.KeywordEvidence(["release", "holidays"], 100, [3, 1], {2: [1]}, exact=False)
    ranked = fusion.fuse({1: 0.40, 2: 0.35}, ev)
    assert [h.id for h in ranked] == [1, 2]
    assert ranked[1].matched == ("holidays",)  # the evidence is still reported
    assert ranked[1].score == pytest.approx(fusion.score(0.35, 0.0, 0.0))
    # the same words in a query with an exact token (a name) win
    named = fusion.fuse({1: 0.40, 2: 0.35}, dataclasses.replace(ev, exact=True))
    assert [h.id for h in named] == [2, 1] and 0.0 < named[0].score < 1.0


def test_a_memory_holding_every_query_term_is_not_gated():
    ev = fusion.KeywordEvidence(["cat", "sofa"], 100, [2, 2], {2: [0, 1]}, exact=False)
    ranked = fusion.fuse({1: 0.40, 2: 0.35}, ev)
    assert [h.id for h in ranked] == [2, 1] and ranked[0].coverage == pytest.approx(1.0)


def test_a_decisive_vector_side_is_not_overruled_by_a_shared_name():
    ev = fusion.KeywordEvidence(["maya", "eat"], 100, [2, 10], {2: [0]}, exact=True)
    lead = fusion.PARAMS.gate_margin
    assert [h.id for h in fusion.fuse({1: 0.31 + lead, 2: 0.30}, ev)] == [1, 2]
    assert [h.id for h in fusion.fuse({1: 0.32, 2: 0.30}, ev)] == [2, 1]  # undecided: the name decides


def test_keyword_weight_is_the_gate():
    params = dataclasses.replace(fusion.PARAMS, gate_margin=0.2, gate_floor=0.25)
    assert fusion.keyword_weight(True, {1: 0.5, 2: 0.4}, params) == 1.0
    assert fusion.keyword_weight(True, {1: 0.7, 2: 0.4}, params) == 0.25
    assert fusion.keyword_weight(False, {1: 0.5, 2: 0.4}, params) == 0.25
    assert fusion.keyword_weight(True, {1: 0.5}, params) == 0.25  # one candidate: nothing to break a tie with


# --- the engine, with the real model --------------------------------------------------------------
@pytest.fixture
def notes_memory(real_memory):
    real_memory.remember_many([{"text": t} for t in NOTES])
    return real_memory


@pytest.mark.real_model
def test_readme_example_buy_food_finds_get_groceries_first(notes_memory):
    hits = notes_memory.recall("buy food", topk=3).hits
    assert hits[0].text == "get groceries after work"
    assert hits[0].similarity is not None and hits[0].matched_terms == []


@pytest.mark.real_model
def test_contraction_is_not_searched_as_the_term_s(notes_memory):
    res = notes_memory.recall("what's the internet code for visitors", topk=3)
    assert "Tom's birthday" not in res.hits[0].text
    assert all("s" not in (h.matched_terms or []) for h in res.hits)
    assert res.hits[0].text.startswith(("Guest wifi", "The wifi router"))


@pytest.mark.real_model
def test_rare_term_only_the_keyword_side_finds(notes_memory):
    # two addresses the model sees as near twins: only the exact term tells them apart
    q = "what is 10.20.0.7"
    vec = notes_memory.recall(q, topk=1, mode="vector").hits[0]
    assert "10.20.0.7" not in vec.text  # the case the keyword side is there for
    hyb = notes_memory.recall(q, topk=2).hits
    assert "10.20.0.7" in hyb[0].text and hyb[0].matched_terms == ["10.20.0.7"]
    assert hyb[0].score > 0.5 and hyb[0].score > hyb[1].score


@pytest.mark.real_model
def test_min_score_tells_nothing_relevant_from_the_least_bad(notes_memory):
    assert notes_memory.recall("quantum chromodynamics lecture notes", topk=5, min_score=0.5).hits == []
    assert len(notes_memory.recall("quantum chromodynamics lecture notes", topk=5).hits) == 5
    hits = notes_memory.recall("when is the dentist", topk=5, min_score=0.5).hits
    assert hits and "Dentist" in hits[0].text and all(h.score >= 0.5 for h in hits)


def test_min_score_is_validated(fake_memory):
    with pytest.raises(InvalidInput) as exc:
        fake_memory.recall("x", min_score=2)
    assert exc.value.field == "min_score"


def test_keyword_mode_reports_matched_terms_and_a_0_to_1_score(fake_memory):
    fake_memory.remember_many([{"text": "Tom's birthday party"}, {"text": "the NAS at 192.168.1.40"}])
    hits = fake_memory.recall("what's at 192.168.1.40 for Tom's party", mode="keyword").hits
    assert [h.matched_terms for h in hits] == [["tom", "party"], ["192.168.1.40"]] or \
        [h.matched_terms for h in hits] == [["192.168.1.40"], ["tom", "party"]]
    assert all(0.0 < h.score <= 1.0 and h.similarity is None for h in hits)


# --- dialogue context: the turns next to a candidate in its session ---------------------------------
def test_session_neighbours_are_the_turns_before_and_after_in_the_same_session(fake_memory):
    ids = [r.id for r in fake_memory.remember_many([
        {"text": "A: where did you go on Saturday?", "session_id": "s1"},
        {"text": "a note without a session"},
        {"text": "B: to the flea market by the river", "session_id": "s1", "collection": "other"},
        {"text": "C: unrelated chat", "session_id": "s2"},
        {"text": "A: and what did you find there?", "session_id": "s1"},
    ])]
    near = fake_memory.store.session_neighbours([ids[2]])
    assert near[ids[2]] == [ids[0], ids[4]]
    assert near[ids[0]] == [ids[2]] and near[ids[4]] == [ids[2]]  # the reverse links
    assert fake_memory.store.session_neighbours([ids[1], ids[3]]) == {}
    # a neighbour the filters leave out gives no context
    assert fake_memory.store.session_neighbours([ids[0]], {"collection": "default"}) == {}


def test_a_neighbours_evidence_lifts_the_turn_next_to_it():
    # id 2 answers the question turn id 1 (which holds the query's words); id 3 is a lone look-alike
    ev = _ev(["market"], [1], {1: [0]})
    sims = {1: 0.45, 2: 0.30, 3: 0.32}
    plain = fusion.fuse(sims, ev)
    assert [h.id for h in plain][1:] == [3, 2]
    params = dataclasses.replace(fusion.PARAMS, w_context=0.3)
    lifted = fusion.fuse(sims, ev, params, neighbours={1: [2], 2: [1]})
    assert [h.id for h in lifted][1:] == [2, 3]
    assert lifted[1].matched == () and lifted[1].similarity == 0.30  # its own evidence is reported
    only = fusion.fuse(sims, ev, params, neighbours={1: [2], 2: [1]}, only=[2])
    assert [h.id for h in only] == [2] and only[0].score == pytest.approx(lifted[1].score)


def test_hybrid_recall_finds_the_answer_turn_after_the_matching_question(fake_memory):
    fake_memory.remember_many([{"text": f"filler chat number {i} about nothing much", "session_id": "s0"}
                               for i in range(30)])
    q, a = fake_memory.remember_many([
        {"text": "Maria: which instrument is Leo learning at the conservatory?", "session_id": "s1"},
        {"text": "Jon: the cello, twice a week since spring", "session_id": "s1"}])
    hits = fake_memory.recall("instrument Leo learning conservatory", topk=2).hits
    assert [h.id for h in hits] == [q.id, a.id]
    assert hits[1].matched_terms == []
