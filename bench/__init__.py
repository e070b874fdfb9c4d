"""memento-edge benchmark suite.

``python -m bench --profile full|short|emulated`` measures the engine (embedding, store, stress, RSS,
database size, onnxruntime session-option ablation) and LoCoMo retrieval quality, side by side with a
"seed-style" baseline (fp32 graph, default onnxruntime session, no cache, vector-only recall), and writes
``PREFIX.json``, ``PREFIX.md`` and ``PREFIX-recall.png``. See :mod:`bench.run` for the command line.

The bench is not part of the installed package: it runs from a checkout (``python -m bench`` in the
repository root).
"""
from __future__ import annotations

__all__ = ["main"]


def main(argv=None) -> int:  # type: ignore[no-untyped-def]
    """Run the benchmark command line (see :func:`bench.run.main`)."""
    from .run import main as _main

    return _main(argv)
