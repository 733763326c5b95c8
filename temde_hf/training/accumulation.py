"""One optimizer step's forward and backward, with gradient accumulation that keeps every negative.

Plain accumulation (loss per micro-batch, gradients summed) shrinks a contrastive loss's negatives to
one micro-batch. Here the loss always sees the whole step's pairs (and, with global negatives, every
process's), in three passes ("gradient caching"):

1. encode every micro-batch without autograd and cache the embeddings (and the logit scale);
2. compute the loss on the cached set and its gradient w.r.t. the cached embeddings and scale;
3. re-encode each micro-batch with autograd and backpropagate its slice of the cached gradient (the
   scale's gradient once, with the last micro-batch).

By the chain rule the parameter gradients equal those of one big batch; the cost is one extra forward.
Every forward goes through the model `accelerator.prepare` returned (a DDP wrapper under several
processes: calling the inner module would silently skip the gradient all-reduce), and every micro-batch
but the last runs inside `accelerator.no_sync`, so gradients are all-reduced once per step. Dropout is
replayed by restoring each micro-batch's RNG state in pass 3. Towers with batch statistics (BatchNorm in
train mode) would see each micro-batch twice: keep them in eval mode (``--freeze_batch_norm``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import model_inputs
from .losses import check_finite

# (image_embeds (n, E), text_embeds (n, E), logit_scale (1,), pair_ids (n,) | None) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class RngState:
    """The torch RNG state of the CPU and (if used) the accelerator device, to replay dropout."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


def encode_pairs(
    model: nn.Module, batch: dict[str, torch.Tensor], sketch_weight: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training forward: `(image_embeds (n, E), text_embeds (n, E), logit_scale (1,))`.

    Args:
        model: The prepared model (DDP wrapper or the model itself).
        batch: A training batch (raw or cached inputs, see `temde_hf.training.batches`).
        sketch_weight: λ of the `concat` fusion for this step (the sketch warm-up passes 0).
    """
    out = model(**model_inputs(batch), sketch_weight=sketch_weight)
    return out.image_embeds, out.text_embeds, out.logit_scale


def forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    accelerator: Any,
    *,
    sketch_weight: float | None = None,
    where: str = "step",
) -> torch.Tensor:
    """Accumulate the gradients of the loss on all `micro_batches` together into ``param.grad``.

    Args:
        model: The prepared model, in train mode, on `accelerator.device`.
        micro_batches: This process's batches for one optimizer step (tensors already on the device).
        loss_fn: The loss over the concatenated rows (it may gather other processes' rows).
        accelerator: `accelerate.Accelerator` (fp16 loss scaling in `backward`, `no_sync`).
        sketch_weight: λ for this step (``None``: the config's).
        where: Position for the NaN/inf error message.

    Returns:
        The detached scalar loss.

    Raises:
        NonFiniteLossError: The loss is NaN/inf (checked before any backward).
    """
    if len(micro_batches) == 1:
        batch = micro_batches[0]
        images, texts, scale = encode_pairs(model, batch, sketch_weight)
        loss = loss_fn(images, texts, scale, batch.get("pair_ids"))
        check_finite(loss, where)
        accelerator.backward(loss)
        return loss.detach()
    return _cached_forward_backward(model, micro_batches, loss_fn, accelerator, sketch_weight, where)


def _cached_forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    accelerator: Any,
    sketch_weight: float | None,
    where: str,
) -> torch.Tensor:
    device = accelerator.device
    states, images, texts = [], [], []
    # pass 1: embeddings of every micro-batch, no graph kept
    with torch.no_grad():
        for batch in micro_batches:
            states.append(RngState.capture(device))
            image_embeds, text_embeds, scale = encode_pairs(model, batch, sketch_weight)
            images.append(image_embeds)
            texts.append(text_embeds)
    after_pass_1 = RngState.capture(device)
    # pass 2: the loss on the full set; leaves so that backward stops at the embeddings and the scale
    image_cache = torch.cat(images).detach().requires_grad_()
    text_cache = torch.cat(texts).detach().requires_grad_()
    scale_cache = scale.detach().requires_grad_()
    pair_ids = [b.get("pair_ids") for b in micro_batches]
    pair_ids = torch.cat(pair_ids) if all(p is not None for p in pair_ids) else None
    loss = loss_fn(image_cache, text_cache, scale_cache, pair_ids)
    check_finite(loss, where)
    # fp16: this scales the loss, so the cached gradients carry the loss scale and pass 3 must not
    # scale again (it calls plain `backward`)
    accelerator.backward(loss)
    image_grad, text_grad, scale_grad = image_cache.grad, text_cache.grad, scale_cache.grad
    # pass 3: re-encode with a graph, replaying dropout, and push the cached gradient through
    offset, last = 0, len(micro_batches) - 1
    for i, (batch, state) in enumerate(zip(micro_batches, states)):
        state.restore(device)
        sync = contextlib.nullcontext() if i == last else accelerator.no_sync(model)
        with sync:
            image_embeds, text_embeds, scale = encode_pairs(model, batch, sketch_weight)
            n = image_embeds.shape[0]
            surrogate = (image_embeds.float() * image_grad[offset : offset + n]).sum()
            surrogate = surrogate + (text_embeds.float() * text_grad[offset : offset + n]).sum()
            if i == last and scale_grad is not None and scale.requires_grad:
                surrogate = surrogate + (scale.float() * scale_grad).sum()  # the scale's gradient, once
            surrogate.backward()
        offset += n
    after_pass_1.restore(device)
    return loss.detach()
