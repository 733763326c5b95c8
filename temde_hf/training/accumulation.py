"""One optimizer step's forward and backward, with gradient accumulation that keeps every negative.

Plain accumulation (loss per micro-batch, gradients summed) shrinks a contrastive loss's negatives to
one micro-batch. Here the loss always sees the whole step's pairs (and, with global negatives, every
process's), in three passes ("gradient caching"):

1. encode every micro-batch without autograd and cache the embeddings (and the logit scale);
2. compute the loss on the cached set and its gradient w.r.t. the cached embeddings and scale;
3. re-encode each micro-batch with autograd and backpropagate its slice of the cached gradient (the
   scale's gradient once, with the last micro-batch).

By the chain rule the parameter gradients equal those of one big batch; the cost is one extra forward.
Objectives on the joint-space tokens (`objectives`) cache the tokens too; a matching head that trains
is run in pass 2 with its parameters held constant (gradients reach its inputs only) and again in pass
3, inside the last micro-batch's wrapped forward, where the cached gradient of its logits trains it.
Every forward goes through the model `accelerator.prepare` returned (a DDP wrapper under several
processes: calling the inner module would silently skip the gradient all-reduce), and every micro-batch
but the last runs inside `accelerator.no_sync`, so gradients are all-reduced once per step. Dropout is
replayed by restoring each micro-batch's RNG state in pass 3. Towers with batch statistics (BatchNorm in
train mode) would see each micro-batch twice: keep them in eval mode (``--freeze_batch_norm``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import model_inputs
from .losses import check_finite
from .objectives import (
    ContrastiveObjective,
    Encoded,
    HeadFn,
    LossFn,
    TrainingObjective,
    as_objective,
    pad_tokens,
)


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


def encode_batch(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    sketch_weight: float | None = None,
    tokens: bool = False,
    **model_kwargs: Any,
) -> tuple[Encoded, Any]:
    """The training forward through the prepared model: the pairs' `Encoded` quantities and the output.

    Args:
        model: The prepared model (DDP wrapper or the model itself).
        batch: A training batch (raw or cached inputs, see `temde_hf.training.batches`).
        sketch_weight: λ of the `concat` fusion for this step (the sketch warm-up passes 0).
        tokens: Also return the joint-space tokens and masks (objectives beyond the contrastive loss).
        **model_kwargs: More forward arguments (the matching head's `pair_*` tokens).
    """
    out = model(**model_inputs(batch), sketch_weight=sketch_weight, **model_kwargs)
    enc = Encoded(out.image_embeds, out.text_embeds, out.logit_scale)
    if tokens:
        vision, text = out.vision_model_output, out.text_model_output
        enc.image_tokens, enc.image_mask = vision.token_embeds, vision.token_mask
        enc.text_tokens, enc.text_mask = text.token_embeds, text.token_mask
    return enc, out


def matching_head(model: nn.Module, accelerator: Any, keep_parameters_out: bool) -> HeadFn | None:
    """The model's matching head as a function (``None`` for a model without one).

    With `keep_parameters_out` its parameters enter as constants: gradients reach the head's inputs
    but never its own ``.grad`` (gradient caching trains the head in pass 3, through the wrapped forward).
    """
    inner = accelerator.unwrap_model(model)
    head = getattr(inner, "itm_head", None)
    if head is None or not keep_parameters_out:
        return None if head is None else inner.get_matching_logits
    if "FSDP" in str(getattr(accelerator, "distributed_type", "")):
        # its parameters are shards there: a constant copy is not the head (verified only under DDP)
        raise ValueError("--itm_weight is not supported with FSDP; train the matching head under DDP")
    constants = {name: param.detach() for name, param in head.named_parameters()}
    return lambda *inputs: torch.func.functional_call(head, constants, inputs)


def forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn: LossFn | TrainingObjective | ContrastiveObjective,
    accelerator: Any,
    *,
    sketch_weight: float | None = None,
    where: str = "step",
) -> torch.Tensor:
    """Accumulate the gradients of the loss on all `micro_batches` together into ``param.grad``.

    Args:
        model: The prepared model, in train mode, on `accelerator.device`.
        micro_batches: This process's batches for one optimizer step (tensors already on the device).
        loss_fn: The loss over the concatenated rows (it may gather other processes' rows): a contrastive
            `LossFn` or an objective of `temde_hf.training.objectives`.
        accelerator: `accelerate.Accelerator` (fp16 loss scaling in `backward`, `no_sync`).
        sketch_weight: λ for this step (``None``: the config's).
        where: Position for the NaN/inf error message.

    Returns:
        The detached scalar loss (the global objective).

    Raises:
        NonFiniteLossError: The loss is NaN/inf (checked before any backward).
    """
    objective = as_objective(loss_fn)
    # A head that trains must run inside the wrapped forward (DDP syncs only what a forward used), after
    # the pairs it scores are known: that is pass 3 of the cached path, even for one micro-batch.
    if len(micro_batches) == 1 and not objective.head_gradients:
        batch = micro_batches[0]
        enc, _ = encode_batch(model, batch, sketch_weight, objective.needs_tokens)
        # a head here is only a teacher (no gradient), so calling it outside the wrapper is safe
        result = objective(enc, batch.get("pair_ids"), matching_head(model, accelerator, False))
        check_finite(result.value, where)
        accelerator.backward(result.loss)
        return result.value.detach()
    return _cached_forward_backward(model, micro_batches, objective, accelerator, sketch_weight, where)


def accumulate_gradients(
    model: nn.Module,
    contrastive_batches: list[list[dict[str, torch.Tensor]]],
    loss_fn: LossFn | TrainingObjective | ContrastiveObjective,
    accelerator: Any,
    *,
    sketch_weight: float | None = None,
    where: str = "step",
) -> torch.Tensor:
    """One optimizer step's gradients: gradient accumulation (as in transformers) over contrastive batches.

    Each contrastive batch is one loss (`forward_backward`, gradient-cached over its micro-batches); the
    step's gradient is the mean of theirs, as one loss divided by their number would give. Gradients are
    all-reduced once, in the last batch (the others run inside `accelerator.no_sync`).

    Args:
        model: The prepared model, in train mode, on `accelerator.device`.
        contrastive_batches: The step's contrastive batches, each a list of micro-batches
            (`steps.BatchPlan.split`).
        loss_fn: The objective of every contrastive batch.
        accelerator: `accelerate.Accelerator`.
        sketch_weight: λ for this step (``None``: the config's).
        where: Position for the NaN/inf error message.

    Returns:
        The detached mean loss of the contrastive batches.
    """
    losses, last = [], len(contrastive_batches) - 1
    for i, micro_batches in enumerate(contrastive_batches):
        with contextlib.nullcontext() if i == last else accelerator.no_sync(model):
            losses.append(
                forward_backward(
                    model, micro_batches, loss_fn, accelerator, sketch_weight=sketch_weight, where=where
                )
            )
    if len(contrastive_batches) > 1:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.div_(len(contrastive_batches))
    return torch.stack(losses).mean()


def _leaf(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors).detach().requires_grad_()


def _cached_forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    objective: TrainingObjective | ContrastiveObjective,
    accelerator: Any,
    sketch_weight: float | None,
    where: str,
) -> torch.Tensor:
    device, tokens = accelerator.device, objective.needs_tokens
    states, encs = [], []
    # pass 1: embeddings (and tokens) of every micro-batch, no graph kept
    with torch.no_grad():
        for batch in micro_batches:
            states.append(RngState.capture(device))
            encs.append(encode_batch(model, batch, sketch_weight, tokens)[0])
    after_pass_1 = RngState.capture(device)
    # pass 2: the loss on the full set; leaves so that backward stops at the cached outputs
    cache = Encoded(
        _leaf([e.image_embeds for e in encs]), _leaf([e.text_embeds for e in encs]),
        encs[-1].logit_scale.detach().requires_grad_(),
    )  # fmt: skip
    if tokens:
        # captions of different micro-batches have different lengths: pad to the longest
        length = max(e.text_tokens.shape[1] for e in encs)
        padded = [pad_tokens(e.text_tokens, e.text_mask, length) for e in encs]
        cache.image_tokens = _leaf([e.image_tokens for e in encs])
        cache.image_mask = torch.cat([e.image_mask for e in encs])
        cache.text_tokens = _leaf([t for t, _ in padded])
        cache.text_mask = torch.cat([m for _, m in padded])
    pair_ids = [b.get("pair_ids") for b in micro_batches]
    pair_ids = torch.cat(pair_ids) if all(p is not None for p in pair_ids) else None
    result = objective(cache, pair_ids, matching_head(model, accelerator, keep_parameters_out=True))
    check_finite(result.value, where)
    if result.head_logits is not None:
        result.head_logits.retain_grad()
    # fp16: this scales the loss, so the cached gradients carry the loss scale and pass 3 must not
    # scale again (it calls plain `backward`)
    accelerator.backward(result.loss)
    # pass 3: re-encode with a graph, replaying dropout, and push the cached gradients through
    offset, last = 0, len(micro_batches) - 1
    for i, (batch, state) in enumerate(zip(micro_batches, states)):
        state.restore(device)
        sync = contextlib.nullcontext() if i == last else accelerator.no_sync(model)
        head_pairs = result.head_pairs if i == last and result.head_logits is not None else None
        with sync:
            extra = head_pairs.model_kwargs() if head_pairs is not None else {}
            enc, out = encode_batch(model, batch, sketch_weight, tokens, **extra)
            n = enc.image_embeds.shape[0]
            rows = slice(offset, offset + n)
            surrogate = (enc.image_embeds.float() * cache.image_embeds.grad[rows]).sum()
            surrogate = surrogate + (enc.text_embeds.float() * cache.text_embeds.grad[rows]).sum()
            if tokens:
                surrogate = surrogate + _dot(enc.image_tokens, cache.image_tokens.grad, rows)
                surrogate = surrogate + _dot(enc.text_tokens, cache.text_tokens.grad, rows)
            scale_grad = cache.logit_scale.grad
            if i == last and scale_grad is not None and enc.logit_scale.requires_grad:
                surrogate = (
                    surrogate + (enc.logit_scale.float() * scale_grad).sum()
                )  # the scale's gradient, once
            if head_pairs is not None:  # the matching head's parameters, through the wrapped forward
                surrogate = surrogate + (out.itm_logits.float() * result.head_logits.grad).sum()
            surrogate.backward()
        offset += n
    after_pass_1.restore(device)
    return result.value.detach()


def _dot(tokens: torch.Tensor, grad: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """`<tokens, grad[rows]>` over this micro-batch's tokens (`grad` may be padded longer); 0 without one
    (e.g. the matching head trained on detached tokens is the only token objective)."""
    if grad is None:
        return tokens.new_zeros(())
    return (tokens.float() * grad[rows, : tokens.shape[1]]).sum()
