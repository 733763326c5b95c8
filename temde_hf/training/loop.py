"""The training loop: steps, schedule, logging, evaluation, checkpoints, resume.

Distributed training runs one process per device (``accelerate launch``). The model is *not* wrapped
in DDP: the loss gathers every process's embeddings with gradients, gradient caching runs extra
forwards outside the loss graph, and the loss uses parameters (``logit_scale``) outside the towers'
forward; DDP's per-forward reducer fits none of these. Gradients are instead averaged over processes
once per step (`sync_gradients`, one all-reduce, the same arithmetic as DDP).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..evaluation.encode import encode_dataset
from ..evaluation.metrics import retrieval_metrics
from .accumulation import forward_backward, split_micro_batches
from .arguments import DataArguments, TemdeTrainingArguments
from .batches import EpochBatchSampler, PairCollator, epoch_loader
from .checkpointing import TrainerState, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from .losses import NonFiniteLossError, contrastive_loss, sync_gradients, world_size
from .optim import build_optimizer, build_scheduler, train_mode

logger = logging.getLogger("temde_hf.training")


@dataclass
class TrainingJob:
    """Everything one run needs; built by `train.main` (or a test)."""

    model: nn.Module
    processor: Any
    accelerator: Any
    args: TemdeTrainingArguments
    data_args: DataArguments
    train_pairs: Dataset
    eval_dataset: datasets.Dataset | None = None


def broadcast_model(model: nn.Module) -> None:
    """Copy process 0's parameters and buffers to every process (identical start, shared sketch init)."""
    if world_size() == 1:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def initialize_sketch(job: TrainingJob, global_batch: int, n_batches: int, max_tokens: int = 2**16) -> None:
    """The sketch's data-dependent (DLSH median) init from the first `n_batches` global batches.

    Every process reads the same global batches (epoch 0's order), so the init does not depend on
    the number of processes; at most `max_tokens` tokens are kept (a random subset), which bounds
    memory. A dedicated generator leaves the global RNG (and hence the run's dropout) untouched.
    """
    model, device = job.model, job.accelerator.device
    generator = torch.Generator().manual_seed(job.args.seed)
    sampler = EpochBatchSampler(len(job.train_pairs), global_batch, seed=job.args.seed, epoch=0)
    loader = epoch_loader(
        job.train_pairs, PairCollator(job.processor, job.data_args.max_text_length), sampler
    )
    per_batch = max_tokens // max(1, n_batches)
    tokens = []
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        with job.accelerator.autocast():
            image_tokens, image_mask = model.get_image_tokens(batch["pixel_values"].to(device))
            text_tokens, text_mask = model.get_text_tokens(
                batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )
        valid = torch.cat([image_tokens[image_mask.bool()], text_tokens[text_mask.bool()]]).float()
        keep = torch.randperm(valid.shape[0], generator=generator)[:per_batch]
        tokens.append(valid[keep.to(valid.device)])
    model.initialize_sketch(torch.cat(tokens), generator=generator)


def evaluate(job: TrainingJob) -> dict[str, float]:
    """Retrieval metrics (R@K both ways, RSUM, ranks) of the current model on the eval split."""
    if job.eval_dataset is None:
        return {}
    image_embeds, text_embeds, caption_to_image = encode_dataset(
        job.model,
        job.processor,
        job.eval_dataset,
        batch_size=job.args.per_device_eval_batch_size,
        device=str(job.accelerator.device),
        max_length=job.data_args.max_text_length,
    )
    metrics = retrieval_metrics(
        caption_to_image=caption_to_image, image_embeds=image_embeds, text_embeds=text_embeds
    )
    return {f"eval_{k}": v for k, v in metrics.items()}


def _max_violation(job: TrainingJob, step: int, steps_per_epoch: int) -> bool | None:
    """VSE∞: all negatives (``False``) during the warm-up epochs, then the config's setting."""
    if job.model.config.loss_type != "vse_hinge" or job.args.vse_warmup_epochs <= 0:
        return None
    return None if step / steps_per_epoch >= job.args.vse_warmup_epochs else False


def _optimizer_step(
    job: TrainingJob,
    optimizer: Any,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    state: TrainerState,
    spe: int,
) -> dict[str, float]:
    model, args, accelerator = job.model, job.args, job.accelerator
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    loss_fn = partial(_loss_for, model, args.negatives, _max_violation(job, state.global_step, spe))
    where = f"step {state.global_step + 1} (epoch {state.epoch})"
    micro = split_micro_batches(batch, args.gradient_accumulation_steps)
    loss = forward_backward(model, micro, loss_fn, accelerator, where=where)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sync_gradients(trainable)
    # the heads' LR (towers run at a multiple of it)
    lrs = dict(zip((g["name"] for g in optimizer.param_groups), scheduler.get_last_lr()))
    logs = {
        "loss": float(loss),
        "lr": next((v for k, v in lrs.items() if k.startswith("head")), max(lrs.values())),
    }
    if args.max_grad_norm > 0:
        logs["grad_norm"] = float(accelerator.clip_grad_norm_(trainable, args.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP's clamp: exp(logit_scale) <= max_logit_scale
        model.logit_scale.clamp_(max=math.log(args.max_logit_scale))
    logs["logit_scale"] = float(model.logit_scale.detach().exp())
    return logs


def _loss_for(
    model: nn.Module,
    negatives: str,
    max_violation: bool | None,
    images: torch.Tensor,
    texts: torch.Tensor,
    ids: Any,
) -> torch.Tensor:
    return contrastive_loss(model, images, texts, ids, negatives=negatives, max_violation=max_violation)


def _total_steps(args: TemdeTrainingArguments, steps_per_epoch: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


def _save_best(job: TrainingJob, state: TrainerState, metrics: dict[str, float]) -> None:
    key = f"eval_{job.args.metric_for_best_model}"
    if key not in metrics:
        raise ValueError(
            f"--metric_for_best_model {job.args.metric_for_best_model!r} is not in {sorted(metrics)}"
        )
    if state.best_metric is not None and metrics[key] <= state.best_metric:
        return
    state.best_metric, state.best_step = metrics[key], state.global_step
    if job.accelerator.is_main_process:
        best = Path(job.args.output_dir) / "best"
        job.model.save_pretrained(best)
        job.processor.save_pretrained(best)


def _evaluate_and_track(job: TrainingJob, state: TrainerState) -> dict[str, float]:
    """Evaluate on the main process, share the metrics, track the best model, log."""
    metrics = evaluate(job) if job.accelerator.is_main_process else {}
    if world_size() > 1:  # every process keeps the same trainer state (best metric, history)
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    if metrics:
        _save_best(job, state, metrics)
        state.log_history.append({"step": state.global_step, "epoch": state.epoch, **metrics})
        job.accelerator.log(metrics, step=state.global_step)
    job.accelerator.wait_for_everyone()
    train_mode(job.model, job.args.freeze_vision_tower, job.args.freeze_text_tower)
    return metrics


def _start(job: TrainingJob, global_batch: int) -> TrainerState:
    """Resume from a checkpoint, or initialise the sketch for a fresh run."""
    resume = resolve_resume(job.args.output_dir, job.args.resume)
    if resume is not None:
        state = load_checkpoint(job.accelerator, job.model, resume)
        logger.info("resumed from %s at step %d", resume, state.global_step)
        return state
    sketch = getattr(job.model, "sketch", None)
    if sketch is not None and job.args.sketch_init_batches > 0 and not bool(sketch.initialized):
        initialize_sketch(job, global_batch, job.args.sketch_init_batches)
    broadcast_model(job.model)
    return TrainerState(sketch_initialized=sketch is not None and bool(sketch.initialized))


def _after_step(
    job: TrainingJob, state: TrainerState, logs: dict[str, float], spe: int, stop_at: int, bar: Any
) -> tuple[bool, dict[str, float] | None]:
    """Advance the counters, log, evaluate and checkpoint as scheduled; return (finished, metrics)."""
    args, accelerator = job.args, job.accelerator
    state.global_step += 1
    state.batches_in_epoch += 1
    epoch_end = state.batches_in_epoch == spe
    if epoch_end:
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    bar.update(1)
    bar.set_postfix(loss=f"{logs['loss']:.4f}")
    if state.global_step % args.logging_steps == 0 or state.global_step == stop_at:
        state.log_history.append({"step": state.global_step, "epoch": state.epoch, **logs})
        accelerator.log(logs, step=state.global_step)
    finished = state.global_step >= stop_at
    metrics = None
    eval_now = state.global_step % args.eval_steps == 0 if args.eval_steps > 0 else epoch_end
    if job.eval_dataset is not None and (eval_now or state.global_step == state.total_steps):
        metrics = _evaluate_and_track(job, state)
    if (args.save_steps > 0 and state.global_step % args.save_steps == 0) or finished:
        save_checkpoint(accelerator, job.model, state, args.output_dir, args.save_total_limit)
    return finished, metrics


def run_training(job: TrainingJob) -> tuple[TrainerState, dict[str, float]]:
    """Train until `max_steps` / `num_train_epochs` (or `stop_after_steps`); returns the state and last eval.

    Raises:
        NonFiniteLossError: The loss became NaN/inf; the message names the last good checkpoint.
    """
    args, accelerator, model = job.args, job.accelerator, job.model
    rank, n_proc = accelerator.process_index, accelerator.num_processes
    step_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    probe = EpochBatchSampler(len(job.train_pairs), step_batch, rank, n_proc, args.seed)
    spe = probe.steps_per_epoch
    total = _total_steps(args, spe)
    raw_optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(raw_optimizer, args, total, spe)
    optimizer = accelerator.prepare(raw_optimizer)
    accelerator.register_for_checkpointing(scheduler)
    state = _start(job, step_batch * n_proc)
    state.total_steps = total
    collator = PairCollator(job.processor, job.data_args.max_text_length)
    last_eval: dict[str, float] = {}
    stop_at = min(total, args.stop_after_steps) if args.stop_after_steps > 0 else total
    bar = tqdm(
        total=total,
        initial=state.global_step,
        desc="train",
        unit="step",
        disable=args.disable_tqdm or not accelerator.is_local_main_process,
    )
    train_mode(model, args.freeze_vision_tower, args.freeze_text_tower)
    while state.global_step < stop_at:
        sampler = EpochBatchSampler(
            len(job.train_pairs), step_batch, rank, n_proc, args.seed, state.epoch, state.batches_in_epoch
        )
        for batch in epoch_loader(job.train_pairs, collator, sampler, job.data_args.dataloader_num_workers):
            try:
                logs = _optimizer_step(job, optimizer, scheduler, batch, state, spe)
            except NonFiniteLossError as error:
                last = list_checkpoints(args.output_dir)
                raise NonFiniteLossError(
                    f"{error}. Last good checkpoint: {last[-1] if last else 'none (no checkpoint saved yet)'}"
                ) from None
            finished, evaluated = _after_step(job, state, logs, spe, stop_at, bar)
            last_eval = evaluated if evaluated is not None else last_eval
            if finished:
                break
    bar.close()
    return state, last_eval
