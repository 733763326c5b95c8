"""``temde-hf train`` / ``accelerate launch examples/train_temde.py CONFIG.yaml [--flag value ...]``.

Builds the model (pretrained towers from local folders, a config, or a saved T-EMDE model), the
processor and the data, runs `run_training`, then writes the final model + processor (with the
remote code) and its model card to ``output_dir/final``, the training curves to
``output_dir/training_curves.png`` and returns the final metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from ..data import CaptionPairs, load_karpathy, make_synthetic_karpathy
from ..models.temde import TemdeConfig, TemdeModel, TemdeProcessor
from .arguments import DataArguments, ModelArguments, TemdeTrainingArguments, parse_args, save_run_settings
from .checkpointing import TrainerState
from .curves import plot_training_curves
from .loop import TrainingJob, run_training
from .optim import freeze_towers

logger = logging.getLogger("temde_hf.training")


def build_model(model_args: ModelArguments) -> TemdeModel:
    """The model to train, from exactly one source (see `ModelArguments`), with config overrides."""
    overrides = model_args.config_overrides()
    if model_args.init_from is not None:
        return TemdeModel.from_pretrained(model_args.init_from, **overrides)
    if model_args.model_config is not None:
        path = Path(model_args.model_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--model_config {model_args.model_config}: no such config file/folder")
        values = json.loads(path.read_text())
        if "n_hyperplanes" in overrides or "sketch_width" in overrides:
            values.pop("sketch_width", None)  # derived from H; keep only the override
            values.pop("n_hyperplanes", None)
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            values.pop(key, None)
        return TemdeModel(TemdeConfig(**{**values, **overrides}))
    return TemdeModel.from_vision_text_pretrained(
        model_args.vision_model_path, model_args.text_model_path, **overrides
    )


def build_processor(model_args: ModelArguments) -> TemdeProcessor:
    """The processor: the saved one (``init_from``), else image processor + tokenizer from local folders."""
    if model_args.init_from is not None and model_args.image_processor_path is None:
        return AutoProcessor.from_pretrained(model_args.init_from)
    image_source = model_args.image_processor_path or model_args.vision_model_path
    text_source = model_args.tokenizer_path or model_args.text_model_path
    if image_source is None or text_source is None:
        raise ValueError(
            "no processor source: pass --image_processor_path and --tokenizer_path (local folders) "
            "when training from --model_config"
        )
    return TemdeProcessor(
        AutoImageProcessor.from_pretrained(image_source), AutoTokenizer.from_pretrained(text_source)
    )


def load_data(
    data_args: DataArguments, output_dir: str | Path, seed: int, accelerator: Accelerator
) -> tuple[CaptionPairs, datasets.Dataset | None, str]:
    """Training pairs, the evaluation split (or ``None`` if empty) and the dataset's name."""
    json_path = data_args.karpathy_json
    if json_path is None:
        # generated once by the main process, read by all
        with accelerator.main_process_first():
            root = Path(output_dir) / "synthetic_data"
            existing = root / "dataset_synthetic.json"
            json_path = (
                existing
                if existing.is_file()
                else make_synthetic_karpathy(root, data_args.synthetic_images, seed)
            )
    name = Path(json_path).stem.removeprefix("dataset_")
    train = load_karpathy(json_path, data_args.image_root, split=data_args.train_split)
    if len(train) == 0:
        raise ValueError(f"{json_path}: no images in split {data_args.train_split!r} (--train_split)")
    if data_args.max_train_images is not None:
        train = train.select(range(min(data_args.max_train_images, len(train))))
    evaluation = load_karpathy(json_path, data_args.image_root, split=data_args.eval_split)
    if data_args.max_eval_images is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_images, len(evaluation))))
    return CaptionPairs(train), (evaluation if len(evaluation) else None), name


def _tracker_config(*groups: Any) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for group in groups:
        flat.update(
            {k: v for k, v in dataclasses.asdict(group).items() if isinstance(v, (int, float, str, bool))}
        )
    return flat


def card_results(metrics: dict[str, float], dataset: str, split: str, n_images: int, n_captions: int) -> dict:
    """Flat ``eval_*`` metrics -> the evaluation JSON layout the model card renders."""

    def block(direction: str) -> dict[str, float]:
        keys = {"R@1": "r1", "R@5": "r5", "R@10": "r10", "medr": "medr", "meanr": "meanr"}
        return {name: metrics[f"eval_{direction}_{key}"] for name, key in keys.items()}

    return {
        "dataset": dataset,
        "split": split,
        "n_images": n_images,
        "n_captions": n_captions,
        "i2t": block("i2t"),
        "t2i": block("t2i"),
        "rsum": metrics["eval_rsum"],
    }


def write_final(
    job: TrainingJob, metrics: dict[str, float], dataset_name: str, model_args: ModelArguments
) -> Path:
    """Save model + processor (remote code included), the eval JSON and the model card."""
    from ..hub.model_card import write_model_card

    final = Path(job.args.output_dir) / "final"
    job.model.save_pretrained(final)
    job.processor.save_pretrained(final)
    results = None
    if metrics and job.eval_dataset is not None:
        n_captions = sum(len(c) for c in job.eval_dataset["captions"])
        results = card_results(
            metrics, dataset_name, job.data_args.eval_split, len(job.eval_dataset), n_captions
        )
        (final / "eval_results.json").write_text(json.dumps(results, indent=2))
    base_models = [m.strip() for m in (model_args.card_base_models or "").split(",") if m.strip()]
    training_info = {
        k: v
        for k, v in dataclasses.asdict(job.args).items()
        if k
        in {
            "num_train_epochs",
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "lr_scheduler_type",
            "mixed_precision",
            "negatives",
            "vse_warmup_epochs",
        }
    }
    training_info["processes"] = job.accelerator.num_processes
    write_model_card(
        final,
        results,
        final / "README.md",
        training_info=training_info,
        base_models=base_models or None,
        model_name=Path(job.args.output_dir).name,
    )
    return final


def _finish(
    job: TrainingJob,
    state: TrainerState,
    last_eval: dict[str, float],
    dataset_name: str,
    model_args: ModelArguments,
) -> dict[str, float]:
    """Curves, final model + card (main process), and the metrics `main` returns."""
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    metrics = {"global_step": float(state.global_step), **last_eval}
    if losses:
        metrics["train_loss"] = losses[-1]
    output_dir = Path(job.args.output_dir)
    if job.accelerator.is_main_process:
        plot_training_curves(state.log_history, output_dir / "training_curves.png", title=output_dir.name)
        if state.global_step >= state.total_steps:  # not after a simulated pre-emption
            final = write_final(job, last_eval, dataset_name, model_args)
            logger.info("final model, processor and card in %s", final)
        (output_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def build_accelerator(args: TemdeTrainingArguments) -> Accelerator:
    """The `Accelerator`; a multi-process launch without CUDA runs on CPU processes (gloo).

    Raises:
        RuntimeError: The launcher started several processes but accelerate sees only one.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # without cpu=True, accelerate treats torchrun-launched CPU processes as independent runs
    cpu = args.use_cpu or (launched > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_dir=args.output_dir,
    )
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate sees "
            f"{accelerator.num_processes}; launch with `accelerate launch --multi_gpu` or `torchrun`"
        )
    return accelerator


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train from ``[CONFIG.yaml] [--flag value ...]``; returns the final metrics.

    Returns:
        ``train_loss`` (last step), ``global_step``, and the last evaluation's ``eval_*`` metrics.
    """
    model_args, data_args, args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per saved file otherwise
    accelerator = build_accelerator(args)
    set_seed(args.seed)
    if accelerator.is_main_process:
        save_run_settings(args.output_dir, model_args, data_args, args)
    model = build_model(model_args)
    freeze_towers(model, args.freeze_vision_tower, args.freeze_text_tower)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device)
    processor = build_processor(model_args)
    train_pairs, eval_dataset, dataset_name = load_data(data_args, args.output_dir, args.seed, accelerator)
    if args.report_to == "tensorboard":
        accelerator.init_trackers("tensorboard", config=_tracker_config(model_args, data_args, args))
    job = TrainingJob(model, processor, accelerator, args, data_args, train_pairs, eval_dataset)
    try:
        state, last_eval = run_training(job)
        metrics = _finish(job, state, last_eval, dataset_name, model_args)
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()  # also ends the process group: nothing collective after this
    return metrics
