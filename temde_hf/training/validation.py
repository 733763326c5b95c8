"""In-training evaluation: every process embeds its share of the eval set, the shares are gathered, and
every process scores the same metrics (no broadcast; a sharded FSDP model needs every rank anyway)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..evaluation.metrics import retrieval_metrics
from .batches import ImageInputs, TextInputs, model_inputs


@dataclass
class EvalSet:
    """The evaluation split as model inputs.

    Attributes:
        images: Image rows -> inputs (raw or cached).
        texts: Caption indices -> inputs (raw or cached).
        caption_to_image: `(n_captions,)` the image row of every caption.
    """

    images: ImageInputs
    texts: TextInputs
    caption_to_image: torch.Tensor


@torch.no_grad()
def _embed(
    model: nn.Module,
    accelerator: Any,
    make_inputs: Callable[[Sequence[int]], dict[str, torch.Tensor]],
    n: int,
    batch_size: int,
    key: str,
    sketch_weight: float | None,
) -> torch.Tensor:
    """`(n, E)` embeddings, each process encoding one contiguous block of the `n` items."""
    with accelerator.split_between_processes(list(range(n)), apply_padding=True) as mine:
        parts = []
        for start in range(0, len(mine), batch_size):
            inputs = make_inputs(mine[start : start + batch_size])
            inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
            out = model(**model_inputs(inputs), sketch_weight=sketch_weight)
            parts.append(getattr(out, key).float())
    # padding repeats the last item so every process sends the same number of rows; blocks are in rank order
    return accelerator.gather(torch.cat(parts))[:n].cpu()


def evaluate(
    model: nn.Module,
    accelerator: Any,
    eval_set: EvalSet,
    batch_size: int,
    sketch_weight: float | None = None,
) -> dict[str, float]:
    """Retrieval metrics (R@K both ways, RSUM, ranks) of the current model; collective (call on every rank).

    Leaves the model in eval mode (the loop restores its own train mode, frozen parts included).

    Returns:
        ``eval_*`` metrics, the same on every process.
    """
    model.eval()
    image_embeds = _embed(
        model, accelerator, eval_set.images, len(eval_set.images), batch_size, "image_embeds", sketch_weight
    )
    text_embeds = _embed(
        model, accelerator, eval_set.texts, len(eval_set.texts), batch_size, "text_embeds", sketch_weight
    )
    metrics = {
        f"eval_{k}": v
        for k, v in retrieval_metrics(
            caption_to_image=eval_set.caption_to_image, image_embeds=image_embeds, text_embeds=text_embeds
        ).items()
    }
    config = getattr(accelerator.unwrap_model(model), "config", None)
    if getattr(config, "sketch_fusion", None) == "concat":
        # `[ê ; sqrt(λ/N)·Ŝ]`: score each part alone too, to see what the sketch adds inside this model
        d = config.projection_dim
        for name, part in (("global", slice(0, d)), ("sketch", slice(d, None))):
            rsum = retrieval_metrics(
                caption_to_image=eval_set.caption_to_image,
                image_embeds=image_embeds[:, part],
                text_embeds=text_embeds[:, part],
            )["rsum"]
            metrics[f"eval_{name}_part_rsum"] = rsum
    return metrics
