"""Token-level alignment scores (TERAN): equal to a per-pair loop over the valid tokens, blind to padding."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from temde_hf.models.temde.alignment_temde import (
    ALIGNMENT_AGGREGATIONS,
    alignment_scores,
    paired_alignment_scores,
)
from temde_hf.testing import tiny_config


def _reference(image: torch.Tensor, text: torch.Tensor, aggregation: str) -> float:
    """One pair, valid tokens only, written as the papers define it, with Python loops."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    words = [max(float(w @ r) for r in image) for w in text]  # every word's best region
    regions = [max(float(w @ r) for w in text) for r in image]  # every region's best word
    if aggregation == "max_sum":
        return sum(words)
    if aggregation == "max_mean":
        return sum(words) / len(words)
    return (sum(words) / len(words) + sum(regions) / len(regions)) / 2


def _padded(
    lengths: list[int], width: int, dim: int, garbage: float, seed: int
) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Token sets of the given lengths, padded to `width` with `garbage`-scaled noise (not zeros)."""
    g = torch.Generator().manual_seed(seed)
    valid = [torch.randn(n, dim, generator=g) for n in lengths]
    tokens = garbage * torch.randn(len(lengths), width, dim, generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, v in enumerate(valid):
        tokens[i, : len(v)] = v
        mask[i, : len(v)] = 1
    return valid, tokens, mask


def test_a_new_aggregation_is_a_config_choice_with_no_other_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="alignment_aggregation='mean_mean'"):
        tiny_config(alignment_aggregation="mean_mean")
    monkeypatch.setitem(ALIGNMENT_AGGREGATIONS, "mean_mean", ALIGNMENT_AGGREGATIONS["max_mean"])
    assert tiny_config(alignment_aggregation="mean_mean").alignment_aggregation == "mean_mean"


@pytest.mark.parametrize("aggregation", sorted(ALIGNMENT_AGGREGATIONS))
def test_scores_equal_loop_reference_and_ignore_padding(aggregation: str) -> None:
    images, image_tokens, image_mask = _padded([5, 3, 7], width=9, dim=8, garbage=50.0, seed=0)
    texts, text_tokens, text_mask = _padded([2, 6, 4, 1], width=8, dim=8, garbage=50.0, seed=1)
    scores = alignment_scores(image_tokens, image_mask, text_tokens, text_mask, aggregation)
    expected = torch.tensor([[_reference(i, t, aggregation) for t in texts] for i in images])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    # more padding, other garbage in it: the same scores
    _, wider_images, wider_image_mask = _padded([5, 3, 7], width=12, dim=8, garbage=-7.0, seed=0)
    _, wider_texts, wider_text_mask = _padded([2, 6, 4, 1], width=11, dim=8, garbage=3.0, seed=1)
    again = alignment_scores(wider_images, wider_image_mask, wider_texts, wider_text_mask, aggregation)
    torch.testing.assert_close(again, scores, atol=1e-6, rtol=0)
    # tiny blocks (every chunk boundary crossed) and the row-paired form agree with the full matrix
    blocked = alignment_scores(
        image_tokens, image_mask, text_tokens, text_mask, aggregation, max_elements=100
    )
    torch.testing.assert_close(blocked, scores, atol=1e-6, rtol=0)
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    paired = paired_alignment_scores(
        image_tokens[rows.flatten()], image_mask[rows.flatten()], text_tokens[cols.flatten()],
        text_mask[cols.flatten()], aggregation,
    )  # fmt: skip
    torch.testing.assert_close(paired.reshape(3, 4), scores, atol=1e-6, rtol=0)


def test_gradient_never_reaches_padding_and_float16_storage_scores_close() -> None:
    _, image_tokens, image_mask = _padded([4, 2], width=6, dim=8, garbage=1.0, seed=2)
    _, text_tokens, text_mask = _padded([3, 5], width=7, dim=8, garbage=1.0, seed=3)
    image_tokens.requires_grad_()
    text_tokens.requires_grad_()
    for aggregation in ALIGNMENT_AGGREGATIONS:
        alignment_scores(image_tokens, image_mask, text_tokens, text_mask, aggregation).sum().backward()
    assert image_tokens.grad[~image_mask.bool()].abs().max() == 0
    assert text_tokens.grad[~text_mask.bool()].abs().max() == 0
    assert image_tokens.grad[image_mask.bool()].abs().max() > 0
    half = alignment_scores(image_tokens.detach().half(), image_mask, text_tokens.detach().half(), text_mask)
    full = alignment_scores(image_tokens.detach(), image_mask, text_tokens.detach(), text_mask)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=2e-3, rtol=0)


def test_unknown_aggregation_is_named() -> None:
    tokens, mask = torch.randn(1, 2, 4), torch.ones(1, 2)
    with pytest.raises(
        ValueError,
        match=r"alignment aggregation 'mean_max' is not supported; choose one of max_mean, max_sum, symmetric",
    ):
        alignment_scores(tokens, mask, tokens, mask, "mean_max")
