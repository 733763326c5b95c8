"""Gradient caching: 4 micro-batches give the gradients of one full batch (every negative kept)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from accelerate import Accelerator

from temde_hf.testing import tiny_batch, tiny_model
from temde_hf.training.accumulation import forward_backward
from temde_hf.training.batches import split_micro_batches
from temde_hf.training.losses import contrastive_loss


def _grads(model: torch.nn.Module, batch: dict, n_micro: int, loss_type: str, max_violation: bool) -> tuple:
    model.zero_grad(set_to_none=True)
    loss_fn = partial(contrastive_loss, loss_type=loss_type, max_violation=max_violation, negatives="global")
    loss = forward_backward(model, split_micro_batches(batch, n_micro), loss_fn, Accelerator(cpu=True))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads


@pytest.mark.parametrize(
    ("loss_type", "max_violation"), [("info_nce", True), ("vse_hinge", True), ("vse_hinge", False)]
)
def test_four_micro_batches_equal_one_full_batch(loss_type: str, max_violation: bool) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model().train()
    if loss_type == "vse_hinge":  # the hinge never reads the temperature: the trainer freezes it
        model.logit_scale.requires_grad_(False)
    batch = tiny_batch(16, seed=1, n_images=12)  # some images have two captions: pair_ids in play
    full_loss, full = _grads(model, batch, 1, loss_type, max_violation)
    acc_loss, acc = _grads(model, batch, 4, loss_type, max_violation)
    assert torch.allclose(full_loss, acc_loss, atol=1e-6)
    assert full.keys() == acc.keys() and len(full) > 10
    assert any(n.startswith("sketch.") for n in full)
    assert ("logit_scale" in full) == (loss_type == "info_nce")  # the hinge has no temperature
    for name in full:
        assert torch.allclose(full[name], acc[name], atol=1e-5, rtol=1e-4), name
    # the hardest negative of a micro-batch is not the batch's: plain accumulation would differ
    plain = {n: torch.zeros_like(g) for n, g in full.items()}
    for micro in split_micro_batches(batch, 4):
        _, g = _grads(model, micro, 1, loss_type, max_violation)
        for n in plain:
            plain[n] += g.get(n, 0) / 4
    assert max((plain[n] - full[n]).abs().max() for n in full) > 1e-4


def test_cached_pass_replays_dropout() -> None:
    """With dropout on, the recomputed micro-batches must see the masks of the cached pass."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model(dropout=0.3).train()
    batch = tiny_batch(8, seed=2)
    torch.manual_seed(5)
    loss_a, grads_a = _grads(model, batch, 2, "info_nce", True)
    torch.manual_seed(5)
    loss_b, _ = _grads(model, batch, 2, "info_nce", True)
    assert torch.equal(loss_a, loss_b)
    # a finite-difference check along the gradient: the cached gradient is the true one only if pass 3
    # replays pass 1's dropout; otherwise the surrogate's gradient points elsewhere
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    direction = [grads_a.get(n, torch.zeros_like(p)) for n, p in zip(names, params)]
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    eps = 1e-3
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d / norm)
    torch.manual_seed(5)
    loss_c, _ = _grads(model, batch, 2, "info_nce", True)
    slope = (loss_c - loss_a) / eps
    assert slope == pytest.approx(float(norm), rel=0.05)
