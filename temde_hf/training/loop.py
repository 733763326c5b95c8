"""The training loop on accelerate's engine: steps, schedule, logging, evaluation, checkpoints, resume.

The model, optimizer and LR scheduler go through `accelerator.prepare` (DDP across processes, the
model as it is on one); every training and evaluation forward goes through the prepared model. The loss
gathers every process's embeddings with gradients (`losses.gather_with_grad`), so with DDP's gradient
averaging each step's gradient equals that of one process on the whole global batch. Checkpoints are
`accelerator.save_state` folders (`checkpointing`); the final model is exported from
`accelerator.get_state_dict`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluation.metrics import NonFiniteScoresError
from .accumulation import forward_backward
from .arguments import DataArguments, TemdeTrainingArguments, data_order_settings
from .batches import EpochBatchSampler, PairCollator, index_loader, split_micro_batches
from .checkpointing import (
    TrainerState,
    check_resume,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from .initialization import freeze_unused_parameters, initialize_sketch, initialize_sketch_from_batches
from .losses import NonFiniteLossError, contrastive_loss
from .objectives import build_objective
from .optim import build_optimizer, build_scheduler, train_mode
from .streaming import load_stream_state
from .validation import EvalSet, evaluate

logger = logging.getLogger("temde_hf.training")
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper holds the model under this name


@dataclass
class TrainingJob:
    """Everything one run needs; built by `train.main` (or a test).

    Attributes:
        model: The unwrapped `TemdeModel` on `accelerator.device`, towers already frozen as configured.
        processor: Its processor (saved with the final model).
        accelerator: The run's `Accelerator`.
        args: Training settings.
        data_args: Data settings.
        collator: Builds training batches from pair indices (raw or cached inputs).
        caption_to_image: `(n_pairs,)` the image row of every training pair (drives the sampler).
        eval_set: The evaluation split, or ``None``.
        stream: A streaming run's batches (`streaming.StreamBatches`; then `collator` and
            `caption_to_image` are ``None``), or ``None``.
        prepared: Filled by `run_training`: the prepared model (DDP wrapper under several processes).
    """

    model: nn.Module
    processor: Any
    accelerator: Any
    args: TemdeTrainingArguments
    data_args: DataArguments
    collator: PairCollator | None
    caption_to_image: torch.Tensor | None
    eval_set: EvalSet | None = None
    stream: Any = None
    prepared: nn.Module | None = field(default=None, repr=False)


def _sampler(job: TrainingJob, epoch: int = 0, skip: int = 0) -> EpochBatchSampler:
    args, accelerator = job.args, job.accelerator
    return EpochBatchSampler(
        job.caption_to_image,
        args.per_device_train_batch_size
        * args.gradient_cache_micro_batches
        * args.gradient_accumulation_steps,
        accelerator.process_index,
        accelerator.num_processes,
        args.seed,
        epoch,
        skip,
        args.sampling,
        2 if args.image_flip_augmentation else 1,
    )


def _objective(job: TrainingJob, step: int, max_violation: bool | None = None, negatives: str | None = None):
    """The step's objective: the contrastive loss, plus the alignment / matching / distillation terms."""
    aggregation = getattr(job.model.config, "alignment_aggregation", "max_mean")
    return build_objective(
        job.args,
        aggregation,
        step,
        max_violation=max_violation,
        negatives=negatives,
        contrastive=contrastive_loss,
    )


def _total_steps(args: TemdeTrainingArguments, steps_per_epoch: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


def _sketch_warmup_steps(job: TrainingJob, steps_per_epoch: int) -> int:
    steps = round(job.args.sketch_warmup_epochs * steps_per_epoch)
    if steps and (getattr(job.model, "sketch", None) is None or job.model.config.sketch_fusion != "concat"):
        raise ValueError(
            "--sketch_warmup_epochs needs sketch_fusion='concat' (the other fusions have no λ to switch)"
        )
    return steps


def _step_settings(job: TrainingJob, step: int, spe: int, warmup: int) -> tuple[float | None, bool | None]:
    """`(sketch_weight, max_violation)` for `step`: λ = 0 in the sketch warm-up, VSE∞'s all-negatives epochs."""
    sketch_weight = 0.0 if step < warmup else None
    max_violation = None
    if job.args.loss_type == "vse_hinge" and spe and step / spe < job.args.vse_warmup_epochs:
        max_violation = False
    return sketch_weight, max_violation


def _optimizer_step(
    job: TrainingJob, optimizer: Any, scheduler: Any, batch: dict[str, torch.Tensor], state: TrainerState,
    spe: int, warmup: int,
) -> dict[str, float]:  # fmt: skip
    args, accelerator = job.args, job.accelerator
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    sketch_weight, max_violation = _step_settings(job, state.global_step, spe, warmup)
    where = f"step {state.global_step + 1} (epoch {state.epoch})"
    # gradient accumulation (as in transformers): N contrastive batches, gradients summed, then averaged;
    # each of them gradient-cached over its micro-batches. Gradients are all-reduced once, in the last one.
    batches = split_micro_batches(batch, args.gradient_accumulation_steps)
    losses = []
    for i, contrastive_batch in enumerate(batches):
        sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(job.prepared)
        with sync:
            losses.append(
                forward_backward(
                    job.prepared,
                    split_micro_batches(contrastive_batch, args.gradient_cache_micro_batches),
                    _objective(job, state.global_step, max_violation),
                    accelerator,
                    sketch_weight=sketch_weight,
                    where=where,
                )
            )
    if len(batches) > 1:  # the mean of the batches' gradients, as one loss divided by N would give
        for param in job.prepared.parameters():
            if param.grad is not None:
                param.grad.div_(len(batches))
    loss = torch.stack(losses).mean()
    lrs = dict(zip((g["name"] for g in optimizer.param_groups), scheduler.get_last_lr()))
    logs = {
        "loss": float(loss),
        "lr": next((v for k, v in lrs.items() if k.startswith("head")), max(lrs.values())),
    }
    if args.max_grad_norm > 0:
        logs["grad_norm"] = float(accelerator.clip_grad_norm_(job.prepared.parameters(), args.max_grad_norm))
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule advance
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP's clamp: exp(logit_scale) <= max_logit_scale
        job.model.logit_scale.clamp_(max=math.log(args.max_logit_scale))
    logs["logit_scale"] = float(job.model.logit_scale.detach().exp())
    return logs


def _save_best(job: TrainingJob, state: TrainerState, metrics: dict[str, float]) -> None:
    key = f"eval_{job.args.metric_for_best_model}"
    if key not in metrics:
        raise ValueError(
            f"--metric_for_best_model {job.args.metric_for_best_model!r} is not in {sorted(metrics)}"
        )
    if state.best_metric is not None and metrics[key] <= state.best_metric:
        return
    state.best_metric, state.best_step = metrics[key], state.global_step
    export_model(job, Path(job.args.output_dir) / "best")


def export_model(job: TrainingJob, folder: Path) -> None:
    """`save_pretrained` of the trained model + processor (collective: the state dict may be sharded)."""
    state_dict = job.accelerator.get_state_dict(job.prepared)
    # under --torch_compile the unwrapped model is still the compiled wrapper, whose names carry a prefix
    state_dict = {k.removeprefix(COMPILED_PREFIX): v for k, v in state_dict.items()}
    if job.accelerator.is_main_process:
        job.model.save_pretrained(folder, state_dict=state_dict)
        job.processor.save_pretrained(folder)
    job.accelerator.wait_for_everyone()


def _evaluate_and_track(job: TrainingJob, state: TrainerState, in_warmup: bool) -> dict[str, float]:
    """Evaluate (every process, sharded), track the best model, log."""
    sketch_weight = 0.0 if in_warmup else None
    try:
        metrics = evaluate(
            job.prepared, job.accelerator, job.eval_set, job.args.per_device_eval_batch_size, sketch_weight
        )
    except NonFiniteScoresError as error:  # every rank scores the gathered embeddings: all raise together
        raise NonFiniteScoresError(
            f"{job.args.output_dir}: the model at step {state.global_step} cannot be evaluated: {error}; it is "
            "not kept as best: resume from an earlier checkpoint (--resume PATH) with a lower --learning_rate"
        ) from error
    if not in_warmup:  # a model with λ = 0 is not the model being trained: never "best"
        _save_best(job, state, metrics)
    state.log_history.append({"step": state.global_step, "epoch": state.epoch, **metrics})
    job.accelerator.log(metrics, step=state.global_step)
    _train_mode(job)
    return metrics


def _after_step(
    job: TrainingJob,
    state: TrainerState,
    logs: dict[str, float],
    spe: int,
    stop_at: int,
    warmup: int,
    bar: Any,
) -> tuple[bool, dict[str, float] | None]:
    """Advance the counters, log, evaluate and checkpoint as scheduled; return (finished, metrics)."""
    args, accelerator = job.args, job.accelerator
    state.global_step += 1
    state.batches_in_epoch += 1
    epoch_end = state.batches_in_epoch == spe  # spe = 0 (a stream): the stream says when an epoch ends
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
    if job.eval_set is not None and (eval_now or state.global_step == state.total_steps):
        metrics = _evaluate_and_track(job, state, in_warmup=state.global_step < warmup)
    if (args.save_steps > 0 and state.global_step % args.save_steps == 0) or finished:
        save_checkpoint(accelerator, state, args.output_dir, args.save_total_limit, stream=job.stream)
    return finished, metrics


def _train_mode(job: TrainingJob) -> None:
    job.prepared.train()  # the wrapper's own flag; then the model's, frozen parts kept in eval mode
    train_mode(job.model, job.args.freeze_batch_norm)


def _prepare(job: TrainingJob, resume: Path | None) -> tuple[Any, Any, TrainerState, int, int]:
    """Initialise (fresh run), prepare model/optimizer/scheduler, restore (resume)."""
    args, accelerator, model = job.args, job.accelerator, job.model
    # a stream has no length (spe = 0): --max_steps is required (`streaming.check_streaming_args`)
    spe = 0 if job.stream is not None else _sampler(job).steps_per_epoch
    total = _total_steps(args, spe)
    sketch = getattr(model, "sketch", None)
    if (
        resume is None
        and sketch is not None
        and args.sketch_init_batches > 0
        and not bool(sketch.initialized)
    ):
        if job.stream is not None:  # this process's first batches; DDP then broadcasts rank 0's sketch
            batches = job.stream.preview(args.sketch_init_batches)
            initialize_sketch_from_batches(model, batches, device=accelerator.device, seed=args.seed)
        else:
            initialize_sketch(
                model,
                job.collator,
                _sampler(job),
                args.sketch_init_batches,
                device=accelerator.device,
                seed=args.seed,
            )
    if job.stream is not None:
        probe = {k: v[:4] for k, v in job.stream.preview(1)[0].items()}
    else:
        probe = job.collator(next(iter(_sampler(job)))[:4])
    freeze_unused_parameters(
        model, {k: v.to(accelerator.device) for k, v in probe.items()}, _objective(job, 0, negatives="local")
    )
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total, spe)
    job.prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = load_checkpoint(accelerator, resume, args.output_dir) if resume is not None else TrainerState()
    if job.stream is not None:
        if resume is not None:
            job.stream.load_state_dict(load_stream_state(resume, accelerator.process_index))
        elif job.stream.key_log is not None:
            job.stream.key_log.unlink(missing_ok=True)  # a new run: not another attempt's keys
    if resume is not None:
        logger.info("resumed from %s at step %d", resume, state.global_step)
    state.total_steps = total
    state.data_order = data_order(job)
    return optimizer, scheduler, state, spe, total


def data_order(job: TrainingJob) -> dict[str, Any]:
    """The settings that define each step's pairs (`arguments.data_order_settings`) and the pairs' count."""
    order = data_order_settings(job.data_args, job.args, job.accelerator.num_processes)
    if job.caption_to_image is None:  # a stream: no fixed pairs to count
        return order
    return {**order, "n_train_pairs": len(job.caption_to_image)}


def run_training(job: TrainingJob) -> tuple[TrainerState, dict[str, float]]:
    """Train until `max_steps` / `num_train_epochs` (or `stop_after_steps`); returns the state and last eval.

    Raises:
        NonFiniteLossError: The loss became NaN/inf; the message names the last good checkpoint.
    """
    args, accelerator = job.args, job.accelerator
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    check_resume(resume, data_order(job))  # the pairs' count too, now that the data is loaded
    optimizer, scheduler, state, spe, total = _prepare(job, resume)
    warmup = _sketch_warmup_steps(job, spe)
    last_eval: dict[str, float] = {}
    stop_at = min(total, args.stop_after_steps) if args.stop_after_steps > 0 else total
    bar = tqdm(
        total=total,
        initial=state.global_step,
        desc="train",
        unit="step",
        disable=args.disable_tqdm or not accelerator.is_local_main_process,
    )
    _train_mode(job)
    while state.global_step < stop_at:
        if job.stream is not None:  # the stream's next batches, to the end of its epoch
            loader = job.stream.epoch_batches(state.global_step)
        else:
            sampler = _sampler(job, state.epoch, state.batches_in_epoch)
            loader = index_loader(
                sampler, job.collator, job.data_args.dataloader_num_workers, args.seed + state.epoch
            )
        for batch in loader:
            if warmup and state.global_step == warmup:
                # λ switches on: draw the partition on the tokens the trained projections now make
                # (the same global batches on every process, so no broadcast is needed)
                initialize_sketch(
                    job.model, job.collator, _sampler(job, state.epoch), max(1, args.sketch_init_batches),
                    device=accelerator.device, seed=args.seed + state.global_step,
                )  # fmt: skip
            try:
                logs = _optimizer_step(job, optimizer, scheduler, batch, state, spe, warmup)
            except NonFiniteLossError as error:
                last = list_checkpoints(args.output_dir)
                raise NonFiniteLossError(
                    f"{error}. Last good checkpoint: {last[-1] if last else 'none (no checkpoint saved yet)'}"
                ) from None
            finished, evaluated = _after_step(job, state, logs, spe, stop_at, warmup, bar)
            last_eval = evaluated if evaluated is not None else last_eval
            if finished:
                break
        if job.stream is not None and state.global_step < stop_at:  # every process's stream ended an epoch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    bar.close()
    if job.stream is not None:
        job.stream.finish()
    return state, last_eval
