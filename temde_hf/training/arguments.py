"""Training settings as dataclasses, parsed by `transformers.HfArgumentParser`.

A run is configured by an optional YAML/JSON file (``train_temde.py flickr30k.yaml``) whose keys are the
field names below (flat, or grouped under ``model:`` / ``data:`` / ``training:``), overridden by CLI
flags (``--learning_rate 1e-4``). The resolved settings are written to the output folder with the run,
so a checkpoint always says how it was made. The model config holds the architecture only; everything
about *how* it is trained lives here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..models.temde.loss_temde import LOSSES, SCORE_LOSSES

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
SECTIONS = ("model", "data", "training")


@dataclass
class ModelArguments:
    """What to train: the towers (local folders) or a full model config, and the architecture overrides."""

    vision_model_path: str | None = field(
        default=None, metadata={"help": "local folder of the pretrained vision tower (config + weights)"}
    )
    text_model_path: str | None = field(
        default=None, metadata={"help": "local folder of the pretrained text tower (+ its tokenizer)"}
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "a TemdeConfig JSON (or folder) to build a randomly initialised model from"},
    )
    init_from: str | None = field(
        default=None, metadata={"help": "a saved TemdeModel folder to continue from (weights + config)"}
    )
    image_processor_path: str | None = field(
        default=None, metadata={"help": "folder of the image processor; defaults to vision_model_path"}
    )
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "folder of the tokenizer; defaults to text_model_path"}
    )
    card_base_models: str | None = field(
        default=None, metadata={"help": "comma-separated Hub ids of the towers, for the model card"}
    )
    projection_dim: int | None = field(default=None, metadata={"help": "D, the joint token space"})
    pooling: str | None = field(default=None, metadata={"help": "pooler | cls | mean | attention"})
    sketch_fusion: str | None = field(default=None, metadata={"help": "concat | replace | none"})
    sketch_coder: str | None = field(default=None, metadata={"help": "soft_dlsh | anchor"})
    n_sketches: int | None = field(default=None, metadata={"help": "N, sketch depth"})
    n_hyperplanes: int | None = field(default=None, metadata={"help": "H; sketch width K = 2**H"})
    sketch_temperature: float | None = field(default=None, metadata={"help": "tau of the soft coder"})
    learn_sketch_temperature: bool | None = field(default=None, metadata={"help": "learn log tau"})
    sketch_weight: float | None = field(default=None, metadata={"help": "lambda of the concat fusion"})
    token_layer_norm: bool | None = field(
        default=None, metadata={"help": "LayerNorm of every tower token before the projection"}
    )
    alignment_aggregation: str | None = field(
        default=None, metadata={"help": "token-level alignment score: max_mean | max_sum | symmetric"}
    )
    itm_layers: int | None = field(
        default=None, metadata={"help": "joint-attention layers of the matching head"}
    )
    itm_heads: int | None = field(default=None, metadata={"help": "attention heads of the matching head"})
    itm_hidden_size: int | None = field(
        default=None, metadata={"help": "width of the matching head (default: projection_dim)"}
    )

    def config_overrides(self) -> dict[str, Any]:
        """The architecture fields that were set, as `TemdeConfig` keyword arguments."""
        skip = {"vision_model_path", "text_model_path", "model_config", "init_from"}
        skip |= {"image_processor_path", "tokenizer_path", "card_base_models"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip and v is not None}


@dataclass
class DataArguments:
    """Where the image-caption pairs come from: any format of `temde_hf.data`, or generated synthetic data."""

    data: str | None = field(
        default=None,
        metadata={"help": "Karpathy JSON (dataset_coco.json, dataset_flickr30k.json, ...), COCO captions JSON, "
                  "image,caption CSV, image folder with metadata.jsonl, parquet file or Hub dataset id"},
    )  # fmt: skip
    data_format: str = field(
        default="auto", metadata={"help": "auto | karpathy | coco | csv | imagefolder | ..."}
    )
    image_root: str | None = field(
        default=None, metadata={"help": "image folder; defaults to images/ beside the JSON"}
    )
    synthetic_images: int = field(
        default=0, metadata={"help": "if > 0 and no --data: generate this many synthetic images"}
    )
    train_split: str = field(default="train", metadata={"help": "split(s) to train on, e.g. 'train,val'"})
    eval_split: str = field(default="val", metadata={"help": "split to evaluate on ('none': no evaluation)"})
    cv_folds: int = field(
        default=0,
        metadata={"help": "> 1: k-fold cross-validation over the train split's images; this run trains on "
                  "all folds but --cv_fold and evaluates on it (--eval_split is then unused)"},
    )  # fmt: skip
    cv_fold: int = field(default=0, metadata={"help": "the held-out fold, 0 .. cv_folds - 1"})
    cv_seed: int = field(default=0, metadata={"help": "seed of the assignment of images to folds"})
    max_train_images: int | None = field(default=None, metadata={"help": "keep the first N train images"})
    max_eval_images: int | None = field(default=None, metadata={"help": "keep the first N eval images"})
    max_text_length: int = field(default=64, metadata={"help": "truncate captions to this many tokens"})
    dataloader_num_workers: int = field(default=0)


@dataclass
class TemdeTrainingArguments:
    """How to train: schedule, optimisation, negatives, checkpoints, evaluation and logging."""

    output_dir: str = field(default="outputs/temde", metadata={"help": "run folder (created)"})
    seed: int = field(default=42)
    num_train_epochs: float = field(default=1.0)
    max_steps: int = field(default=-1, metadata={"help": "> 0 overrides num_train_epochs"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "micro-batch per process"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per step; all of their pairs are negatives of each other"}
    )
    per_device_eval_batch_size: int = field(default=64)
    loss_type: str = field(default="info_nce", metadata={"help": "info_nce | vse_hinge"})
    margin: float = field(default=0.2, metadata={"help": "hinge margin (vse_hinge)"})
    max_violation: bool = field(default=True, metadata={"help": "hardest negative only (vse_hinge)"})
    sampling: str = field(
        default="pairs",
        metadata={"help": "pairs: an epoch visits every (image, caption) pair | images: every image once, "
                  "with one random caption"},
    )  # fmt: skip
    learning_rate: float = field(default=2e-4, metadata={"help": "LR of the heads (projections, sketch)"})
    vision_lr_multiplier: float = field(default=0.1, metadata={"help": "vision tower LR = this * LR"})
    text_lr_multiplier: float = field(default=0.1, metadata={"help": "text tower LR = this * LR"})
    weight_decay: float = field(default=0.05)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.98)
    adam_epsilon: float = field(default=1e-6)
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine | step | constant"})
    warmup_steps: int = field(default=0)
    warmup_ratio: float = field(default=0.0, metadata={"help": "used when warmup_steps is 0"})
    lr_step_size: int = field(
        default=0, metadata={"help": "step schedule: decay every N steps (0: per epoch)"}
    )
    lr_step_epochs: float = field(
        default=0.0, metadata={"help": "step schedule: decay every N epochs (overrides lr_step_size)"}
    )
    lr_step_gamma: float = field(default=0.1, metadata={"help": "step schedule: decay factor"})
    max_grad_norm: float = field(default=2.0, metadata={"help": "<= 0 disables clipping"})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16"})
    use_cpu: bool = field(default=False, metadata={"help": "train on CPU even if a GPU is visible"})
    gradient_checkpointing: bool = field(default=False)
    freeze_vision_tower: bool = field(default=False, metadata={"help": "train no vision tower weight"})
    freeze_text_tower: bool = field(default=False, metadata={"help": "train no text tower weight"})
    vision_trainable_layers: int | None = field(
        default=None, metadata={"help": "train only the last N blocks of the vision tower (and what follows)"}
    )
    text_trainable_layers: int | None = field(
        default=None, metadata={"help": "train only the last N layers of the text tower (and what follows)"}
    )
    image_flip_augmentation: bool = field(
        default=False,
        metadata={"help": "train on each image or its horizontal mirror (drawn per pair and epoch); a cached "
                  "vision tower caches both"},
    )  # fmt: skip
    freeze_batch_norm: bool = field(
        default=True, metadata={"help": "keep the towers' BatchNorm statistics fixed (eval mode)"}
    )
    cache_tower_outputs: bool = field(
        default=True, metadata={"help": "compute a frozen tower's outputs once and train on them"}
    )
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "where cached tower outputs live (default: OUTPUT_DIR/feature_cache)"}
    )
    feature_cache_dtype: str = field(default="float16", metadata={"help": "float32 | float16 | bfloat16"})
    feature_cache_backend: str = field(
        default="auto",
        metadata={"help": "frozen-tower cache pass: auto (onnxruntime if installed, on CPU) | onnx | torch"},
    )
    feature_cache_workers: int = field(
        default=2, metadata={"help": "DataLoader workers decoding images for the frozen-tower cache pass"}
    )
    max_logit_scale: float = field(default=100.0, metadata={"help": "clamp exp(logit_scale) to this"})
    negatives: str = field(
        default="global", metadata={"help": "global: gather all processes' pairs (with grads) | local"}
    )
    vse_warmup_epochs: float = field(
        default=0.0, metadata={"help": "vse_hinge: epochs of all-negatives loss before max violation"}
    )
    sketch_init_batches: int = field(
        default=4, metadata={"help": "batches of token features for the sketch's median init (0: none)"}
    )
    sketch_warmup_epochs: float = field(
        default=0.0,
        metadata={"help": "concat fusion: epochs trained with the sketch off (lambda = 0); the DLSH partition "
                  "is then drawn on the tokens the trained projections make and lambda switched on"},
    )  # fmt: skip
    alignment_weight: float = field(
        default=0.0,
        metadata={"help": "weight of a contrastive loss on the token-level alignment scores (TERAN), added to "
                  "the loss (0: off)"},
    )  # fmt: skip
    alignment_loss_type: str = field(
        default="vse_hinge", metadata={"help": "loss on the alignment scores: vse_hinge (TERAN) | info_nce"}
    )
    itm_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the matching head's BCE on positives and hard negatives mined by the dual "
                  "encoder (0: off); trains a TemdeForImageTextRetrieval"},
    )  # fmt: skip
    itm_negatives: str = field(
        default="sample",
        metadata={"help": "sample: one negative per query drawn by the softmax of the dual encoder's scores "
                  "(ALBEF/BLIP) | hardest: its highest-scoring negative"},
    )  # fmt: skip
    itm_detach_tokens: bool = field(
        default=False,
        metadata={"help": "train the matching head on top of the dual encoder: its loss does not reach the tokens"},
    )  # fmt: skip
    distill_weight: float = field(
        default=0.0,
        metadata={"help": "weight of KL(teacher || dual encoder) over each query's in-batch candidates (0: off)"},
    )  # fmt: skip
    distill_teacher: str = field(
        default="alignment",
        metadata={"help": "alignment: the alignment scores over the whole batch | itm: the matching head over "
                  "the positive and the dual encoder's top distill_topk - 1"},
    )  # fmt: skip
    distill_topk: int = field(default=8, metadata={"help": "candidates per query of the itm teacher"})
    distill_temperature: float = field(
        default=1.0,
        metadata={"help": "the teacher's logits (scale x alignment score, or match logits) / this"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "delete a previous run's checkpoints and results in output_dir"}
    )
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    save_total_limit: int = field(default=3, metadata={"help": "keep the last N checkpoints"})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0: every epoch)"})
    metric_for_best_model: str = field(default="rsum")
    logging_steps: int = field(default=10)
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | none"})
    stop_after_steps: int = field(
        default=-1, metadata={"help": "simulate a pre-emption: checkpoint and stop after N steps"}
    )
    disable_tqdm: bool = field(default=False)


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TemdeTrainingArguments)


def _read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML/JSON settings file into a flat dict (sections ``model``/``data``/``training`` merged)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise FileNotFoundError(f"training config {path} cannot be read: {error}") from error
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of setting -> value at the top level")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _check_keys(values: dict[str, Any], source: Path) -> None:
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{source}: unknown setting(s) {unknown}; see `train_temde.py --help` for the valid names"
        )


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TemdeTrainingArguments]:
    """Parse ``[CONFIG.yaml|json] [--flag value ...]``: file values first, CLI flags over them.

    Args:
        argv: Arguments without the program name (``None``: an empty list, never ``sys.argv``).

    Returns:
        The three settings dataclasses.

    Raises:
        ValueError: An unknown key in the config file, or an invalid choice.
    """
    argv = list(argv or [])
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        path = Path(argv.pop(0))
        values = _read_config_file(path)
        _check_keys(values, path)
        # file values become the parser's defaults, so explicit flags still win
        parser.set_defaults(**values)
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    validate(model_args, data_args, train_args)
    return model_args, data_args, train_args


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"--{name} {value!r} is not one of {list(allowed)}")


def validate(model_args: ModelArguments, data_args: DataArguments, args: TemdeTrainingArguments) -> None:
    """Reject inconsistent settings early, naming the flag and the fix."""
    _choice("mixed_precision", args.mixed_precision, ("no", "fp16", "bf16"))
    _choice("lr_scheduler_type", args.lr_scheduler_type, ("cosine", "step", "constant"))
    _choice("negatives", args.negatives, ("global", "local"))
    _choice("report_to", args.report_to, ("tensorboard", "none"))
    LOSSES.check(args.loss_type, label=f"--loss_type {args.loss_type!r}")
    _choice("sampling", args.sampling, ("pairs", "images"))
    _choice("feature_cache_dtype", args.feature_cache_dtype, ("float32", "float16", "bfloat16"))
    _choice("feature_cache_backend", args.feature_cache_backend, ("auto", "onnx", "torch"))
    _choice("alignment_loss_type", args.alignment_loss_type, tuple(SCORE_LOSSES))
    _choice("itm_negatives", args.itm_negatives, ("sample", "hardest"))
    _choice("distill_teacher", args.distill_teacher, ("alignment", "itm"))
    for name in ("alignment_weight", "itm_weight", "distill_weight"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name} {value} must be a finite number >= 0 (0 turns the term off)")
    if args.distill_topk < 2:
        raise ValueError("--distill_topk must be >= 2 (the positive and at least one candidate)")
    if not math.isfinite(args.distill_temperature) or args.distill_temperature <= 0:
        raise ValueError("--distill_temperature must be a finite number > 0")
    if data_args.cv_folds == 1 or data_args.cv_folds < 0:
        raise ValueError("--cv_folds must be 0 (no cross-validation) or at least 2")
    if data_args.cv_folds and not 0 <= data_args.cv_fold < data_args.cv_folds:
        raise ValueError(f"--cv_fold {data_args.cv_fold} must be in 0 .. {data_args.cv_folds - 1}")
    for tower in ("vision", "text"):
        layers = getattr(args, f"{tower}_trainable_layers")
        if layers is not None and layers < 0:
            raise ValueError(
                f"--{tower}_trainable_layers must be >= 0 (leave it unset to train the whole tower)"
            )
    sources = [model_args.init_from, model_args.model_config, model_args.vision_model_path]
    if sum(s is not None for s in sources) != 1:
        raise ValueError(
            "give exactly one model source: --vision_model_path + --text_model_path (pretrained towers), "
            "--model_config (random init) or --init_from (a saved TemdeModel)"
        )
    if model_args.vision_model_path is not None and model_args.text_model_path is None:
        raise ValueError("--vision_model_path needs --text_model_path (the text tower folder)")
    if data_args.data is None and data_args.synthetic_images <= 0:
        raise ValueError("no training data: set --data (e.g. a Karpathy split JSON) or --synthetic_images N")
    if args.per_device_train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise ValueError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")
    if args.max_logit_scale <= 1.0:
        raise ValueError("--max_logit_scale must be > 1 (it bounds exp(logit_scale); CLIP uses 100)")


def save_run_settings(
    output_dir: str | Path,
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TemdeTrainingArguments,
) -> Path:
    """Write the resolved settings to ``output_dir/run_settings.yaml`` (re-usable as a config file).

    Returns:
        The written path.
    """
    path = Path(output_dir) / "run_settings.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "training": dataclasses.asdict(train_args),
    }
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path


def needs_matching_head(args: TemdeTrainingArguments) -> bool:
    """Whether the run trains (or distils from) the matching head, so the model must have one."""
    return args.itm_weight > 0 or (args.distill_weight > 0 and args.distill_teacher == "itm")


def trainable_layers(args: TemdeTrainingArguments) -> dict[str, int | None]:
    """Per tower: ``None`` (train all), ``0`` (frozen) or the number of top blocks that train."""
    return {
        "vision": 0 if args.freeze_vision_tower else args.vision_trainable_layers,
        "text": 0 if args.freeze_text_tower else args.text_trainable_layers,
    }
