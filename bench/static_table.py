"""Option (b) of #13, an experiment: a static token-embedding table distilled from the int8 model.

Not a runtime backend. The model2vec recipe without torch: every vocabulary token goes through the
pinned int8 graph alone (``[CLS] token [SEP]``, batch of one so the dynamic activation scale is the
token's own), the 30,522 sentence vectors are centred and rotated by PCA to ``dims`` components, and
each row is weighted by ``sif / (sif + p)`` with ``p`` a Zipf probability from the token's vocabulary
rank (the uncased vocab is in frequency order after its single characters). A text's vector is then
the mean of its tokens' rows, L2-normalised: a table lookup instead of six transformer layers.

    python -m bench.static_table distill --out /tmp/static.npy
    python -m bench.static_table score --table /tmp/static.npy

``score`` runs the paraphrase dev set (top-1 / MRR) and LoCoMo dev (evidence R@10) per recall mode
through ``Memory.recall`` with the table as the embedder, the way ``python -m bench.quality`` scores the
int8 model. Measured result and decision: bench/results/2026-12-03-static-table.md. Nothing here is
committed as a binary: the table is rebuilt from the verified model directory.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from .engine import REPO_ROOT

DEFAULT_MODEL = REPO_ROOT / "models" / "minilm-int8"


def distill(model_dir: Path) -> np.ndarray:
    """Sentence vector of each vocabulary token alone through the int8 graph: (vocab, 384) float32."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    import json

    vocab = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    out = np.zeros((len(vocab), 384), dtype=np.float32)
    for token in range(len(vocab)):
        ids = np.array([[cls, token, sep]], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        out[token] = session.run(None, feed)[0][0]
    return out


def reduce(raw: np.ndarray, dims: int = 256, sif: float = 1e-4) -> np.ndarray:
    """PCA to ``dims`` components, then SIF weighting by Zipf probability of the vocabulary rank."""
    centred = raw.astype(np.float64) - raw.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    table = centred @ vt[:dims].T
    inv_rank = 1.0 / np.arange(2, table.shape[0] + 2)
    prob = inv_rank / inv_rank.sum()
    return (table * (sif / (sif + prob))[:, None]).astype(np.float32)


class StaticEmbedder:
    """Embedder protocol over a static table (bench only: fingerprint names the table file)."""

    backend = "static"
    loaded = True

    def __init__(self, table: np.ndarray, model_dir: Path, name: str) -> None:
        from memento_edge.fallback import WordPieceTokenizer

        self.table = table
        self.dim = int(table.shape[1])
        self.fingerprint = f"static-{name}"
        self.tokenizer = WordPieceTokenizer.from_file(model_dir / "tokenizer.json")

    def load(self) -> None:
        """Nothing to load."""

    def stats(self) -> Dict[str, Any]:
        """No statistics."""
        return {"backend": self.backend}

    def embed(self, text: str) -> np.ndarray:
        """One text's vector."""
        return self.embed_batch([text])[0]

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Mean of the texts' token rows, L2-normalised."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = self.tokenizer.token_ids(text)[1:-1]  # without [CLS] / [SEP]
            if ids:
                vec = self.table[ids].astype(np.float32).mean(axis=0)
                out[i] = vec / max(float(np.linalg.norm(vec)), 1e-12)
        return out


def score_all(emb: Any, modes: Sequence[str] = ("keyword", "vector", "hybrid")) -> Dict[str, Any]:
    """The paraphrase set (top-1 / MRR) and LoCoMo dev (evidence R@10) per recall mode with ``emb``,
    through ``Memory.recall`` exactly as ``python -m bench.quality`` scores the int8 model."""
    from .quality import _project_spec, locomo_modes, paraphrase_modes

    spec = _project_spec(None)
    with tempfile.TemporaryDirectory(prefix="memento-static-") as tmp:
        return {"paraphrase": paraphrase_modes(spec, Path(tmp), modes, embedder=emb),
                "locomo": locomo_modes(spec, Path(tmp), modes, embedder=emb)}


def main(argv: Sequence[str]) -> int:
    """``distill`` or ``score`` (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m bench.static_table")
    ap.add_argument("command", choices=["distill", "score"])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=Path("static.npy"))
    ap.add_argument("--table", type=Path, default=Path("static.npy"))
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--sif", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if args.command == "distill":
        t0 = time.monotonic()
        np.save(args.out, reduce(distill(args.model_dir), args.dims, args.sif).astype(np.float16))
        print(f"wrote {args.out} in {time.monotonic() - t0:.0f} s")
        return 0
    from .quality import _print_summary

    emb = StaticEmbedder(np.load(args.table, mmap_mode="r"), args.model_dir, args.table.name)
    _print_summary(score_all(emb))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
