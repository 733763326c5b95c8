"""Recall@K curves of both retrieval directions as a PNG."""

from __future__ import annotations

from pathlib import Path

import torch


def recall_curve(ranks: torch.Tensor, max_k: int) -> list[float]:
    """R@K in % for K = 1..`max_k` from `(n_queries,)` 0-based ranks."""
    counts = torch.bincount(ranks.clamp(max=max_k), minlength=max_k + 1)[:max_k]
    return (100.0 * counts.cumsum(0).double() / max(len(ranks), 1)).tolist()


def plot_recall_at_k(
    i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor, path: str | Path, max_k: int = 50, title: str = ""
) -> Path:
    """Write a recall@K plot (K = 1..`max_k`, log axis) of image->text and text->image retrieval.

    Args:
        i2t_ranks: `(n_images,)` 0-based ranks (best caption).
        t2i_ranks: `(n_captions,)` 0-based ranks.
        path: The PNG to write.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or in CI
    import matplotlib.pyplot as plt

    path = Path(path)
    ks = list(range(1, max_k + 1))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, ranks in (("image → text", i2t_ranks), ("text → image", t2i_ranks)):
        curve = recall_curve(ranks, max_k)
        ax.plot(ks, curve, label=f"{name} (R@1 {curve[0]:.1f}, R@10 {curve[min(9, max_k - 1)]:.1f})")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
