"""The training loop on accelerate's engine: steps, schedule, logging, evaluation, checkpoints, resume.

The model, optimizer and LR scheduler go through `accelerator.prepare` (DDP across processes, the
model as it is on one); every training and evaluation forward goes through the prepared model. The loss
gathers every process's embeddings with gradients (`losses.gather_with_grad`), so with DDP's gradient
averaging each step's gradient equals that of one process on the whole global batch. Checkpoints are
`accelerator.save_state` folders (`checkpointing`); the final model is exported from
`accelerator.get_state_dict`.

Each step's batch comes from `TrainingData.batches` (a map-style run's `steps.PairBatches`, or a
stream's batches) and is cut by the run's `steps.BatchPlan` into the contrastive batches and
micro-batches that `accumulation.accumulate_gradients` runs: the loop only iterates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluation.metrics import NonFiniteScoresError
from .accumulation import accumulate_gradients
from .arguments import TemdeTrainingArguments
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
from .steps import BatchPlan, PairBatches
from .streaming import StreamBatches, load_stream_state
from .validation import EvalSet, evaluate

logger = logging.getLogger("temde_hf.training")
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper holds the model under this name


@dataclass
class TrainingModel:
    """The model a run trains, and what runs and saves it.

    Attributes:
        model: The unwrapped `TemdeModel` on `accelerator.device`, towers already frozen as configured.
        processor: Its processor (saved with the final model).
        accelerator: The run's `Accelerator`.
        model_wrapped: Filled by `run_training`: the prepared model (DDP wrapper under several processes),
            through which every forward goes.
    """

    model: nn.Module
    processor: Any
    accelerator: Any
    model_wrapped: nn.Module | None = field(default=None, repr=False)

    def train_mode(self, freeze_batch_norm: bool) -> None:
        self.model_wrapped.train()  # the wrapper's own flag; then the model's, frozen parts kept in eval mode
        train_mode(self.model, freeze_batch_norm)

    def export(self, folder: Path) -> None:
        """`save_pretrained` of the trained model + processor (collective: the state dict may be sharded)."""
        state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        # under --torch_compile the unwrapped model is still the compiled wrapper, whose names carry a prefix
        state_dict = {k.removeprefix(COMPILED_PREFIX): v for k, v in state_dict.items()}
        if self.accelerator.is_main_process:
            self.model.save_pretrained(folder, state_dict=state_dict)
            self.processor.save_pretrained(folder)
        self.accelerator.wait_for_everyone()


@dataclass
class TrainingData:
    """What a run trains and evaluates on.

    Attributes:
        plan: How each step's batch is split (and, map-style, drawn).
        batches: The steps' batches: `steps.PairBatches` (map-style) or `streaming.StreamBatches`.
        data_order: The settings that define each step's pairs (`arguments.data_order_settings`, plus the
            training pairs' count map-style): saved with every checkpoint, a resume must match them.
        eval_set: The evaluation split, or ``None``.
    """

    plan: BatchPlan
    batches: PairBatches | StreamBatches
    data_order: dict[str, Any]
    eval_set: EvalSet | None = None

    @property
    def stream(self) -> StreamBatches | None:
        return self.batches if isinstance(self.batches, StreamBatches) else None


def _objective(
    args: TemdeTrainingArguments,
    model: nn.Module,
    step: int,
    max_violation: bool | None = None,
    negatives: str | None = None,
) -> Any:
    """The step's objective: the contrastive loss, plus the alignment / matching / distillation terms."""
    aggregation = getattr(model.config, "alignment_aggregation", "max_mean")
    return build_objective(
        args,
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


def _sketch_warmup_steps(args: TemdeTrainingArguments, model: nn.Module, steps_per_epoch: int) -> int:
    steps = round(args.sketch_warmup_epochs * steps_per_epoch)
    if steps and (getattr(model, "sketch", None) is None or model.config.sketch_fusion != "concat"):
        raise ValueError(
            "--sketch_warmup_epochs needs sketch_fusion='concat' (the other fusions have no λ to switch)"
        )
    return steps


def _step_settings(
    args: TemdeTrainingArguments, step: int, spe: int, warmup: int
) -> tuple[float | None, bool | None]:
    """`(sketch_weight, max_violation)` for `step`: λ = 0 in the sketch warm-up, VSE∞'s all-negatives epochs."""
    sketch_weight = 0.0 if step < warmup else None
    max_violation = None
    if args.loss_type == "vse_hinge" and spe and step / spe < args.vse_warmup_epochs:
        max_violation = False
    return sketch_weight, max_violation


def _optimizer_step(
    trained: TrainingModel, args: TemdeTrainingArguments, optimizer: Any, scheduler: Any,
    contrastive_batches: list[list[dict[str, torch.Tensor]]], state: TrainerState, spe: int, warmup: int,
) -> dict[str, float]:  # fmt: skip
    """One optimizer step on the step's contrastive batches (`BatchPlan.split`); returns its logs."""
    accelerator, model = trained.accelerator, trained.model
    sketch_weight, max_violation = _step_settings(args, state.global_step, spe, warmup)
    loss = accumulate_gradients(
        trained.model_wrapped,
        contrastive_batches,
        _objective(args, model, state.global_step, max_violation),
        accelerator,
        sketch_weight=sketch_weight,
        where=f"step {state.global_step + 1} (epoch {state.epoch})",
    )
    lrs = dict(zip((g["name"] for g in optimizer.param_groups), scheduler.get_last_lr()))
    logs = {
        "loss": float(loss),
        "lr": next((v for k, v in lrs.items() if k.startswith("head")), max(lrs.values())),
    }
    if args.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(trained.model_wrapped.parameters(), args.max_grad_norm)
        logs["grad_norm"] = float(norm)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule advance
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP's clamp: exp(logit_scale) <= max_logit_scale
        model.logit_scale.clamp_(max=math.log(args.max_logit_scale))
    logs["logit_scale"] = float(model.logit_scale.detach().exp())
    return logs


def _save_best(
    trained: TrainingModel, args: TemdeTrainingArguments, state: TrainerState, metrics: dict[str, float]
) -> None:
    key = f"eval_{args.metric_for_best_model}"
    if key not in metrics:
        raise ValueError(
            f"--metric_for_best_model {args.metric_for_best_model!r} is not in {sorted(metrics)}"
        )
    if state.best_metric is not None and metrics[key] <= state.best_metric:
        return
    state.best_metric, state.best_step = metrics[key], state.global_step
    trained.export(Path(args.output_dir) / "best")


def _evaluate_and_track(
    trained: TrainingModel, args: TemdeTrainingArguments, eval_set: EvalSet, state: TrainerState, in_warmup: bool
) -> dict[str, float]:  # fmt: skip
    """Evaluate (every process, sharded), track the best model, log."""
    sketch_weight = 0.0 if in_warmup else None
    try:
        metrics = evaluate(
            trained.model_wrapped,
            trained.accelerator,
            eval_set,
            args.per_device_eval_batch_size,
            sketch_weight,
        )
    except NonFiniteScoresError as error:  # every rank scores the gathered embeddings: all raise together
        raise NonFiniteScoresError(
            f"{args.output_dir}: the model at step {state.global_step} cannot be evaluated: {error}; it is "
            "not kept as best: resume from an earlier checkpoint (--resume PATH) with a lower --learning_rate"
        ) from error
    if not in_warmup:  # a model with λ = 0 is not the model being trained: never "best"
        _save_best(trained, args, state, metrics)
    state.log_history.append({"step": state.global_step, "epoch": state.epoch, **metrics})
    trained.accelerator.log(metrics, step=state.global_step)
    trained.train_mode(args.freeze_batch_norm)
    return metrics


def _after_step(
    trained: TrainingModel,
    args: TemdeTrainingArguments,
    data: TrainingData,
    state: TrainerState,
    logs: dict[str, float],
    spe: int,
    stop_at: int,
    warmup: int,
    bar: Any,
) -> tuple[bool, dict[str, float] | None]:
    """Advance the counters, log, evaluate and checkpoint as scheduled; return (finished, metrics)."""
    accelerator = trained.accelerator
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
    if data.eval_set is not None and (eval_now or state.global_step == state.total_steps):
        in_warmup = state.global_step < warmup
        metrics = _evaluate_and_track(trained, args, data.eval_set, state, in_warmup)
    if (args.save_steps > 0 and state.global_step % args.save_steps == 0) or finished:
        save_checkpoint(accelerator, state, args.output_dir, args.save_total_limit, stream=data.stream)
    return finished, metrics


def _initialize_sketch(
    model: nn.Module, args: TemdeTrainingArguments, data: TrainingData, device: torch.device
) -> None:
    """A fresh run's data-dependent sketch initialisation (`initialization`), before `prepare`."""
    sketch = getattr(model, "sketch", None)
    if sketch is None or args.sketch_init_batches <= 0 or bool(sketch.initialized):
        return
    if data.stream is not None:  # this process's first batches; DDP then broadcasts rank 0's sketch
        batches = data.stream.preview(args.sketch_init_batches)
        initialize_sketch_from_batches(model, batches, device=device, seed=args.seed)
    else:
        initialize_sketch(
            model,
            data.batches.collator,
            data.batches.sampler(),
            args.sketch_init_batches,
            device=device,
            seed=args.seed,
        )


def _prepare(
    trained: TrainingModel, args: TemdeTrainingArguments, data: TrainingData, resume: Path | None
) -> tuple[Any, Any, TrainerState, int, int]:
    """Initialise (fresh run), prepare model/optimizer/scheduler, restore (resume)."""
    accelerator, model, stream = trained.accelerator, trained.model, data.stream
    # a stream has no length (spe = 0): --max_steps is required (`streaming.check_streaming_args`)
    spe = 0 if stream is not None else data.batches.steps_per_epoch
    total = _total_steps(args, spe)
    if resume is None:
        _initialize_sketch(model, args, data, accelerator.device)
    if stream is not None:
        probe = {k: v[:4] for k, v in stream.preview(1)[0].items()}
    else:
        probe = data.batches.first_pairs(4)
    freeze_unused_parameters(
        model,
        {k: v.to(accelerator.device) for k, v in probe.items()},
        _objective(args, model, 0, negatives="local"),
    )
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total, spe)
    trained.model_wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = load_checkpoint(accelerator, resume, args.output_dir) if resume is not None else TrainerState()
    if stream is not None:
        if resume is not None:
            stream.load_state_dict(load_stream_state(resume, accelerator.process_index))
        elif stream.key_log is not None:
            stream.key_log.unlink(missing_ok=True)  # a new run: not another attempt's keys
    if resume is not None:
        logger.info("resumed from %s at step %d", resume, state.global_step)
    state.total_steps = total
    state.data_order = data.data_order
    return optimizer, scheduler, state, spe, total


def run_training(
    trained: TrainingModel, args: TemdeTrainingArguments, data: TrainingData
) -> tuple[TrainerState, dict[str, float]]:
    """Train until `max_steps` / `num_train_epochs` (or `stop_after_steps`); returns the state and last eval.

    Raises:
        NonFiniteLossError: The loss became NaN/inf; the message names the last good checkpoint.
    """
    accelerator, stream = trained.accelerator, data.stream
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    check_resume(resume, data.data_order)  # the pairs' count too, now that the data is loaded
    optimizer, scheduler, state, spe, total = _prepare(trained, args, data, resume)
    warmup = _sketch_warmup_steps(args, trained.model, spe)
    last_eval: dict[str, float] = {}
    stop_at = min(total, args.stop_after_steps) if args.stop_after_steps > 0 else total
    bar = tqdm(
        total=total,
        initial=state.global_step,
        desc="train",
        unit="step",
        disable=args.disable_tqdm or not accelerator.is_local_main_process,
    )
    trained.train_mode(args.freeze_batch_norm)
    while state.global_step < stop_at:
        if stream is not None:  # the stream's next batches, to the end of its epoch
            loader = stream.epoch_batches(state.global_step)
        else:
            loader = data.batches.epoch(state.epoch, state.batches_in_epoch)
        for batch in loader:
            if warmup and state.global_step == warmup:
                # λ switches on: draw the partition on the tokens the trained projections now make
                # (the same global batches on every process, so no broadcast is needed)
                initialize_sketch(
                    trained.model, data.batches.collator, data.batches.sampler(state.epoch),
                    max(1, args.sketch_init_batches), device=accelerator.device, seed=args.seed + state.global_step,
                )  # fmt: skip
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            try:
                logs = _optimizer_step(
                    trained, args, optimizer, scheduler, data.plan.split(batch), state, spe, warmup
                )
            except NonFiniteLossError as error:
                last = list_checkpoints(args.output_dir)
                raise NonFiniteLossError(
                    f"{error}. Last good checkpoint: {last[-1] if last else 'none (no checkpoint saved yet)'}"
                ) from None
            finished, evaluated = _after_step(trained, args, data, state, logs, spe, stop_at, warmup, bar)
            last_eval = evaluated if evaluated is not None else last_eval
            if finished:
                break
        if stream is not None and state.global_step < stop_at:  # every process's stream ended an epoch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    bar.close()
    if stream is not None:
        stream.finish()
    return state, last_eval
