"""Token-level alignment scores (TERAN, Messina et al. 2021) on the joint-space tokens.

The two pipelines stay separate until the very end: for a pair (image, caption) the cosine similarity
of every word with every region is a `(L_text, L_image)` matrix, and an *aggregation* turns it into one
score. Nothing here has parameters, so a score can be computed for any pair from stored token
embeddings (a gallery's, a reranker's), and the same function is a training objective.

Padding is exact: padded regions never win a maximum (they are set to -inf before it) and padded words
never enter a sum or a mean, so a score does not change when the padding grows or holds garbage.
`tests/test_alignment.py` checks every aggregation against a per-pair loop over the valid tokens only.

An aggregation is one function under `@ALIGNMENT_AGGREGATIONS.register(name)`; the config's
`alignment_aggregation` picks it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from .registry_temde import Registry

# sim (..., L_text, L_image), text_mask (..., L_text), image_mask (..., L_image) -> scores (...)
Aggregation = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The score of row-paired stored tokens, the one signature every second-stage scorer has:
# image_tokens (P, L_image, D), image_mask (P, L_image), text_tokens (P, L_text, D), text_mask (P, L_text)
# -> (P,) scores, higher for a better match. `paired_alignment_scores` (with its aggregation) is one,
# `TemdeForImageTextRetrieval.get_matching_logits` another; `temde_hf.inference.rerank` wraps them.
PairScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Name -> `Aggregation`; the config validates `alignment_aggregation` against it.
ALIGNMENT_AGGREGATIONS = Registry("alignment_aggregation", "ALIGNMENT_AGGREGATIONS")


def _best_region_per_word(sim: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """`(..., Lt, Li)` -> `(..., Lt)`: each word's most similar valid region."""
    return sim.masked_fill(~image_mask.unsqueeze(-2), float("-inf")).amax(dim=-1)


def _best_word_per_region(sim: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """`(..., Lt, Li)` -> `(..., Li)`: each region's most similar valid word."""
    return sim.masked_fill(~text_mask.unsqueeze(-1), float("-inf")).amax(dim=-2)


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where(): a padded position may hold -inf (a padded word's max over regions is still finite, but a
    # region's max over an all-masked axis is not); multiplying by 0 would give NaN
    return torch.where(mask, values, values.new_zeros(())).sum(dim=-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked_sum(values, mask) / mask.sum(dim=-1).clamp_min(1).to(values.dtype)


@ALIGNMENT_AGGREGATIONS.register("max_mean")
def max_mean(sim: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """For every word its best region, averaged over the words (in [-1, 1]; long captions do not win)."""
    return _masked_mean(_best_region_per_word(sim, image_mask), text_mask)


@ALIGNMENT_AGGREGATIONS.register("max_sum")
def max_sum(sim: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """TERAN's MrSw: for every word its best region, summed over the words."""
    return _masked_sum(_best_region_per_word(sim, image_mask), text_mask)


@ALIGNMENT_AGGREGATIONS.register("symmetric")
def symmetric(sim: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Mean of word→best region (averaged over words) and region→best word (averaged over regions)."""
    words = _masked_mean(_best_region_per_word(sim, image_mask), text_mask)
    regions = _masked_mean(_best_word_per_region(sim, text_mask), image_mask)
    return (words + regions) / 2


def _aggregation(name: str) -> Aggregation:
    ALIGNMENT_AGGREGATIONS.check(name, label=f"alignment aggregation {name!r}")
    return ALIGNMENT_AGGREGATIONS[name]


def _unit(tokens: torch.Tensor) -> torch.Tensor:
    # cosine similarity, computed in float32 whatever the storage dtype (fp16 galleries, bf16 autocast)
    return F.normalize(tokens.float(), dim=-1)


def paired_alignment_scores(
    image_tokens: torch.Tensor,
    image_mask: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    aggregation: str = "max_mean",
) -> torch.Tensor:
    """Alignment score of each row-paired (image, caption).

    Args:
        image_tokens: `(P, L_image, D)` joint-space region tokens.
        image_mask: `(P, L_image)`, nonzero for real tokens.
        text_tokens: `(P, L_text, D)` joint-space word tokens.
        text_mask: `(P, L_text)`.
        aggregation: A key of `ALIGNMENT_AGGREGATIONS`.

    Returns:
        `(P,)` float32 scores.
    """
    sim = torch.einsum("pjd,pld->pjl", _unit(text_tokens), _unit(image_tokens))  # (P, Lt, Li)
    return _aggregation(aggregation)(sim, text_mask.bool(), image_mask.bool())


def alignment_scores(
    image_tokens: torch.Tensor,
    image_mask: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    aggregation: str = "max_mean",
    max_elements: int = 2**24,
) -> torch.Tensor:
    """Alignment score of every image with every caption, in blocks that bound memory.

    One block materialises `(images, captions, L_text, L_image)` similarities; block sizes are chosen
    so that this stays under `max_elements` (64 MB in float32 by default), so 1,000 images x 5,000
    captions scores without the 10 GB full tensor. Differentiable (the trainer's alignment objective).

    Args:
        image_tokens: `(n_images, L_image, D)`.
        image_mask: `(n_images, L_image)`.
        text_tokens: `(n_texts, L_text, D)`.
        text_mask: `(n_texts, L_text)`.
        aggregation: A key of `ALIGNMENT_AGGREGATIONS`.
        max_elements: Similarities per block.

    Returns:
        `(n_images, n_texts)` float32 scores.
    """
    aggregate = _aggregation(aggregation)
    images, texts = _unit(image_tokens), _unit(text_tokens)
    image_mask, text_mask = image_mask.bool(), text_mask.bool()
    per_pair = max(1, images.shape[1] * texts.shape[1])
    text_block = max(1, min(texts.shape[0], max_elements // per_pair))
    image_block = max(1, max_elements // (per_pair * text_block))
    rows = []
    for i in range(0, images.shape[0], image_block):
        img, img_mask = images[i : i + image_block], image_mask[i : i + image_block]
        row = []
        for t in range(0, texts.shape[0], text_block):
            txt, txt_mask = texts[t : t + text_block], text_mask[t : t + text_block]
            sim = torch.einsum("ild,tjd->itjl", img, txt)  # (image block, text block, Lt, Li)
            row.append(aggregate(sim, txt_mask[None], img_mask[:, None]))
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


__all__ = ["ALIGNMENT_AGGREGATIONS", "PairScorer", "alignment_scores", "paired_alignment_scores"]
