"""The training loss across processes: every process's pairs are negatives of every other's.

`accelerator.gather` returns tensors without an autograd history, so a loss over gathered embeddings
would train each process only on its own rows. `gather_with_grad` keeps the history: in backward,
each process receives the *sum* over processes of the gradient w.r.t. its own rows. Every process
computes the same global loss, so that sum is `world_size` times the single-process gradient, and the
average of parameter gradients over processes (what `sync_gradients` / DDP do) is exactly the
single-process gradient of the loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all processes along dim 0, keeping gradients.

    Args:
        tensor: `(n, ...)`, the same `n` on every process.

    Returns:
        `(world_size * n, ...)`, process 0's rows first; identity with one process.
    """
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each process the summed gradient of its rows."""

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)  # (world_size * rows, ...)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        # gloo has no reduce-scatter: sum everything, keep this process's rows
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (ids, labels) from all processes along dim 0, without gradients."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def contrastive_loss(
    model: nn.Module,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    pair_ids: torch.Tensor | None = None,
    negatives: str = "global",
    max_violation: bool | None = None,
) -> torch.Tensor:
    """The model's loss over this process's pairs and (``negatives="global"``) all other processes'.

    Args:
        model: The unwrapped `TemdeModel` (its `compute_loss` holds the loss and `logit_scale`).
        image_embeds: `(n, embed_dim)` this process's image embeddings, row i paired with text row i.
        text_embeds: `(n, embed_dim)`.
        pair_ids: `(n,)` int64 image index of each pair: rows of the same image are not negatives.
        negatives: ``"global"`` gathers every process's rows (with gradients) so the loss sees the
            whole batch; ``"local"`` uses this process's rows only (cheaper, fewer negatives).
        max_violation: Overrides the config's hinge mode (VSE∞ all-negatives warm-up); ``None`` keeps it.

    Returns:
        Scalar loss; with ``"global"`` the same value on every process.
    """
    if negatives == "global":
        image_embeds = gather_with_grad(image_embeds)
        text_embeds = gather_with_grad(text_embeds)
        pair_ids = gather_no_grad(pair_ids) if pair_ids is not None else None
    elif negatives != "local":
        raise ValueError(f"negatives={negatives!r}; use 'global' or 'local'")
    # the loss in float32 whatever the autocast dtype: log-softmax / hinge over a large batch
    return model.compute_loss(
        image_embeds.float(), text_embeds.float(), max_violation=max_violation, pair_ids=pair_ids
    )


def sync_gradients(parameters: list[nn.Parameter], bucket_numel: int = 2**25) -> None:
    """Average the gradients of `parameters` over processes (what DDP does), in flat buckets.

    Parameters without a gradient on this process count as zeros in the all-reduce, so every process
    sends the same layout, and keep ``grad=None``. No-op with one process.

    Args:
        parameters: The trainable parameters, in the same order on every process.
        bucket_numel: Elements per all-reduce (bounds the extra memory of the flat buffer).
    """
    if world_size() == 1:
        return
    bucket: list[nn.Parameter] = []
    size = 0
    for param in parameters:
        bucket.append(param)
        size += param.numel()
        if size >= bucket_numel:
            _average(bucket)
            bucket, size = [], 0
    if bucket:
        _average(bucket)


def _average(parameters: list[nn.Parameter]) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(parameters, grads):
        numel = g.numel()
        if p.grad is not None:  # a parameter the loss never reached keeps no gradient
            p.grad.copy_(flat[offset : offset + numel].view_as(p))
        offset += numel


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops without stepping or saving."""


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Raise `NonFiniteLossError` on every process if the loss is NaN/inf on any process.

    The flag is all-reduced so that no process is left waiting in a collective when another stops.

    Args:
        loss: Scalar loss.
        where: Position for the message, e.g. ``"step 12 (epoch 0)"``.
    """
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world_size() > 1:
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLossError(
            f"the training loss is {loss.item()} at {where}: stopping without an optimizer step. "
            "Lower --learning_rate, raise --warmup_steps, use --mixed_precision bf16 instead of fp16, "
            "or lower --max_logit_scale; resume from the last good checkpoint with --resume latest"
        )
