"""Retrieval evaluation: chunked R@K / RSUM / ranks, COCO 1K folds and 5K, two-stage R@K, plots.

Embeddings come from `temde_hf.inference.encode` (the one encode path, shared with the gallery).

``temde-hf evaluate CHECKPOINT --data PATH`` (`temde_hf.evaluation.cli.main`) runs it end to end; the
folder ``retrieval_metric/`` is the same metric as an `evaluate` module (``evaluate.load(path)``).
"""

from __future__ import annotations

from .folds import evaluate_embeddings, fold_indices
from .metrics import (
    KS,
    captions_per_image_map,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)
from .plots import plot_recall_at_k, recall_curve

__all__ = [
    "KS",
    "captions_per_image_map",
    "evaluate_embeddings",
    "fold_indices",
    "metrics_from_ranks",
    "plot_recall_at_k",
    "recall_curve",
    "retrieval_metrics",
    "retrieval_ranks",
]
