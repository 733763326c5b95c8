"""Contrastive losses for paired image/text embeddings, behind the `LOSSES` registry: their one home.

Every loss of `LOSSES` takes row-paired embeddings `image_embeds (n, E)` / `text_embeds (n, E)` (row i of each is a
positive pair, every other row a negative) and returns a scalar. `pair_ids (n,)` marks rows that share
an image (several captions of one photo in a batch): those are not used as negatives. `SCORE_LOSSES`
holds the same losses on a given `(n, n)` score matrix, for scores that are not one inner product
(the token-level alignment score of `alignment_temde`).

Why here, in the model folder: the model's `forward(return_loss=True)` returns `info_nce_loss`, and this
folder ships as Hub remote code, so the loss definitions ship with it. What is only about training lives
in the package and defines no contrastive formula of its own: `temde_hf.training.losses` gathers the
embeddings of every process (with gradients) and applies `LOSSES[loss_type]` to the global batch;
`temde_hf.training.objectives` adds the second-stage terms (alignment through `SCORE_LOSSES`, the matching
head's cross-entropy, distillation), which need the trainer's mined negatives or a teacher. A new loss
is one function under `@LOSSES.register(name)` (and `@SCORE_LOSSES.register(name)` for the score form);
`--loss_type` / `--alignment_loss_type` pick it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .registry_temde import Registry

# Every loss: `(image_embeds (n, E), text_embeds (n, E), *, logit_scale, margin, max_violation, pair_ids)`
# -> scalar; a new one is a function under `@LOSSES.register(name)`.
LOSSES = Registry("loss_type", "LOSSES")
# The same losses on a given score matrix `(n, n)` (e.g. token-level alignment scores); same keys as `LOSSES`.
SCORE_LOSSES = Registry("alignment_loss_type", "SCORE_LOSSES")


def same_pair_mask(pair_ids: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """`(n, n)` bool: True where rows i and j are positives of each other (the diagonal at least)."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    if pair_ids is None:
        return eye
    return eye | (pair_ids[:, None] == pair_ids[None, :])


@SCORE_LOSSES.register("info_nce")
def info_nce_scores_loss(
    scores: torch.Tensor,
    *,
    logit_scale: torch.Tensor,
    pair_ids: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """Symmetric InfoNCE on a row-paired score matrix (any score: inner products, alignment scores).

    Args:
        scores: `(n, n)` unscaled scores, `scores[i, j]` of image i with caption j; the diagonal pairs.
        logit_scale: scalar, the *exponentiated* scale the scores are multiplied by.
        pair_ids: optional `(n,)`; off-diagonal rows with the same id are removed from the negatives.
    """
    n = scores.shape[0]
    logits = logit_scale * scores  # (n_image, n_text)
    positives = same_pair_mask(pair_ids, n, logits.device)
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(positives & ~eye, float("-inf"))
    labels = torch.arange(n, device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@SCORE_LOSSES.register("vse_hinge")
def vse_hinge_scores_loss(
    scores: torch.Tensor,
    *,
    margin: float = 0.2,
    max_violation: bool = True,
    pair_ids: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """VSE++ bidirectional hinge on a row-paired score matrix `(n, n)` (see `vse_hinge_loss`)."""
    n = scores.shape[0]
    diagonal = scores.diagonal()
    cost_text = (margin + scores - diagonal[:, None]).clamp(min=0)  # image i vs caption j
    cost_image = (margin + scores - diagonal[None, :]).clamp(min=0)  # caption j vs image i
    positives = same_pair_mask(pair_ids, n, scores.device)
    cost_text = cost_text.masked_fill(positives, 0.0)
    cost_image = cost_image.masked_fill(positives, 0.0)
    if max_violation:
        return (cost_text.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()) / n
    return (cost_text.sum() + cost_image.sum()) / n


@LOSSES.register("info_nce")
def info_nce_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    logit_scale: torch.Tensor,
    pair_ids: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropies.

    Optimises `logit_scale · <image_i, text_j>` so that each image's own caption wins the softmax over
    the batch's captions, and vice versa.

    Args:
        image_embeds: `(n, E)`.
        text_embeds: `(n, E)`, row-paired with `image_embeds`.
        logit_scale: scalar, the *exponentiated* scale (e.g. `model.logit_scale.exp()`).
        pair_ids: optional `(n,)`; off-diagonal rows with the same id are removed from the negatives.
    """
    return info_nce_scores_loss(image_embeds @ text_embeds.T, logit_scale=logit_scale, pair_ids=pair_ids)


@LOSSES.register("vse_hinge")
def vse_hinge_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    margin: float = 0.2,
    max_violation: bool = True,
    pair_ids: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """VSE++ bidirectional hinge on the raw similarities (no logit scale).

    For each image, every negative caption should score at least `margin` below its own caption, and
    likewise for each caption over images. With `max_violation` only the hardest negative of each query
    counts (VSE++); otherwise all negatives are summed (VSE∞'s warm-up). The per-query costs are averaged
    over the batch (VSE++ sums them: the same optimum, a learning rate `n` times smaller).
    """
    return vse_hinge_scores_loss(
        image_embeds @ text_embeds.T, margin=margin, max_violation=max_violation, pair_ids=pair_ids
    )
