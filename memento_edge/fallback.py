"""The armv6 backend: a pure-Python WordPiece tokenizer and a numpy execution of the int8 model.

On a Raspberry Pi Zero (ARM1176, Debian armel) PyPI has no onnxruntime, tokenizers or sqlite-vec
wheel, but Debian ships python3 and python3-numpy. This module needs nothing else: it reads the same
``tokenizer.json`` and the same int8 weights (``model.onnx.data`` through ``initializers.json``) as
the onnxruntime backend and follows the same arithmetic, so vectors from either backend can share a
database.

* :class:`WordPieceTokenizer` gives ids identical to the ``tokenizers`` library for the BERT
  pipeline (BertNormalizer, BertPreTokenizer, WordPiece, template, truncation, padding). Where
  ``tokenizers`` uses other Unicode tables than Python's ``unicodedata``, the differences are
  listed below; they were derived by comparing every code point against ``tokenizers`` 0.23 under
  Python 3.9 to 3.13 (Unicode 13.0 to 15.1).
* :class:`NumpyEmbedder` implements the ``Embedder`` protocol (docs/architecture.md) with
  ``backend = "numpy-int8"``. The heavy products run as onnxruntime runs them: activations are
  quantised per call to uint8 (per-tensor scale and zero point, round half to even), multiplied
  with the int8 per-channel weights in exact integer arithmetic, then rescaled; attention, GELU,
  softmax and LayerNorm are float32.

How close to onnxruntime? Dynamic int8 quantisation is chaotic: one activation rounded one step
differently in the first layer moves the final vector to cosine ~0.994, and onnxruntime's own
fused and unfused kernels (graph optimisation on/off, same machine) disagree that much (min 0.994,
mean 0.9995). This backend sits in that band (min 0.993, mean 0.9993 against the production
onnxruntime embedder) and is exactly as faithful to the fp32 model as onnxruntime's int8 output
(mean cosine 0.9925 both); ``tests/test_fallback.py`` holds it there.

Only the standard library and numpy are imported, here and on every runtime path.
"""
from __future__ import annotations

import json
import os
import platform
import re
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .embedder import LazyModel
from .errors import ModelUnavailable

__all__ = ["NumpyEmbedder", "WordPieceTokenizer"]

# ================================================================================================
# Unicode tables: where `tokenizers` disagrees with Python's unicodedata (any of Unicode 13.0-15.1)
# ================================================================================================
# `tokenizers` classifies with the unicode_categories crate (Unicode 9-era Cf/Mn/P sets), and
# lowercases with Rust's char::to_lowercase (Unicode 16). Code points as hex ranges "A-B" or "A".


def _ranges(spec: str) -> FrozenSet[int]:
    out: set = set()
    for part in spec.split():
        lo, _, hi = part.partition("-")
        out.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    return frozenset(out)


# Python says Cf (a control to remove), tokenizers keeps the character.
_CONTROL_KEEP = _ranges("890-891 8E2 110CD 13430-1343F")
# Python says punctuation, tokenizers does not split on it; and the reverse.
_PUNCT_NOT = _ranges(
    "61D 9FD A76 C77 C84 1B7D-1B7E 2E43-2E4F 2E52-2E5D 10EAD 10F55-10F59 10F86-10F89 1144B-1144F "
    "1145A-1145B 1145D 11660-1166C 116B9 1183B 11944-11946 119E2 11A3F-11A46 11A9A-11A9C 11A9E-11AA2 "
    "11B00-11B09 11C41-11C45 11C70-11C71 11EF7-11EF8 11F43-11F4F 11FFF 12FF1-12FF2 16E97-16E9A 16FE2 "
    "1E95E-1E95F")
_PUNCT_ADD = _ranges("166D 111C9")
# Python says Mn (an accent to strip), tokenizers keeps the character; and the reverse.
_MN_KEEP = _ranges(
    "7FD 898-89F 8CA-8E1 9FE AFA-AFF B55 C04 C3C D00 D3B-D3C D81 EBA ECE 180F 1885-1886 1ABF-1ACE "
    "1DF6-1DFB A82C A8C5 A8FF A9BD 10D24-10D27 10EAB-10EAC 10EFD-10EFF 10F46-10F50 10F82-10F85 11070 "
    "11073-11074 110C2 111C9 111CF 1123E 11241 1133B 11438-1143F 11442-11444 11446 1145E 1182F-11837 "
    "11839-1183A 1193B-1193C 1193E 11943 119D4-119D7 119DA-119DB 119E0 11A01-11A0A 11A33-11A38 "
    "11A3B-11A3E 11A47 11A51-11A56 11A59-11A5B 11A8A-11A96 11A98-11A99 11C30-11C36 11C38-11C3D 11C3F "
    "11C92-11CA7 11CAA-11CB0 11CB2-11CB3 11CB5-11CB6 11D31-11D36 11D3A 11D3C-11D3D 11D3F-11D45 11D47 "
    "11D90-11D91 11D95 11D97 11EF3-11EF4 11F00-11F01 11F36-11F3A 11F40 11F42 13440 13447-13455 16F4F "
    "16FE4 1CF00-1CF2D 1CF30-1CF46 1E000-1E006 1E008-1E018 1E01B-1E021 1E023-1E024 1E026-1E02A 1E08F "
    "1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF 1E944-1E94A")
_MN_ADD = _ranges("1734")
# tokenizers' NFD leaves this one composed.
_NFD_KEEP = "\U00011938"
# Lowercase mappings newer than Python's tables: (first, last, step, delta).
_LOWER_RUNS = ((0x1C89, 0x1C89, 1, 1), (0x2C2F, 0x2C2F, 1, 48), (0xA7C0, 0xA7C0, 1, 1),
               (0xA7CB, 0xA7CB, 1, -42343), (0xA7CC, 0xA7DA, 2, 1), (0xA7DC, 0xA7DC, 1, -42561),
               (0x10570, 0x1057A, 1, 39), (0x1057C, 0x1058A, 1, 39), (0x1058C, 0x10592, 1, 39),
               (0x10594, 0x10595, 1, 39), (0x10D50, 0x10D65, 1, 32), (0x16EA0, 0x16EB8, 1, 27))
_LOWER = {cp: chr(cp + delta) for first, last, step, delta in _LOWER_RUNS
          for cp in range(first, last + 1, step)}
# Rust's char::is_whitespace (the White_Space property); Python's str.isspace differs (U+1C-1F).
_WHITESPACE = frozenset([0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                         0x2028, 0x2029, 0x202F, 0x205F, 0x3000])
# BertNormalizer's "Chinese" ideographs (padded with spaces so each becomes its own word).
_CJK = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B81F),
        (0x2B920, 0x2CEAF), (0x2F800, 0x2FA1F))
_ASCII_PUNCT = frozenset(map(ord, "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"))


def _is_control(cp: int) -> bool:
    """Removed by clean_text: Cc/Cf/Co (not tab, LF, CR), U+FFFD; lone surrogates too."""
    if cp in (0x9, 0xA, 0xD) or cp in _CONTROL_KEEP:
        return False
    return cp == 0xFFFD or unicodedata.category(chr(cp)) in ("Cc", "Cf", "Co", "Cs")


def _is_punct(cp: int) -> bool:
    if cp in _ASCII_PUNCT or cp in _PUNCT_ADD:
        return True
    return cp not in _PUNCT_NOT and unicodedata.category(chr(cp)).startswith("P")


def _is_accent(cp: int) -> bool:
    if cp in _MN_ADD:
        return True
    return cp not in _MN_KEEP and unicodedata.category(chr(cp)) == "Mn"


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _lower(cp: int) -> str:
    # Per character, like Rust's char::to_lowercase: no final-sigma context rule (str.lower has one).
    return _LOWER.get(cp) or chr(cp).lower()


def _nfd(text: str) -> str:
    if text.isascii():
        return text
    if _NFD_KEEP in text:
        return _NFD_KEEP.join(unicodedata.normalize("NFD", part) for part in text.split(_NFD_KEEP))
    return unicodedata.normalize("NFD", text)


class _CharMap(dict):  # type: ignore[type-arg]
    """A ``str.translate`` table filled on demand: each distinct character is classified once.

    Bounded: past ``limit`` entries it starts afresh (an adversarial text cannot grow it to all of
    Unicode). Races between threads only recompute an entry.
    """

    def __init__(self, fn: Callable[[int], Optional[str]], limit: int = 20000) -> None:
        super().__init__()
        self._fn = fn
        self._limit = limit

    def __missing__(self, cp: int) -> Optional[str]:
        if len(self) >= self._limit:
            self.clear()
        value = self._fn(cp)
        self[cp] = value
        return value


# ================================================================================================
# tokenizer
# ================================================================================================

class WordPieceTokenizer:
    """BERT WordPiece tokenizer read from a ``tokenizer.json``; ids identical to ``tokenizers``.

    Supports what BERT-style files use: added tokens matched verbatim in the raw text, the
    ``BertNormalizer``, the ``BertPreTokenizer``, the ``WordPiece`` model, a ``TemplateProcessing``
    or ``BertProcessing`` post-processor, truncation and padding. Anything else raises
    ``ValueError`` at load rather than tokenizing differently.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Build from the parsed JSON of a ``tokenizer.json`` (see :meth:`from_file`)."""
        model = config.get("model") or {}
        if model.get("type") != "WordPiece":
            raise ValueError(f"unsupported tokenizer model {model.get('type')!r} (need WordPiece)")
        self.vocab: Dict[str, int] = {str(k): int(v) for k, v in model["vocab"].items()}
        self.unk_token = str(model.get("unk_token", "[UNK]"))
        self.unk_id = self.vocab[self.unk_token]
        self.prefix = str(model.get("continuing_subword_prefix", "##"))
        self.max_chars = int(model.get("max_input_chars_per_word", 100))
        self._longest = max(len(t[len(self.prefix):]) if t.startswith(self.prefix) else len(t)
                            for t in self.vocab)

        norm = config.get("normalizer")
        if norm is not None and norm.get("type") != "BertNormalizer":
            raise ValueError(f"unsupported normalizer {norm.get('type')!r} (need BertNormalizer)")
        norm = norm or {}
        self.clean_text = bool(norm.get("clean_text", False)) if norm else False
        self.chinese = bool(norm.get("handle_chinese_chars", False)) if norm else False
        self.lowercase = bool(norm.get("lowercase", False)) if norm else False
        strip = norm.get("strip_accents")
        self.strip_accents = self.lowercase if strip is None else bool(strip)
        pre = config.get("pre_tokenizer")
        if not pre or pre.get("type") != "BertPreTokenizer":
            raise ValueError(f"unsupported pre_tokenizer {pre!r} (need BertPreTokenizer)")

        self._prefix_ids, self._suffix_ids = self._template(config.get("post_processor"))

        # Added tokens without normalisation are cut out of the raw text before anything else,
        # longest first (tokenizers matches leftmost-longest).
        added: Dict[str, int] = {}
        for tok in config.get("added_tokens") or []:
            if tok.get("normalized") or tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
                raise ValueError(f"unsupported added token options for {tok.get('content')!r}")
            added[str(tok["content"])] = int(tok["id"])
        self._added = added
        self._added_re = (re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
                          if added else None)

        trunc = config.get("truncation")
        self.max_length: Optional[int] = int(trunc["max_length"]) if trunc else None
        self._trunc_left = bool(trunc) and trunc.get("direction", "Right") == "Left"  # type: ignore[union-attr]
        pad = config.get("padding")
        self._pad_fixed: Optional[int] = None
        self._pad_multiple: Optional[int] = None
        self._pad_left = False
        self.pad_id = 0
        self.padding = pad is not None
        if pad:
            strategy = pad.get("strategy")
            if isinstance(strategy, dict) and "Fixed" in strategy:
                self._pad_fixed = int(strategy["Fixed"])
            elif strategy != "BatchLongest":
                raise ValueError(f"unsupported padding strategy {strategy!r}")
            self._pad_multiple = pad.get("pad_to_multiple_of") or None
            self._pad_left = pad.get("direction", "Right") == "Left"
            self.pad_id = int(pad.get("pad_id", 0))

        # Three passes of str.translate (C speed; Python only for characters not seen before).
        self._map_clean = _CharMap(self._clean_char)
        self._map_case = _CharMap(self._case_char)
        self._map_split = _CharMap(self._split_char)
        # Word -> piece ids; cleared when full so memory stays bounded.
        self._word_cache: Dict[str, Tuple[int, ...]] = {}

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "WordPieceTokenizer":
        """Load a ``tokenizer.json`` (``ValueError`` if it uses something this class does not do)."""
        with open(path, encoding="utf-8") as fh:
            return cls(json.load(fh))

    # --- per-character tables ------------------------------------------------------------------
    def _clean_char(self, cp: int) -> Optional[str]:
        c = chr(cp)
        if self.clean_text:
            if cp == 0 or _is_control(cp):
                return None
            if cp in _WHITESPACE:
                return " "
        if self.chinese and _is_cjk(cp):
            return f" {c} "
        return c

    def _case_char(self, cp: int) -> Optional[str]:
        if self.strip_accents and _is_accent(cp):
            return None
        return _lower(cp) if self.lowercase else chr(cp)

    def _split_char(self, cp: int) -> str:
        if cp in _WHITESPACE:
            return " "
        if _is_punct(cp):
            return f" {chr(cp)} "
        return chr(cp)

    def _template(self, post: Optional[Mapping[str, Any]]) -> Tuple[List[int], List[int]]:
        """Ids the post-processor puts before and after a single sequence."""
        if post is None:
            return [], []
        if post.get("type") == "BertProcessing":
            return [int(post["cls"][1])], [int(post["sep"][1])]
        if post.get("type") != "TemplateProcessing":
            raise ValueError(f"unsupported post_processor {post.get('type')!r}")
        before: List[int] = []
        after: List[int] = []
        seen_sequence = False
        for piece in post["single"]:
            if "Sequence" in piece:
                seen_sequence = True
            else:
                name = piece["SpecialToken"]["id"]
                ids = [int(i) for i in post["special_tokens"][name]["ids"]]
                (after if seen_sequence else before).extend(ids)
        return before, after

    # --- pipeline --------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """The BertNormalizer of ``text`` (added tokens are not treated specially here)."""
        if self.clean_text or self.chinese:
            text = text.translate(self._map_clean)
        if self.strip_accents:
            text = _nfd(text)
        if self.strip_accents or self.lowercase:
            text = text.translate(self._map_case)
        return text

    def pre_tokenize(self, normalized: str) -> List[str]:
        """BertPreTokenizer: split on whitespace, isolate every punctuation character."""
        return [w for w in normalized.translate(self._map_split).split(" ") if w]

    def _wordpiece(self, word: str) -> Tuple[int, ...]:
        ids = self._word_cache.get(word)
        if ids is not None:
            return ids
        n = len(word)
        out: List[int] = []
        if n > self.max_chars:
            out = [self.unk_id]
        else:
            vocab = self.vocab
            start = 0
            while start < n:
                end = min(n, start + self._longest)
                tid = None
                while end > start:
                    piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                    tid = vocab.get(piece)
                    if tid is not None:
                        break
                    end -= 1
                if tid is None:  # one piece cannot be matched: the whole word is unknown
                    out = [self.unk_id]
                    break
                out.append(tid)
                start = end
        if len(self._word_cache) >= 50000:
            self._word_cache.clear()
        ids = tuple(out)
        self._word_cache[word] = ids
        return ids

    def _segments(self, text: str) -> Iterable[Union[str, int]]:
        """Raw text split into plain runs (str) and added-token ids (int), in order."""
        if self._added_re is None:
            yield text
            return
        pos = 0
        for m in self._added_re.finditer(text):
            if m.start() > pos:
                yield text[pos:m.start()]
            yield self._added[m.group(0)]
            pos = m.end()
        if pos < len(text):
            yield text[pos:]

    def _content_ids(self, text: str, limit: Optional[int]) -> List[int]:
        """Ids of ``text`` without special tokens; stops early once ``limit`` ids are known."""
        ids: List[int] = []
        for seg in self._segments(text):
            if isinstance(seg, int):
                ids.append(seg)
            else:
                # Long texts are handled in whitespace-delimited chunks so that a 100,000-character
                # memory costs only what its first `limit` tokens need. A space never joins two
                # words and no normalisation step looks across one, so chunks are independent.
                pos = 0
                while pos < len(seg):
                    cut = len(seg) if len(seg) - pos <= 4096 else seg.find(" ", pos + 4096)
                    cut = len(seg) if cut < 0 else cut
                    for word in self.pre_tokenize(self.normalize(seg[pos:cut])):
                        ids.extend(self._wordpiece(word))
                    pos = cut
                    if limit is not None and len(ids) >= limit:
                        break
            if limit is not None and len(ids) >= limit:
                break
        return ids

    def token_ids(self, text: str) -> List[int]:
        """Ids with the template's special tokens, truncated per the file, never padded."""
        budget = None
        if self.max_length is not None:
            budget = max(0, self.max_length - len(self._prefix_ids) - len(self._suffix_ids))
        # Left truncation keeps the end, so it needs every id.
        ids = self._content_ids(text, None if self._trunc_left else budget)
        if budget is not None and len(ids) > budget:
            ids = ids[len(ids) - budget:] if self._trunc_left else ids[:budget]
        return self._prefix_ids + ids + self._suffix_ids

    def _pad(self, ids: List[int], length: int) -> List[int]:
        if self._pad_multiple:
            length = -(-length // self._pad_multiple) * self._pad_multiple
        if len(ids) >= length:
            return ids
        fill = [self.pad_id] * (length - len(ids))
        return fill + ids if self._pad_left else ids + fill

    def encode(self, text: str) -> List[int]:
        """``tokenizers.Tokenizer.encode(text).ids``: special tokens, truncation and padding per the file."""
        ids = self.token_ids(text)
        if not self.padding:
            return ids
        return self._pad(ids, self._pad_fixed if self._pad_fixed is not None else len(ids))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """``tokenizers.Tokenizer.encode_batch(texts)`` ids (BatchLongest pads to the longest)."""
        rows = [self.token_ids(t) for t in texts]
        if not self.padding:
            return rows
        length = self._pad_fixed if self._pad_fixed is not None else max((len(r) for r in rows), default=0)
        return [self._pad(r, length) for r in rows]


# ================================================================================================
# int8 BERT in numpy
# ================================================================================================

# Exact integer products. On 32-bit ARM (soft-float armel) numpy's int32 matmul, a plain C loop, is
# ~25x faster than reference BLAS in float. Elsewhere float32 BLAS is faster and just as exact, as
# long as no partial sum can exceed 2**24: |u8 - zp| <= 255 times |int8| <= 128, over at most 512
# terms (longer products are cut into 512-term slices whose results are added in float64).
_ARM32 = platform.machine().lower().startswith("arm") and "64" not in platform.machine()
_EXACT = np.dtype(np.int32) if _ARM32 else np.dtype(np.float32)
# The attention products are float in the graph; armel has no FPU in its ABI, so there they run in
# int64 fixed point instead (see _float_product).
_FIXED_POINT = _ARM32
_LN_EPS = 1e-12  # BERT's layer_norm_eps (an attribute of the graph's LayerNormalization nodes)
_PROJECTIONS = ("attn.query", "attn.key", "attn.value", "attn.output", "ffn.intermediate", "ffn.output")


def _quantize(x: np.ndarray) -> Tuple[np.ndarray, np.float32]:
    """onnxruntime's DynamicQuantizeLinear, returned as exact ``q - zero_point`` and the scale.

    uint8 with a per-tensor scale and zero point computed from this tensor's range (widened to
    include 0), rounding half to even, all in float32 as onnxruntime does it.
    """
    lo = np.float32(min(float(x.min()), 0.0))
    hi = np.float32(max(float(x.max()), 0.0))
    scale = np.float32(1.0) if hi == lo else np.float32((hi - lo) / np.float32(255.0))
    zero_point = np.float32(np.rint(np.clip(np.float32(0.0) - lo / scale, 0.0, 255.0)))
    q = np.clip(np.rint(x / scale), -zero_point, np.float32(255.0) - zero_point)
    return q.astype(_EXACT), scale


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    # Statistics in float64 as onnxruntime's kernel keeps them, the rest in float32.
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float64)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    inv = (1.0 / np.sqrt(var + _LN_EPS)).astype(np.float32)
    return (x - mean.astype(np.float32)) * inv * gamma + beta


def _erf(x: np.ndarray) -> np.ndarray:
    """erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution near 1).

    numpy has no erf; float32 throughout because every float operation is emulated on armel.
    """
    a = np.abs(x)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * a)
    poly = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (
        np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    return np.copysign(np.float32(1.0) - poly * np.exp(-a * a), x)


def _float_product(a: np.ndarray, b: np.ndarray, a_bits: int, b_bits: int) -> np.ndarray:
    """``a @ b`` for float32 stacks of matrices (the attention products, float in the graph).

    With ``_FIXED_POINT`` (armel) each matrix is scaled by a power of two so that its largest
    element has ``a_bits``/``b_bits`` bits, rounded, and multiplied exactly in int64: rounding
    errors of 2**-bits of the largest element, finer than float32's 2**-24, and ~3x faster than
    soft-float BLAS (measured under qemu). ``a_bits + b_bits + log2(inner size)`` must stay below 63:
    28 + 28 + 5 for Q.K (head size 32), 26 + 27 + 9 for P.V (at most 512 positions).
    """
    if not _FIXED_POINT:
        return a @ b

    def fixed(x: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray]:
        peak = np.abs(x).max(axis=(-2, -1), keepdims=True).astype(np.float64)
        exp = bits - np.ceil(np.log2(np.maximum(peak, 2.0 ** -60)))  # all-zero input: no inf scale
        scale = np.exp2(exp)
        return np.rint(x * scale).astype(np.int64), scale

    ai, sa = fixed(a, a_bits)
    bi, sb = fixed(b, b_bits)
    # one rounding to float32, then an exact power-of-two rescale (a multiply: cheaper than a divide)
    return (ai @ bi).astype(np.float32) * (1.0 / (sa * sb)).astype(np.float32)


class _Linear:
    """One int8 MatMul of the quantised graph: weight [in, out], per-output-channel scales."""

    def __init__(self, weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bias: np.ndarray) -> None:
        self.weight = weight
        self.scale = scale.astype(np.float32)
        self.zero_point = zero_point if zero_point.any() else None
        self.bias = bias.astype(np.float32)

    def __call__(self, xq: np.ndarray, x_scale: np.float32) -> np.ndarray:
        w = self.weight.astype(_EXACT)
        if self.zero_point is not None:
            w -= self.zero_point.astype(_EXACT)
        if _EXACT.kind == "i":
            # MatMulInteger, then Cast. einsum's contiguous inner loop beats numpy's integer matmul
            # 2.4x on ARM1176 (measured under qemu; neither uses BLAS for integers).
            acc = np.einsum("ik,kj->ij", xq, w).astype(np.float32)
        elif w.shape[0] <= self._slice:
            acc = (xq @ w).astype(np.float32)
        else:
            acc64 = np.zeros((xq.shape[0], w.shape[1]), dtype=np.float64)
            for lo in range(0, w.shape[0], self._slice):
                acc64 += (xq[:, lo:lo + self._slice] @ w[lo:lo + self._slice]).astype(np.float64)
            acc = acc64.astype(np.float32)
        return acc * (x_scale * self.scale) + self.bias

    @property
    def _slice(self) -> int:
        # terms per exact float32 product: 255 * 128 * 512 < 2**24 (255 * 255 * 256 with a zero point)
        return 512 if self.zero_point is None else 256


class _Int8Bert:
    """The int8 sentence-embedding graph of :func:`memento_edge.model.build_model`, run with numpy.

    Reads the initializers by name from ``model.onnx.data`` (memory-mapped: the word table and the
    weights stay in the page cache, not in the process heap). Mirrors the graph node for node:
    embeddings (dequantised word row + position row), LayerNorm, 6 x (self-attention, FFN with
    erf-GELU), mean pooling, L2 normalisation. One text at a time, unpadded, like the onnxruntime
    embedder's ``per_text`` batching, so the dynamic quantisation sees the same tensors.
    """

    def __init__(self, model_dir: Path) -> None:
        layout_path = model_dir / "initializers.json"
        data_path = model_dir / "model.onnx.data"
        try:
            with open(layout_path, encoding="utf-8") as fh:
                self._layout = {e["name"]: e for e in json.load(fh)}
            self._data = np.memmap(data_path, dtype=np.uint8, mode="r")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelUnavailable(f"cannot read the model weights in {model_dir}: {exc}") from exc
        if "embeddings.word_quantized" in self._layout:
            self.word = self._get("embeddings.word_quantized", np.uint8)
            self.word_scale = np.float32(self._get("embeddings.word_scale", np.float32))
            self.word_zero_point = np.float32(self._get("embeddings.word_zero_point", np.uint8))
        else:  # an unquantised word table (the quantiser may leave Gather alone)
            self.word = self._get("embeddings.word", np.float32)
            self.word_scale = self.word_zero_point = None  # type: ignore[assignment]
        self.positions = self._get("embeddings.position_plus_type0", np.float32)
        self.emb_ln = (self._get("embeddings.ln.weight", np.float32), self._get("embeddings.ln.bias", np.float32))
        self.mask_neg = np.float32(self._get("const.mask_neg", np.float32).reshape(-1)[0])
        self.hidden = int(self.word.shape[1])
        self.heads = int(self._get("const.heads_shape", np.int64)[2])
        self.head_dim = self.hidden // self.heads
        self.layers: List[Dict[str, Any]] = []
        while f"layer{len(self.layers)}.attn.query.weight_quantized" in self._layout:
            p = f"layer{len(self.layers)}."
            lin = {name: _Linear(self._get(p + name + ".weight_quantized", np.int8),
                                 self._get(p + name + ".weight_scale", np.float32),
                                 self._get(p + name + ".weight_zero_point", np.int8),
                                 self._get(p + name + ".bias", np.float32)) for name in _PROJECTIONS}
            # Q, K and V read the same quantised input: one product with the three weights side by
            # side (a 442 KiB private copy per layer) instead of three.
            q, k, v = lin["attn.query"], lin["attn.key"], lin["attn.value"]
            qkv = _Linear(np.concatenate([q.weight, k.weight, v.weight], axis=1),
                          np.concatenate([q.scale, k.scale, v.scale]),
                          np.concatenate([self._zp(q), self._zp(k), self._zp(v)]),
                          np.concatenate([q.bias, k.bias, v.bias]))
            self.layers.append({
                "qkv": qkv, "out": lin["attn.output"], "up": lin["ffn.intermediate"], "down": lin["ffn.output"],
                "ln1": (self._get(p + "attn.ln.weight", np.float32), self._get(p + "attn.ln.bias", np.float32)),
                "ln2": (self._get(p + "ffn.ln.weight", np.float32), self._get(p + "ffn.ln.bias", np.float32)),
            })
        if not self.layers or self.hidden % self.heads:
            raise ModelUnavailable(f"{model_dir} does not hold the int8 BERT graph the numpy backend runs "
                                   f"({len(self.layers)} layers found); rebuild it with `memento-edge model build`")
        self.max_positions = int(self.positions.shape[0])

    @staticmethod
    def _zp(lin: _Linear) -> np.ndarray:
        return lin.zero_point if lin.zero_point is not None else np.zeros(lin.scale.shape, dtype=np.int8)

    def _get(self, name: str, dtype: Any) -> np.ndarray:
        entry = self._layout.get(name)
        if entry is None:
            raise ModelUnavailable(f"initializer {name!r} missing from initializers.json; the model directory "
                                   "was built by an incompatible version: rebuild it with `memento-edge model build`")
        if np.dtype(entry["dtype"]) != np.dtype(dtype):
            raise ModelUnavailable(f"initializer {name!r} is {entry['dtype']}, expected {np.dtype(dtype).name}")
        shape = tuple(int(d) for d in entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if count * np.dtype(dtype).itemsize != int(entry["length"]) or \
                int(entry["offset"]) + int(entry["length"]) > self._data.shape[0]:
            raise ModelUnavailable(f"initializer {name!r}: layout does not fit model.onnx.data")
        return np.frombuffer(self._data, dtype=dtype, count=count, offset=int(entry["offset"])).reshape(shape)

    def forward(self, ids: Sequence[int], check: Optional[Callable[[], None]] = None) -> np.ndarray:
        """The L2-normalised sentence embedding of one unpadded id sequence (``check`` between layers)."""
        n = len(ids)
        rows = np.asarray(ids, dtype=np.int64)
        if self.word_scale is not None:
            words = (self.word[rows].astype(np.float32) - self.word_zero_point) * self.word_scale
        else:
            words = np.array(self.word[rows], dtype=np.float32)
        x = _layer_norm(words + self.positions[:n], *self.emb_ln)
        h, d = self.heads, self.head_dim
        for layer in self.layers:
            if check is not None:
                check()
            qkv = layer["qkv"](*_quantize(x))
            q = qkv[:, :self.hidden].reshape(n, h, d).transpose(1, 0, 2)              # H,S,D
            k = qkv[:, self.hidden:2 * self.hidden].reshape(n, h, d).transpose(1, 2, 0)  # H,D,S
            v = qkv[:, 2 * self.hidden:].reshape(n, h, d).transpose(1, 0, 2)         # H,S,D
            # 1/sqrt(d) is folded into the query weights; no padding to mask
            scores = _float_product(q, k, 28, 28)
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = _float_product(scores, v, 26, 27).transpose(1, 0, 2).reshape(n, self.hidden)
            x = _layer_norm(layer["out"](*_quantize(ctx)) + x, *layer["ln1"])
            up = layer["up"](*_quantize(x))
            gelu = (up * np.float32(0.5)) * (_erf(up * np.float32(0.7071067811865476)) + np.float32(1.0))
            x = _layer_norm(layer["down"](*_quantize(gelu)) + x, *layer["ln2"])
        mean = x.sum(axis=0, dtype=np.float32) / np.float32(n)
        norm = max(np.float32(np.sqrt(np.dot(mean, mean))), np.float32(1e-12))
        return (mean / norm).astype(np.float32)


# ================================================================================================
# the Embedder
# ================================================================================================

class NumpyEmbedder(LazyModel):
    """The ``numpy-int8`` Embedder: :class:`WordPieceTokenizer` + :class:`_Int8Bert`, LRU-cached.

    Thread-safe: one thread loads while others wait (bounded by ``request_timeout``); runs are
    limited to one per CPU core (numpy releases the GIL in its products, and each run holds a few
    MB of activations); an unload waits for runs in progress (the lifecycle of :class:`LazyModel`,
    shared with the onnxruntime embedder). Each text runs alone and unpadded, so a text always gets
    the same vector whatever it is batched with. ``request_timeout`` is checked between layers (EmbedTimeout).
    """

    dim = 384
    backend = "numpy-int8"
    _THREAD_PREFIX = "memento-numpy"

    def __init__(self, settings: Any, *, cache: Any = None, verify: str = "deep") -> None:
        """``settings``: a :class:`memento_edge.config.Settings`; ``verify``: "deep" (sha256 every
        model file at load, ~1 s on a Pi Zero) or "fast" (sizes and fingerprint only)."""
        from .embedder import LRUCache  # numpy + stdlib only; imported here to keep import order simple

        if verify not in ("deep", "fast"):
            raise ValueError("verify must be 'deep' or 'fast'")
        self.settings = settings
        self.model_dir = Path(settings.model_path)
        self.verify = verify
        self.cache = cache if cache is not None else LRUCache.from_settings(settings)
        self.max_concurrent_runs = max(1, os.cpu_count() or 1)
        self._slots = threading.BoundedSemaphore(self.max_concurrent_runs)
        self._init_lifecycle()
        self.embed_count = 0

    # --- identity / state --------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The manifest fingerprint, read without loading the model (ModelUnavailable if missing)."""
        from .model import load_manifest

        return load_manifest(self.model_dir).fingerprint

    def _create_runtime(self) -> Tuple[WordPieceTokenizer, _Int8Bert]:
        from .model import verify_model_dir

        verify_model_dir(self.model_dir, deep=self.verify == "deep")
        try:
            tokenizer = WordPieceTokenizer.from_file(self.model_dir / "tokenizer.json")
        except (OSError, ValueError, KeyError) as exc:
            raise ModelUnavailable(f"cannot read {self.model_dir / 'tokenizer.json'}: {exc}") from exc
        model = _Int8Bert(self.model_dir)
        # Same truncation as the onnxruntime embedder (settings.max_tokens), within the position table.
        tokenizer.max_length = min(int(self.settings.max_tokens), model.max_positions)
        tokenizer.padding = False
        return tokenizer, model

    def embed_deferring(self, text: str, pause: Callable[[], None]) -> np.ndarray:
        """One text's vector for the background worker (backlog.py), uncached.

        No run slot and no ``request_timeout``: a 200-token text takes a minute on a Pi Zero and must
        still finish. ``pause()`` runs between layers; the worker parks there while a query embeds, so
        the query has the core instead of queueing behind this text.
        """
        tokenizer, model = self._acquire(time.monotonic() + max(float(self.settings.request_timeout), 0.0))
        try:
            vec = model.forward(tokenizer.token_ids(text), pause)
        finally:
            self._release()
        with self._stats_lock:
            self.embed_count += 1
        return vec

    # --- embedding ---------------------------------------------------------------------------
    def _infer(self, texts: List[str]) -> np.ndarray:
        """Vectors of ``texts`` (no cache), one text at a time, each within ``request_timeout``."""
        result = np.empty((len(texts), self.dim), dtype=np.float32)
        timeout = max(float(self.settings.request_timeout), 0.0)
        for i, text in enumerate(texts):
            deadline = time.monotonic() + timeout
            tokenizer, model = self._acquire(deadline)
            try:
                result[i] = self._forward(tokenizer, model, text, deadline, timeout)
            finally:
                del tokenizer, model
                self._release()
            with self._stats_lock:
                self.embed_count += 1
        return result

    def _forward(self, tokenizer: WordPieceTokenizer, model: "_Int8Bert", text: str, deadline: float,
                 timeout: float) -> np.ndarray:
        ids = tokenizer.token_ids(text)
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise self._timed_out(f"embedding model busy for more than {timeout:g}s", timeout)
        try:
            def check() -> None:
                if timeout > 0 and time.monotonic() > deadline:
                    raise self._timed_out(f"embedding took longer than {timeout:g}s and was stopped", timeout)
            return model.forward(ids, check)
        finally:
            self._slots.release()

    # --- stats ------------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Same keys as ``OnnxEmbedder.stats()`` where they apply, plus the exact-product dtype."""
        out = self._lifecycle_stats()
        with self._stats_lock:
            out.update(embed_count=self.embed_count, max_concurrent_runs=self.max_concurrent_runs,
                       integer_products=_EXACT.name)
        return out
