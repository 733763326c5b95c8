"""``temde-hf train`` / ``accelerate launch examples/train_temde.py CONFIG.yaml [--flag value ...]``.

Builds the model (pretrained towers from local folders, a config, or a saved T-EMDE model), the
processor and the data (any `temde_hf.data` format; a split, or one fold of a k-fold cross-validation),
caches the outputs of frozen towers (and the frozen lower part of partly trained ones), runs
`run_training`, then writes the final model + processor (with the remote code) and its model card to
``output_dir/final``, the training curves to ``output_dir/training_curves.png`` and returns the final
metrics.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, set_seed
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from ..data import load_image_captions, make_synthetic_karpathy
from ..data.auto import detect_format
from ..data.pairs import caption_to_image, flat_captions
from ..models.temde import TemdeConfig, TemdeForImageTextRetrieval, TemdeModel, TemdeProcessor
from .arguments import (
    SPLIT_WITH_FEATURE_LAYERS,
    DataArguments,
    ModelArguments,
    TemdeTrainingArguments,
    data_order_settings,
    mixed_precision,
    needs_matching_head,
    parse_args,
    recordable,
    report_to_list,
    save_run_settings,
    trainable_layers,
)
from .batches import ImageInputs, PairCollator, TextInputs
from .checkpointing import TrainerState, check_output_dir, check_resume, output_dir_lock, resolve_resume
from .curves import plot_training_curves
from .features import RowView, TowerOutputs, build_tower_cache, cache_key, caption_lengths, tower_fingerprint
from .loop import TrainingData, TrainingModel, run_training
from .optim import freeze_towers, frozen_tower_names, tower_blocks
from .steps import BatchPlan, PairBatches
from .streaming import StreamBatches, check_streaming_args
from .tower_split import LowerTower, TowerSplit, attach_upper_towers, find_tower_split
from .validation import EvalSet

logger = logging.getLogger("temde_hf.training")


def _model_class(model_args: ModelArguments, matching_head: bool) -> type[TemdeModel]:
    """`TemdeForImageTextRetrieval` when the run needs the matching head or continues a model that has one."""
    if matching_head:
        return TemdeForImageTextRetrieval
    if model_args.init_from is not None:
        config = Path(model_args.init_from) / "config.json"
        saved = json.loads(config.read_text()) if config.is_file() else {}
        if TemdeForImageTextRetrieval.__name__ in (saved.get("architectures") or []):
            return TemdeForImageTextRetrieval  # keep the head it has (it is frozen if unused)
    return TemdeModel


def build_model(model_args: ModelArguments, matching_head: bool = False) -> TemdeModel:
    """The model to train, from exactly one source (see `ModelArguments`), with config overrides.

    Args:
        model_args: The model settings.
        matching_head: Build a `TemdeForImageTextRetrieval` (the dual encoder + its matching head).
    """
    overrides = model_args.config_overrides()
    model_class = _model_class(model_args, matching_head)
    if model_args.init_from is not None:
        return model_class.from_pretrained(model_args.init_from, use_safetensors=True, **overrides)
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
        return model_class(TemdeConfig(**{**values, **overrides}))
    return model_class.from_vision_text_pretrained(
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


def _splits(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


@dataclass
class Splits:
    """The images a run uses: one pool, and which of its rows train and which evaluate.

    Frozen towers' outputs are cached over the whole pool, in the pool's order, so every fold of a
    cross-validation (and every seed or recipe) reads the same cache.
    """

    pool: datasets.Dataset
    train_rows: list[int]
    eval_rows: list[int]
    name: str

    def train(self) -> datasets.Dataset:
        return self.pool.select(self.train_rows)

    def evaluation(self) -> datasets.Dataset | None:
        return self.pool.select(self.eval_rows) if self.eval_rows else None


def load_data(
    data_args: DataArguments, output_dir: str | Path, seed: int, accelerator: Accelerator
) -> Splits:
    """The run's images: the train split(s), and the evaluation split or one cross-validation fold.

    With ``cv_folds > 1`` the images of the train split(s) are dealt into folds by a permutation drawn
    from ``cv_seed``; fold ``cv_fold`` is evaluated, the others train.
    """
    path = data_args.data
    if path is None:  # generated once by the main process, read by all
        with accelerator.main_process_first():
            root = Path(output_dir) / "synthetic_data"
            existing = root / "dataset_synthetic.json"
            path = (
                existing
                if existing.is_file()
                else make_synthetic_karpathy(root, data_args.synthetic_images, seed)
            )
    name = Path(str(path)).stem.removeprefix("dataset_")

    def load(splits: list[str]) -> datasets.Dataset:
        return load_image_captions(
            path, format=data_args.data_format, image_root=data_args.image_root, split=splits,
            **_column_kwargs(path, data_args),
        )  # fmt: skip

    pool = load(_splits(data_args.train_split))
    if len(pool) == 0:
        raise ValueError(f"{path}: no images in split(s) {data_args.train_split!r} (--train_split)")
    train_rows, eval_rows = list(range(len(pool))), []
    if data_args.cv_folds:
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(data_args.cv_seed))
        k, f = data_args.cv_folds, data_args.cv_fold
        held = set(order[f * len(pool) // k : (f + 1) * len(pool) // k].tolist())
        train_rows = [r for r in train_rows if r not in held]
        eval_rows = sorted(held)
    elif data_args.eval_split.lower() != "none":
        evaluation = load(_splits(data_args.eval_split))
        if len(evaluation) == 0:
            raise ValueError(
                f"{path}: no images in split(s) {data_args.eval_split!r} (--eval_split); name a split of "
                "the data, or none to train without evaluation"
            )
        eval_rows = list(range(len(pool), len(pool) + len(evaluation)))
        pool = datasets.concatenate_datasets([pool, evaluation])
    if data_args.max_train_images is not None:
        train_rows = train_rows[: data_args.max_train_images]
    if data_args.max_eval_images is not None:
        eval_rows = eval_rows[: data_args.max_eval_images]
    if len(train_rows) < 2:
        raise ValueError(
            f"{path}: {len(train_rows)} training image(s) in --train_split {data_args.train_split!r}; a "
            "contrastive batch needs at least 2 distinct images: add images (or raise --max_train_images)"
        )
    return Splits(pool, train_rows, eval_rows, name)


def _column_kwargs(path: str | Path, data_args: DataArguments) -> dict[str, str]:
    """``--image_column`` / ``--caption_column`` for the loaders that read named columns (parquet, Hub)."""
    columns = data_args.loader_kwargs()
    if columns:
        format = detect_format(path) if data_args.data_format == "auto" else data_args.data_format
        if format not in ("parquet", "hub"):
            names = " and ".join(f"--{k.replace('captions', 'caption')}" for k in columns)
            raise ValueError(
                f"{names}: only parquet files and Hub datasets have named columns; {path} is {format}"
            )
    return columns


def _cached_towers(
    model: TemdeModel, args: TemdeTrainingArguments
) -> dict[str, tuple[torch.nn.Module, TowerSplit | None]]:
    """Per tower whose outputs or lower part are cached: what runs once over the items, and the split.

    A frozen tower is cached whole (split ``None``); a tower whose top N blocks train
    (``--{part}_trainable_layers N``), below its first trainable block (`tower_split.LowerTower`).
    """
    if not args.cache_tower_outputs:
        return {}
    cached: dict[str, tuple[torch.nn.Module, TowerSplit | None]] = {}
    frozen = frozen_tower_names(model)
    for part, count in trainable_layers(args).items():
        tower = getattr(model, f"{part}_model")
        if part in frozen:
            cached[part] = (tower.eval(), None)
        elif count:
            split = find_tower_split(tower, count)
            if split is not None:
                cached[part] = (LowerTower(split), split)
            elif count < len(tower_blocks(tower) or ()):
                logger.warning(
                    "--%s_trainable_layers %d: no lower/upper split for %s towers (tower_split.py), so the "
                    "whole %s tower runs every step", part, count, type(tower).__name__, part,
                )  # fmt: skip
    return cached


def _tower_caches(
    model: TemdeModel,
    processor: TemdeProcessor,
    pool: datasets.Dataset,
    data_args: DataArguments,
    args: TemdeTrainingArguments,
    accelerator: Accelerator,
) -> tuple[dict[str, list[TowerOutputs]], dict[str, TowerSplit]]:
    """Cached outputs of each frozen tower (or lower parts of partly trained ones) over all images /
    captions of `pool` (in its order).

    Returns:
        Per tower, one memory-mapped `TowerOutputs` per view (images: the image, then its mirror with
        flip augmentation; captions: one), an empty list for a tower that runs every step; and the splits
        of the towers whose cache holds their lower part.
    """
    caches: dict[str, list[TowerOutputs]] = {"vision": [], "text": []}
    splits: dict[str, TowerSplit] = {}
    folder = Path(args.feature_cache_dir or Path(args.output_dir) / "feature_cache")
    for part, (tower, split) in _cached_towers(model, args).items():
        lengths: Any = None
        if part == "vision":
            inputs: Any = ImageInputs(pool, processor)
            items = [str(v) for v in pool["image_id"]]
            settings = processor.image_processor.to_json_string()
            views = [0, 1] if args.image_flip_augmentation else [0]
        else:
            inputs = TextInputs(flat_captions(pool), processor, data_args.max_text_length)
            items = inputs.captions
            settings = (
                f"{processor.tokenizer.name_or_path}|{len(processor.tokenizer)}|{data_args.max_text_length}"
            )
            views = [0]
            lengths = partial(caption_lengths, processor.tokenizer, items, data_args.max_text_length)
        # the lower part of a split: the blocks below the cut (a different N, another cache)
        lower = {} if split is None else {"lower_blocks": split.cut}
        # the vision maps the sketch also reads (`TemdeConfig.sketch_vision_feature_layers`): in the key only
        # when set, so the caches of a model without them keep their names
        layers = getattr(model, "sketch_feature_layers", ()) if part == "vision" else ()
        if layers and split is not None:
            raise ValueError(SPLIT_WITH_FEATURE_LAYERS)
        lower |= {"sketch_layers": list(layers)} if layers else {}
        label = "frozen tower" if split is None else f"frozen lower {split.cut} blocks"
        for view in views:
            key = cache_key(tower=tower_fingerprint(tower), items=items, settings=settings,
                            dtype=args.feature_cache_dtype, data=str(data_args.data), view=view, **lower)  # fmt: skip
            name = f"{part}-" + (f"lower{split.cut}-" if split else "") + key + ("-mirrored" if view else "")
            caches[part].append(
                build_tower_cache(
                    folder / name,
                    key,
                    tower,
                    partial(_mirrored, inputs) if view else inputs,
                    len(inputs),
                    batch_size=args.per_device_eval_batch_size,
                    dtype=args.feature_cache_dtype,
                    lengths=lengths,
                    backend=args.feature_cache_backend,
                    device=accelerator.device,
                    num_workers=args.feature_cache_workers if part == "vision" else 0,
                    rank=accelerator.process_index,
                    world_size=accelerator.num_processes,
                    wait=accelerator.wait_for_everyone,
                    desc=f"{name} ({label}, cached once)",
                    layers=layers,
                )
            )
        if split is not None:
            splits[part] = split
    return caches, splits


def _mirrored(images: ImageInputs, rows: list[int]) -> dict[str, torch.Tensor]:
    return images(rows, [1] * len(rows))


def _slice(views: list[TowerOutputs], rows: torch.Tensor) -> RowView | None:
    """Rows `rows` of every view, view-major (row ``view * len(rows) + i`` is view `view` of `rows[i]`),
    read from the memory-mapped caches per batch."""
    return RowView(views, rows) if views else None


def build_inputs(
    model: TemdeModel,
    processor: TemdeProcessor,
    splits: Splits,
    data_args: DataArguments,
    args: TemdeTrainingArguments,
    accelerator: Accelerator,
) -> tuple[PairCollator, torch.Tensor, EvalSet | None]:
    """The training collator, the training pairs' image rows `(n_pairs,)`, and the evaluation set (raw or
    cached).

    A tower whose lower part is cached gets its top blocks run on it inside `model`'s forward
    (`tower_split.attach_upper_towers`), in training and evaluation alike.
    """
    # Cache over the rows this run uses, in pool order: every fold of a cross-validation uses them all
    # (one cache for all folds), and a run limited by --max_train_images computes only what it reads.
    used = sorted(set(splits.train_rows) | set(splits.eval_rows))
    pool = splits.pool.select(used)
    position = {row: i for i, row in enumerate(used)}
    caches, tower_splits = _tower_caches(model, processor, pool, data_args, args, accelerator)
    attach_upper_towers(model, tower_splits)
    pool_c2i = caption_to_image(pool)

    def inputs(pool_rows: list[int]) -> tuple[datasets.Dataset, ImageInputs, TextInputs]:
        rows = [position[r] for r in pool_rows]
        dataset = pool.select(rows)
        image_rows = torch.as_tensor(rows, dtype=torch.long)
        # the pool's caption indices of these images, in `caption_to_image(dataset)` order
        caption_rows = torch.cat([torch.nonzero(pool_c2i == r).squeeze(1) for r in rows])
        return (
            dataset,
            ImageInputs(dataset, processor, _slice(caches["vision"], image_rows), "vision" in tower_splits),
            TextInputs(flat_captions(dataset), processor, data_args.max_text_length, _slice(caches["text"], caption_rows),
                       "text" in tower_splits),
        )  # fmt: skip

    train, images, texts = inputs(splits.train_rows)
    train_c2i = caption_to_image(train)
    collator = PairCollator(images, texts, train_c2i, n_views=2 if args.image_flip_augmentation else 1)
    eval_set = None
    if splits.eval_rows:
        evaluation, images, texts = inputs(splits.eval_rows)
        eval_set = EvalSet(images, texts, caption_to_image(evaluation))
    return collator, train_c2i, eval_set


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


def eval_results(
    metrics: dict[str, float], eval_set: EvalSet | None, data_args: DataArguments, dataset_name: str
) -> dict | None:
    """The last evaluation in the card's layout (`card_results`), or ``None`` without one."""
    if not metrics or eval_set is None:
        return None
    split = (
        f"cv fold {data_args.cv_fold}/{data_args.cv_folds}" if data_args.cv_folds else data_args.eval_split
    )
    n_images, n_captions = len(eval_set.images), len(eval_set.caption_to_image)
    return card_results(metrics, dataset_name, split, n_images, n_captions)


def write_final(
    trained: TrainingModel, output_dir: str | Path, results: dict | None, model_args: ModelArguments
) -> Path:
    """Save model + processor (remote code included), the eval JSON and the model card (collective)."""
    from ..hub.model_card import write_model_card

    final = Path(output_dir) / "final"
    trained.export(final)
    if not trained.accelerator.is_main_process:
        return final
    if results is not None:
        (final / "eval_results.json").write_text(json.dumps(results, indent=2))
    base_models = [m.strip() for m in (model_args.card_base_models or "").split(",") if m.strip()]
    write_model_card(
        final,
        results,
        final / "README.md",
        run_settings=(Path(output_dir) / "run_settings.yaml").read_text(),
        base_models=base_models or None,
        model_name=Path(output_dir).name,
    )
    return final


def _finish(
    trained: TrainingModel,
    args: TemdeTrainingArguments,
    state: TrainerState,
    last_eval: dict[str, float],
    results: dict | None,
    model_args: ModelArguments,
) -> dict[str, float]:
    """Curves, final model + card (with `results`, the last evaluation), and the metrics `main` returns."""
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    metrics = {"global_step": float(state.global_step), **last_eval}
    if losses:
        metrics["train_loss"] = losses[-1]
    output_dir = Path(args.output_dir)
    if state.global_step >= state.total_steps:  # not after a simulated pre-emption
        final = write_final(trained, output_dir, results, model_args)
        logger.info("final model, processor and card in %s", final)
        if args.push_to_hub and trained.accelerator.is_main_process:
            push_final_model(args, final, model_args)
    if trained.accelerator.is_main_process:
        plot_training_curves(state.log_history, output_dir / "training_curves.png", title=output_dir.name)
        (output_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def build_accelerator(args: TemdeTrainingArguments) -> Accelerator:
    """The `Accelerator`; a multi-process launch without CUDA runs on CPU processes (gloo).

    Raises:
        RuntimeError: The launcher started several processes but accelerate sees only one.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # without cpu=True, accelerate treats launched CPU processes as independent single-process runs
    cpu = args.use_cpu or (launched > 1 and not torch.cuda.is_available())
    if args.fp16 and (cpu or not torch.cuda.is_available()):
        raise ValueError(
            "--fp16 needs a GPU (its loss scaling is CUDA's); on CPU use --bf16 true, or neither"
        )
    dynamo = None
    if args.torch_compile:
        dynamo = TorchDynamoPlugin(
            backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode
        )
    trackers = report_to_list(args.report_to)
    # A second run in one process (a notebook, a test) may ask for another precision or compile setting:
    # accelerate keeps the first run's state and refuses the change, so start from a clean one (the
    # process group, `PartialState`, is kept), as transformers' TrainingArguments does.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision(args),
        dynamo_plugin=dynamo,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "tensorboard")
        ),
        # The schedule counts optimizer steps; accelerate would otherwise step it once per process.
        step_scheduler_with_optimizer=False,
    )
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate sees "
            f"{accelerator.num_processes}; launch with `accelerate launch --multi_gpu` or `torchrun`"
        )
    idle = idle_cpu_cores(accelerator)
    if idle:
        logger.warning(
            "training on CPU with one thread per process while %d core(s) sit idle: `accelerate launch` sets "
            "OMP_NUM_THREADS=1 unless told otherwise; pass `--num_cpu_threads_per_process N` (or `--cpu`)",
            idle,
        )
    return accelerator


def idle_cpu_cores(accelerator: Accelerator) -> int:
    """Cores left idle by one-thread CPU processes (0 on an accelerator, or with more threads).

    `accelerate launch` without `--cpu` gives each process one thread: half of a 2-core machine, a silent 2x
    slowdown. Only that case counts: torch's own default (physical cores) may leave hyper-threads unused.
    """
    if accelerator.device.type != "cpu" or torch.get_num_threads() != 1:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cores - accelerator.num_processes)


def _tracker_config(
    model_args: ModelArguments, data_args: DataArguments, args: TemdeTrainingArguments
) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for values in (dataclasses.asdict(model_args), dataclasses.asdict(data_args), recordable(args)):
        flat.update({k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))})
    return flat


def push_final_model(args: TemdeTrainingArguments, final: Path, model_args: ModelArguments) -> None:
    """``--push_to_hub``: upload `final` (re-exported with its card for the repo) through `hub.publish`."""
    from ..hub.publish import push_to_hub

    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    eval_json = final / "eval_results.json"
    base_models = [m.strip() for m in (model_args.card_base_models or "").split(",") if m.strip()]
    push_to_hub(
        final,
        repo_id,
        out_dir=Path(args.output_dir) / "hub_export",
        eval_json=eval_json if eval_json.is_file() else None,
        private=bool(args.hub_private_repo),
        token=args.hub_token,
        overwrite=True,
        base_models=base_models or None,
        run_settings=(Path(args.output_dir) / "run_settings.yaml").read_text(),
    )
    logger.info("pushed %s to the Hub as %s", final, repo_id)


def _end_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train from ``[CONFIG.yaml] [--flag value ...]``; returns the final metrics.

    Under a multi-process launch, a process whose error comes from losing another process (gloo's
    "remote worker" errors) says so, so the user reads the failing process's own line, not this one's;
    its process group ends at exit, after ``temde_hf.cli`` printed the error line (ending it while the
    error propagates lets the other processes fail first, and the launcher may kill this one before
    its line is printed; never ending it can abort the interpreter at exit).

    Returns:
        ``train_loss`` (last step), ``global_step``, and the last evaluation's ``eval_*`` metrics.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        atexit.register(_end_process_group)
    try:
        return _train(argv)
    except RuntimeError as error:
        if world > 1 and "remote worker" in str(error):
            rank = os.environ.get("RANK", "?")
            raise RuntimeError(
                f"process {rank} of {world} stopped because another process of this launch failed: its own "
                "`temde-hf train: error:` line (or the launcher's summary) names the problem"
            ) from error
        raise


def _train(argv: list[str] | None) -> dict[str, float]:
    model_args, data_args, args = parse_args(sys.argv[1:] if argv is None else argv)
    if data_args.streaming:
        check_streaming_args(data_args, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per saved file otherwise
    accelerator = build_accelerator(args)
    # one run per output folder: the main process holds its lock until the run ends (or dies)
    with output_dir_lock(args.output_dir, accelerator.is_main_process):
        return _run(model_args, data_args, args, accelerator)


def _run(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: TemdeTrainingArguments,
    accelerator: Accelerator,
) -> dict[str, float]:
    """`main` once the output folder is this run's."""
    plan = BatchPlan.from_args(args, accelerator.process_index, accelerator.num_processes)
    order = data_order_settings(data_args, args, accelerator.num_processes)
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    # before the run settings are rewritten: a resume must not change how the data is ordered
    check_resume(resume, order)
    if accelerator.is_main_process:
        check_output_dir(
            args.output_dir,
            resuming=args.resume_from_checkpoint is not None,
            overwrite=args.overwrite_output_dir,
        )
        save_run_settings(args.output_dir, model_args, data_args, args)
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    model = build_model(model_args, needs_matching_head(args))
    freeze_towers(model, trainable_layers(args))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device)
    processor = build_processor(model_args)
    if data_args.streaming:  # batches straight from the stream; towers run live (nothing to cache against)
        stream = StreamBatches(data_args, processor, accelerator, plan.step_size, args.seed,
                               args.image_flip_augmentation, args.output_dir)  # fmt: skip
        data = TrainingData(plan, stream, order)  # a stream has no fixed pairs to count
        uncached = sorted(_cached_towers(model, args))  # what a map-style run would have cached
        if uncached:
            logger.info(
                "--streaming: the frozen part of the %s tower(s) runs every step (a stream has no fixed items "
                "to cache)", " and ".join(uncached),
            )  # fmt: skip
        name = stream.name
    else:
        splits = load_data(data_args, args.output_dir, args.seed, accelerator)
        collator, train_c2i, eval_set = build_inputs(model, processor, splits, data_args, args, accelerator)
        pairs = PairBatches(plan, train_c2i, collator, data_args.dataloader_num_workers)
        data = TrainingData(plan, pairs, {**order, "n_train_pairs": len(train_c2i)}, eval_set)
        name = splits.name
    trained = TrainingModel(model, processor, accelerator)
    if report_to_list(args.report_to):
        accelerator.init_trackers(
            Path(args.output_dir).resolve().name, config=_tracker_config(model_args, data_args, args)
        )
    try:
        state, last_eval = run_training(trained, args, data)
        results = eval_results(last_eval, data.eval_set, data_args, name)
        metrics = _finish(trained, args, state, last_eval, results, model_args)
        accelerator.wait_for_everyone()
    except BaseException:
        if accelerator.num_processes == 1:  # several: the group ends at exit (see `main`)
            accelerator.end_training()
        raise
    accelerator.end_training()  # also ends the process group: nothing collective after this
    return metrics
