"""The evaluation protocols: COCO 1K (mean of five 1,000-image folds of the 5K test), COCO 5K, Flickr 1K.

COCO 1K fold ``k`` holds test images ``1000k .. 1000k+999`` (in the Karpathy file's order) and their
captions (``5000k .. 5000k+4999`` with 5 per image); COCO 5K and Flickr30k 1K use the whole test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .metrics import KS, metrics_from_ranks, retrieval_ranks


def fold_indices(
    caption_to_image: torch.Tensor, n_images: int, fold_size: int = 1000
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Image and caption indices of each consecutive `fold_size`-image fold.

    Args:
        caption_to_image: `(n_captions,)` the image of every caption.
        n_images: Number of images; must be a multiple of `fold_size`.

    Returns:
        Per fold: `(fold_size,)` image indices and `(n_fold_captions,)` caption indices.
    """
    if n_images % fold_size:
        raise ValueError(f"{n_images} images do not split into folds of {fold_size}")
    folds = []
    for start in range(0, n_images, fold_size):
        images = torch.arange(start, start + fold_size)
        captions = torch.nonzero(
            (caption_to_image >= start) & (caption_to_image < start + fold_size)
        ).squeeze(1)
        folds.append((images, captions))
    return folds


def evaluate_embeddings(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_to_image: torch.Tensor,
    fold_size: int | None = 1000,
    chunk_size: int = 256,
    ks: Sequence[int] = KS,
    ranks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Metrics on the whole set and, when it holds several folds, the mean over folds.

    For the COCO 5K test split this gives ``"full"`` = COCO 5K and ``"folds_mean"`` = COCO 1K; for
    Flickr30k's 1,000 test images ``"full"`` is the Flickr 1K number.

    Args:
        image_embeds: `(n_images, E)`.
        text_embeds: `(n_captions, E)`.
        caption_to_image: `(n_captions,)` int64.
        fold_size: Images per fold (``None``: no folds). Folds are computed only when the set holds
            more than one whole fold.
        chunk_size: Queries scored at once.
        ranks: The whole set's `(i2t, t2i)` ranks (`retrieval_ranks`) when the caller has them already
            (``temde-hf evaluate`` plots them); None: computed here.

    Returns:
        ``{"n_images", "n_captions", "full": metrics, "fold_size", "folds": [metrics], "folds_mean": metrics}``
        (the fold entries only when computed).
    """
    n_images = image_embeds.shape[0]
    i2t, t2i = (
        ranks
        if ranks is not None
        else retrieval_ranks(
            caption_to_image=caption_to_image,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            chunk_size=chunk_size,
        )
    )
    result: dict[str, Any] = {
        "n_images": n_images,
        "n_captions": int(text_embeds.shape[0]),
        "full": metrics_from_ranks(i2t, t2i, ks),
    }
    if fold_size and n_images > fold_size and n_images % fold_size == 0:
        folds = []
        for images, captions in fold_indices(caption_to_image, n_images, fold_size):
            fold_i2t, fold_t2i = retrieval_ranks(
                caption_to_image=caption_to_image[captions] - images[0],
                image_embeds=image_embeds[images],
                text_embeds=text_embeds[captions],
                chunk_size=chunk_size,
            )
            folds.append(metrics_from_ranks(fold_i2t, fold_t2i, ks))
        result["fold_size"] = fold_size
        result["folds"] = folds
        result["folds_mean"] = {key: sum(f[key] for f in folds) / len(folds) for key in folds[0]}
    return result
