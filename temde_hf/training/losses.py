"""The training loss across processes: every process's pairs are negatives of every other's.

No loss formula is defined here: `contrastive_loss` gathers the rows of every process and applies the
loss the settings choose from `LOSSES` (the model folder's `loss_temde`, the one home of the contrastive
losses, shipped with the model because its `forward(return_loss=True)` returns one). What this module
owns is what only a distributed trainer needs: the gathers and the all-reduced non-finite check.

`accelerator.gather` returns tensors without an autograd history, so a loss over gathered embeddings
would train each process only on its own rows. `gather_with_grad` keeps the history: in backward,
each process receives the *sum* over processes of the gradient w.r.t. its own rows. Every process
computes the same global loss, so that sum is `world_size` times the single-process gradient, and the
average of parameter gradients over processes (what DDP does) is exactly the single-process gradient of
the loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.temde.loss_temde import LOSSES


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
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    pair_ids: torch.Tensor | None = None,
    *,
    loss_type: str = "info_nce",
    margin: float = 0.2,
    max_violation: bool = True,
    negatives: str = "global",
) -> torch.Tensor:
    """The training loss over this process's pairs and (``negatives="global"``) all other processes'.

    Args:
        image_embeds: `(n, embed_dim)` this process's image embeddings, row i paired with text row i.
        text_embeds: `(n, embed_dim)`.
        logit_scale: `(1,)` the exponentiated scale, as returned by the model's forward.
        pair_ids: `(n,)` int64 image index of each pair: rows of the same image are not negatives.
        loss_type: A key of `LOSSES` (``"info_nce"`` or ``"vse_hinge"``).
        margin: Hinge margin (``"vse_hinge"``).
        max_violation: Hardest negative only (``"vse_hinge"``); ``False`` sums all negatives.
        negatives: ``"global"`` gathers every process's rows (with gradients) so the loss sees the
            whole batch; ``"local"`` uses this process's rows only (cheaper, fewer negatives).

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
    return LOSSES[loss_type](
        image_embeds.float(),
        text_embeds.float(),
        logit_scale=logit_scale.float(),
        margin=margin,
        max_violation=max_violation,
        pair_ids=pair_ids,
    )


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
