"""What happens to the model before `accelerator.prepare`: the sketch's data-dependent initialisation and
freezing of parameters the loss never reaches.

Both run on the unwrapped model, on every process, from the same global batches, so every process ends
with the same weights; DDP's constructor then broadcasts rank 0's parameters anyway.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .accumulation import encode_batch
from .batches import EpochBatchSampler, PairCollator, model_inputs
from .objectives import ContrastiveObjective, LossFn, TrainingObjective, as_objective

logger = logging.getLogger(__name__)


def _global_batches(
    collator: PairCollator, sampler: EpochBatchSampler, n_batches: int
) -> list[dict[str, torch.Tensor]]:
    """The first `n_batches` *global* batches (all processes' rows) of the sampler's epoch order."""
    whole = EpochBatchSampler(
        sampler.caption_to_image,
        sampler.batch_size * sampler.world_size,
        seed=sampler.seed,
        epoch=sampler.epoch,
        sampling=sampler.sampling,
        n_views=sampler.n_views,
    )
    batches = []
    for i, indices in enumerate(whole):
        if i >= n_batches:
            break
        batches.append(collator(indices))
    return batches


@torch.no_grad()
def initialize_sketch(
    model: nn.Module,
    collator: PairCollator,
    sampler: EpochBatchSampler,
    n_batches: int,
    *,
    device: torch.device,
    seed: int,
    max_tokens: int = 2**16,
) -> None:
    """DLSH (median) initialisation of the sketch from the projected tokens of both modalities.

    The tokens come from the first `n_batches` global batches of `sampler`'s epoch (the same on every
    process, whatever their number); at most `max_tokens` are kept (a random subset), which bounds
    memory. The model runs in eval mode and a dedicated generator draws the subset and the hyperplanes,
    so the run's global RNG (dropout) is untouched.
    """
    batches = _global_batches(collator, sampler, n_batches)
    initialize_sketch_from_batches(
        model, batches, device=device, seed=seed, max_tokens=max_tokens, n_batches=n_batches
    )


@torch.no_grad()
def initialize_sketch_from_batches(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    seed: int,
    max_tokens: int = 2**16,
    n_batches: int | None = None,
) -> None:
    """`initialize_sketch` from given batches (a streaming run's first batches), same rules otherwise.

    `n_batches` (default: ``len(batches)``) divides `max_tokens` into each batch's share.
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    per_batch = max_tokens // max(1, len(batches) if n_batches is None else n_batches)
    tokens = []
    for batch in batches:
        inputs = model_inputs({k: v.to(device) for k, v in batch.items()})
        out = model(**inputs)
        for features in (out.vision_model_output, out.text_model_output):
            # the tokens the sketch reads (with extra vision maps, more than `token_embeds`)
            read, mask = features.sketch_token_embeds, features.sketch_token_mask
            if read is None:
                read, mask = features.token_embeds, features.token_mask
            valid = read[mask.bool()].float()  # (M, D)
            keep = torch.randperm(valid.shape[0], generator=generator)[:per_batch]
            tokens.append(valid[keep.to(valid.device)])
    model.initialize_sketch(torch.cat(tokens), generator=generator)
    model.train(was_training)


def freeze_unused_parameters(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: LossFn | TrainingObjective | ContrastiveObjective,
) -> list[str]:
    """Freeze trainable parameters that get no gradient from the loss (e.g. a text tower's pooler under
    mean pooling, ``logit_scale`` under the hinge loss, a matching head that is only a teacher).

    DDP expects every trainable parameter to receive a gradient in each step (otherwise it fails at step 2,
    or needs the slower ``find_unused_parameters``); such parameters would never change anyway. One
    forward/backward on `batch` in eval mode (no dropout, the global RNG untouched) finds them.

    Returns:
        The names of the parameters frozen.
    """
    was_training = model.training
    model.eval()
    objective = as_objective(loss_fn)
    enc, _ = encode_batch(model, batch, tokens=objective.needs_tokens)
    head = getattr(model, "get_matching_logits", None)  # the live head: its parameters get gradients here
    objective(enc, batch.get("pair_ids"), head).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, param in model.named_parameters():
        if name in unused:
            param.requires_grad_(False)
        param.grad = None
    model.train(was_training)
    if unused:
        logger.info("not trained (the loss does not reach them): %s", ", ".join(unused))
    return unused
