"""Optimizer and learning-rate schedule: per-tower LR multipliers, frozen towers, transformers' schedules.

Pretrained towers usually want a smaller LR than the freshly initialised heads (projections, pooling,
sketch, ``logit_scale``); a tower can also be frozen entirely. Parameters are grouped by their
checkpoint name prefix (``vision_model.`` / ``text_model.`` / the rest).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from .arguments import TemdeTrainingArguments

TOWER_PREFIXES = {"vision": "vision_model.", "text": "text_model."}


def tower_blocks(tower: nn.Module) -> nn.ModuleList | None:
    """The tower's stack of layers/blocks: its `nn.ModuleList` holding the most parameters."""
    lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def freeze_towers(model: nn.Module, trainable_layers: dict[str, int | None]) -> None:
    """Turn off gradients of frozen towers or of their lower layers.

    Args:
        model: The `TemdeModel` (unwrapped).
        trainable_layers: Per tower (``"vision"`` / ``"text"``): ``None`` trains it all, ``0`` freezes it,
            ``n > 0`` trains only its last `n` blocks (the layers of its largest `nn.ModuleList`) and the
            modules after them (final norm, head conv, pooler).
    """
    for part, count in trainable_layers.items():
        if count is None:
            continue
        tower = getattr(model, TOWER_PREFIXES[part].rstrip("."))
        tower.requires_grad_(False)
        if count == 0:
            continue
        blocks = tower_blocks(tower)
        if blocks is None:
            raise ValueError(f"--{part}_trainable_layers {count}: the {part} tower has no stack of layers")
        # Parameters are registered in data-flow order, so "the last n blocks and what follows them" is
        # every parameter from the first one of block len - n on.
        first = next(blocks[max(0, len(blocks) - count)].parameters())
        trainable = False
        for param in tower.parameters():
            trainable = trainable or param is first
            param.requires_grad_(trainable)


def frozen_tower_names(model: nn.Module) -> list[str]:
    """``"vision"`` / ``"text"`` for each tower none of whose parameters train."""
    return [
        part
        for part, prefix in TOWER_PREFIXES.items()
        if not any(p.requires_grad for p in getattr(model, prefix.rstrip(".")).parameters())
    ]


def frozen_lower_modules(tower: nn.Module) -> list[nn.Module]:
    """The frozen part below a partly trainable tower's first trainable block (stem, frozen blocks).

    Empty for a tower that trains entirely (its stem trains) or not at all. Modules are registered in data-flow order
    (as `freeze_towers` assumes): these are the ones before that block, other than its ancestors.
    """
    blocks = tower_blocks(tower)
    first = next((b for b in blocks or () if any(p.requires_grad for p in b.parameters())), None)
    if first is None:
        return []
    first_param = next(first.parameters())
    for param in tower.parameters():  # data-flow order: everything below the block must be frozen
        if param is first_param:
            break
        if param.requires_grad:
            return []
    names = {module: name for name, module in tower.named_modules()}
    first_name = names[first]
    lower = []
    for name, module in tower.named_modules():
        if module is first:
            break
        ancestor = name == "" or first_name.startswith(f"{name}.")
        inside = any(name.startswith(f"{names[m]}.") for m in lower)
        if not ancestor and not inside:
            lower.append(module)
    return lower


def train_mode(model: nn.Module, freeze_batch_norm: bool = True) -> None:
    """`model.train()`, but frozen towers, the frozen lower part of partly trained towers, and
    (`freeze_batch_norm`) every BatchNorm stay in eval mode.

    A frozen tower in train mode would still apply dropout and update BatchNorm running statistics
    (EfficientNet-Lite); and gradient caching runs each micro-batch twice, so a BatchNorm in train mode
    would update its statistics twice and normalise pass 1 and pass 3 differently. A partly trained
    tower's frozen lower part is deterministic too, so it gives the outputs its cache holds
    (`temde_hf.training.tower_split`) whether or not the cache is used.
    """
    model.train()
    for part in frozen_tower_names(model):
        getattr(model, TOWER_PREFIXES[part].rstrip(".")).eval()
    for prefix in TOWER_PREFIXES.values():
        for module in frozen_lower_modules(getattr(model, prefix.rstrip("."))):
            module.eval()
    if freeze_batch_norm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _part(name: str) -> str:
    for part, prefix in TOWER_PREFIXES.items():
        if name.startswith(prefix):
            return part
    return "head"


def _decays(name: str, param: nn.Parameter) -> bool:
    # biases, norms, scalars (logit_scale, temperatures) are not weight-decayed
    return param.ndim >= 2 and "norm" not in name.lower()


def build_param_groups(model: nn.Module, args: TemdeTrainingArguments) -> list[dict]:
    """Trainable parameters in groups of (part, decay) with their own LR and weight decay.

    Returns:
        Groups for `torch.optim.AdamW`; each carries ``name`` (e.g. ``"vision/decay"``) for logging.
    """
    lr = {
        "vision": args.learning_rate * args.vision_lr_multiplier,
        "text": args.learning_rate * args.text_lr_multiplier,
        "head": args.learning_rate,
    }
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((_part(name), _decays(name, param)), []).append(param)
    if not groups:
        raise ValueError("no trainable parameters: both towers are frozen and the model has no heads")
    return [
        {
            "name": f"{part}/{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": lr[part],
            "weight_decay": args.weight_decay if decay else 0.0,
        }
        for (part, decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, args: TemdeTrainingArguments) -> torch.optim.Optimizer:
    """AdamW over `build_param_groups`."""
    return torch.optim.AdamW(
        build_param_groups(model, args),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def _step_decay(warmup_steps: int, step_size: int, gamma: float) -> Callable[[int], float]:
    """VSE++'s step decay (transformers has none): warm-up, then x `gamma` every `step_size` steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return gamma ** ((step - warmup_steps) // max(1, step_size))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: TemdeTrainingArguments, total_steps: int, steps_per_epoch: int
) -> LambdaLR:
    """The LR schedule of `args` for a run of `total_steps` optimizer steps.

    Every ``--lr_scheduler_type`` but ``step`` is `transformers.get_scheduler`'s, read one step ahead:
    with warm-up, a transformers schedule's value at step 0 is an LR of 0, a step that trains nothing.
    Here optimizer step ``s`` (0-based) takes the value at ``s + 1`` of the schedule with ``warmup + 1``
    warm-up and ``total_steps + 1`` steps: warm-up step ``s`` runs at ``(s + 1) / (warmup + 1)`` of the LR,
    and the decay after it is transformers' exactly (cosine: ``0.5 (1 + cos(pi (s - warmup) / (total -
    warmup)))``, linear: ``(total - s) / (total - warmup)``) — the schedule this trainer has always had.
    """
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    if args.lr_scheduler_type == "step":
        step_size = args.lr_step_size or steps_per_epoch
        if args.lr_step_epochs > 0:
            step_size = max(1, round(args.lr_step_epochs * steps_per_epoch))
        return LambdaLR(optimizer, _step_decay(warmup, step_size, args.lr_step_gamma))
    schedule = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup + 1,
        num_training_steps=total_steps + 1,
        scheduler_specific_kwargs=scheduler_kwargs(args),
    )
    transformers_factor = schedule.lr_lambdas[0]

    def factor(step: int) -> float:  # a plain function: its scheduler state holds no object to pickle
        return transformers_factor(step + 1)

    return LambdaLR(optimizer, factor)


def scheduler_kwargs(args: TemdeTrainingArguments) -> dict:
    """``--lr_scheduler_kwargs`` (a JSON object, or a mapping from a config file) as a dict."""
    value = args.lr_scheduler_kwargs
    if value is None or isinstance(value, dict):
        return dict(value or {})
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--lr_scheduler_kwargs {value!r} is not a JSON object ({error})") from None
    if not isinstance(parsed, dict):
        raise ValueError(
            f"--lr_scheduler_kwargs {value!r} must be a JSON object, e.g. '{{\"min_lr_rate\": 0.1}}'"
        )
    return parsed
