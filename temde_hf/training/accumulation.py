"""One optimizer step's forward and backward, with gradient accumulation that keeps every negative.

Plain accumulation (loss per micro-batch, gradients summed) shrinks a contrastive loss's negatives to
one micro-batch. Here the loss always sees the whole step's pairs (and, with global negatives, every
process's), in three passes ("gradient caching"):

1. encode every micro-batch without autograd and cache the embeddings;
2. compute the loss on the cached set and its gradient w.r.t. the cached embeddings (and the
   parameters the loss itself uses, e.g. ``logit_scale``);
3. re-encode each micro-batch with autograd and backpropagate its slice of the cached gradient.

By the chain rule the parameter gradients equal those of one big batch; the cost is one extra forward.
Dropout is replayed by restoring each micro-batch's RNG state in pass 3. Towers with batch statistics
(BatchNorm in train mode) would see each micro-batch twice: use them frozen or in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .losses import check_finite

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


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


def encode_pairs(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed a batch of pairs.

    Args:
        model: The `TemdeModel` (not wrapped).
        batch: ``pixel_values`` `(n, 3, h, w)`, ``input_ids`` / ``attention_mask`` `(n, seq_len)`.

    Returns:
        ``(image_embeds, text_embeds)``, each `(n, embed_dim)`.
    """
    image_embeds = model.encode_image(batch["pixel_values"])
    text_embeds = model.encode_text(batch["input_ids"], batch["attention_mask"])
    return image_embeds, text_embeds


def split_micro_batches(batch: dict[str, Any], n_micro: int) -> list[dict[str, Any]]:
    """Split every tensor of `batch` into `n_micro` equal chunks along dim 0 (the last may be smaller)."""
    size = -(-len(batch["input_ids"]) // n_micro)
    n = -(-len(batch["input_ids"]) // size)
    return [
        {k: v[i * size : (i + 1) * size] if torch.is_tensor(v) else v for k, v in batch.items()}
        for i in range(n)
    ]


def forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, Any]],
    loss_fn: LossFn,
    accelerator: Any,
    where: str = "step",
) -> torch.Tensor:
    """Accumulate the gradients of the loss on all `micro_batches` together into ``param.grad``.

    Args:
        model: The `TemdeModel`, in train mode, on `accelerator.device`.
        micro_batches: Batches of this process for one optimizer step (tensors already on the device),
            each with ``pixel_values``, ``input_ids``, ``attention_mask`` and ``pair_ids``.
        loss_fn: ``(image_embeds, text_embeds, pair_ids) -> scalar`` over the concatenated rows (it
            may gather other processes' rows).
        accelerator: `accelerate.Accelerator` (for `autocast` and the fp16-scaled `backward`).
        where: Position for the NaN/inf error message.

    Returns:
        The detached scalar loss.

    Raises:
        NonFiniteLossError: The loss is NaN/inf (checked before any backward).
    """
    if len(micro_batches) == 1:
        batch = micro_batches[0]
        with accelerator.autocast():
            image_embeds, text_embeds = encode_pairs(model, batch)
        loss = loss_fn(image_embeds, text_embeds, batch.get("pair_ids"))
        check_finite(loss, where)
        accelerator.backward(loss)
        return loss.detach()
    return _cached_forward_backward(model, micro_batches, loss_fn, accelerator, where)


def _cached_forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, Any]],
    loss_fn: LossFn,
    accelerator: Any,
    where: str,
) -> torch.Tensor:
    device = accelerator.device
    states, images, texts = [], [], []
    # pass 1: embeddings of every micro-batch, no graph kept
    with torch.no_grad():
        for batch in micro_batches:
            states.append(RngState.capture(device))
            with accelerator.autocast():
                image_embeds, text_embeds = encode_pairs(model, batch)
            images.append(image_embeds)
            texts.append(text_embeds)
    after_pass_1 = RngState.capture(device)
    # pass 2: the loss on the full set; leaves so that backward stops at the embeddings
    image_cache = torch.cat(images).detach().requires_grad_()
    text_cache = torch.cat(texts).detach().requires_grad_()
    pair_ids = [b.get("pair_ids") for b in micro_batches]
    pair_ids = torch.cat(pair_ids) if all(p is not None for p in pair_ids) else None
    loss = loss_fn(image_cache, text_cache, pair_ids)
    check_finite(loss, where)
    # fp16: scales the loss, so the cached gradients (and logit_scale's) carry the loss scale and
    # pass 3 must not scale again
    accelerator.backward(loss)
    image_grad, text_grad = image_cache.grad, text_cache.grad
    # pass 3: re-encode with a graph, replaying dropout, and push the cached gradient through
    offset = 0
    for batch, state in zip(micro_batches, states):
        state.restore(device)
        with accelerator.autocast():
            image_embeds, text_embeds = encode_pairs(model, batch)
        n = image_embeds.shape[0]
        surrogate = (image_embeds.float() * image_grad[offset : offset + n]).sum()
        surrogate = surrogate + (text_embeds.float() * text_grad[offset : offset + n]).sum()
        surrogate.backward()
        offset += n
    after_pass_1.restore(device)
    return loss.detach()
