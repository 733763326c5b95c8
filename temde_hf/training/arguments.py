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
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..loading import require_folder
from ..models.temde.configuration_temde import TemdeConfig
from ..models.temde.loss_temde import LOSSES, SCORE_LOSSES

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
SECTIONS = ("model", "data", "training")
logger = logging.getLogger(__name__)


@dataclass
class _ModelSources:
    """Where the model comes from: the towers (local folders), a full model config, or a saved model."""

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

    def config_overrides(self) -> dict[str, Any]:
        """The architecture fields that were set, as `TemdeConfig` keyword arguments."""
        values = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        return {name: value for name, value in values.items() if value is not None}


_FLAG_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list[int]": list[int]}


def _config_docs(config_class: type) -> dict[str, str]:
    """Field -> its description in the config class's ``Args:`` docstring (one line, backticks kept)."""
    doc = (config_class.__doc__ or "").split("Args:", 1)[-1].split("Example:", 1)[0]
    entries = re.split(r"\n\s{8}(?=\w+ \(`)", doc)  # entries start at 8 spaces: "name (`type`, ...): ..."
    out = {}
    for entry in entries:
        match = re.match(r"\s*(\w+) \(`[^`]*`(?:, [^)]*)?\):\s*(.*)", entry, re.DOTALL)
        if match:
            out[match.group(1)] = " ".join(match.group(2).split())
    return out


def _architecture_fields(config_class: type) -> list[tuple[str, Any, Any]]:
    """One optional flag per architecture parameter of `config_class` (its own fields, the towers left out):
    typed as the config types it, its help the config's docstring, its default ``None`` (the config's own)."""
    docs = _config_docs(config_class)
    out = []
    own = vars(config_class).get("__annotations__", {})  # not the fields PreTrainedConfig has for every model
    for config_field in dataclasses.fields(config_class):
        name = config_field.name
        if name not in own or name in ("vision_config", "text_config"):
            continue
        base = str(config_field.type).replace(" | None", "")
        help_text = docs.get(name, f"see {config_class.__name__}").replace("%", "%%")  # argparse formats help
        out.append((name, _FLAG_TYPES[base] | None, field(default=None, metadata={"help": help_text})))
    return out


# The model flags are `TemdeConfig`'s architecture parameters, derived from the config class (names, types,
# help), so a new config field is a new flag (and a `model:` key of a config file) without an edit here.
ModelArguments = dataclasses.make_dataclass(
    "ModelArguments",
    _architecture_fields(TemdeConfig),
    bases=(_ModelSources,),
    namespace={
        "__module__": __name__,
        "__doc__": "What to train: the towers (local folders), a full model config or a saved model, and "
        "overrides of any `TemdeConfig` architecture field (``--n_sketches 16``; unset: the config's value).",
    },
)
# The cached lower part of a partly trained vision tower holds one hidden state (the cut's), not the maps
# the sketch also reads; the top blocks would have to return them too (`tower_split`), which they do not.
SPLIT_WITH_FEATURE_LAYERS = (
    "--sketch_vision_feature_layers with --vision_trainable_layers N is not supported (the cached lower part "
    "of a partly trained tower has no hidden states for the sketch): train the whole vision tower, freeze it "
    "(--freeze_vision_tower true), or set --cache_tower_outputs false"
)
ARCHITECTURE_FIELDS = tuple(name for name, _, _ in _architecture_fields(TemdeConfig))
# The integer fields: counts and sizes (dims, heads, layers, N, H, K, chunk), every one >= 1.
ARCHITECTURE_COUNTS = tuple(name for name, kind, _ in _architecture_fields(TemdeConfig) if kind == int | None)


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
    image_column: str | None = field(
        default=None,
        metadata={
            "help": "parquet / Hub / streamed data: the column of the images (default: image; auto when streaming)"
        },
    )
    caption_column: str | None = field(
        default=None,
        metadata={"help": "parquet / Hub / streamed data: the column of the captions, a list or one per row "
                  "(default: captions; auto when streaming)"},
    )  # fmt: skip
    dataloader_num_workers: int = field(default=0)
    # Streaming (`temde_hf.data.streaming`): train from a stream instead of --data; needs --max_steps.
    streaming: bool = field(
        default=False, metadata={"help": "train from --train_files or --dataset_name as a stream (no length)"}
    )
    train_files: str | None = field(
        default=None, metadata={"help": "streaming: glob of .parquet or webdataset .tar shards"}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id (or local folder), split --train_split: streamed with --streaming, "
            "else read like --data (run_clip's name)"
        },
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "streaming: examples per shuffle block (held in memory)"}
    )
    streaming_log_keys: bool = field(
        default=False, metadata={"help": "streaming: log each step's sample keys to OUTPUT_DIR/stream_keys/"}
    )

    def loader_kwargs(self) -> dict[str, str]:
        """The column names that were set, as `load_hub_dataset` keyword arguments."""
        columns = {"image_column": self.image_column, "captions_column": self.caption_column}
        return {k: v for k, v in columns.items() if v is not None}


@dataclass
class TemdeTrainingArguments:
    """How to train: schedule, optimisation, negatives, checkpoints, evaluation and logging."""

    output_dir: str = field(default="outputs/temde", metadata={"help": "run folder (created)"})
    seed: int = field(default=42)
    num_train_epochs: float = field(default=1.0)
    max_steps: int = field(default=-1, metadata={"help": "> 0 overrides num_train_epochs"})
    per_device_train_batch_size: int = field(
        default=32,
        metadata={"help": "pairs per process in one forward (a micro-batch with gradient caching)"},
    )
    gradient_cache_micro_batches: int = field(
        default=1,
        metadata={"help": "gradient caching: a contrastive batch is this many micro-batches of "
                  "per_device_train_batch_size pairs per process, all negatives of each other (the memory of "
                  "one micro-batch, the gradients of the whole batch, one extra forward)"},
    )  # fmt: skip
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "as in transformers: sum the gradients of N contrastive batches per optimizer step "
                  "(each batch's pairs are negatives only of each other; gradient caching keeps them all)"},
    )  # fmt: skip
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
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={"help": "a transformers schedule (linear | cosine | cosine_with_restarts | polynomial | "
                  "constant | constant_with_warmup | inverse_sqrt | cosine_with_min_lr | ...) or step "
                  "(VSE++: x lr_step_gamma every lr_step_epochs)"},
    )  # fmt: skip
    lr_scheduler_kwargs: str | None = field(
        default=None,
        metadata={"help": 'more arguments of the schedule, a JSON object (e.g. {"min_lr_rate": 0.1})'},
    )
    warmup_steps: int = field(default=0)
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "fraction of the steps; used when warmup_steps is 0"}
    )
    lr_step_size: int = field(
        default=0, metadata={"help": "step schedule: decay every N steps (0: per epoch)"}
    )
    lr_step_epochs: float = field(
        default=0.0, metadata={"help": "step schedule: decay every N epochs (overrides lr_step_size)"}
    )
    lr_step_gamma: float = field(default=0.1, metadata={"help": "step schedule: decay factor"})
    max_grad_norm: float = field(
        default=2.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"}
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (accelerate's autocast)"})
    fp16: bool = field(
        default=False, metadata={"help": "float16 mixed precision with loss scaling (GPU only)"}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "deprecated: use --bf16 true or --fp16 true"}
    )
    torch_compile: bool = field(default=False, metadata={"help": "compile the model with torch.compile"})
    torch_compile_backend: str | None = field(
        default=None, metadata={"help": "torch.compile backend (default: inductor); implies --torch_compile"}
    )
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode (default | reduce-overhead | max-autotune)"}
    )
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
        default=True,
        metadata={
            "help": "compute a frozen tower's outputs (or the frozen part below a tower's trainable "
            "layers) once and train on them"
        },
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
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "a checkpoint folder, or true (= latest) to continue this output_dir's run"},
    )
    resume: str | None = field(default=None, metadata={"help": "deprecated: use --resume_from_checkpoint"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0: every epoch)"})
    metric_for_best_model: str = field(default="rsum")
    logging_steps: int = field(default=10)
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "accelerate trackers, comma-separated: tensorboard, wandb, mlflow, comet_ml, aim, "
                  "clearml, dvclive, swanlab, trackio; all (every installed one) | none"},
    )  # fmt: skip
    push_to_hub: bool = field(
        default=False, metadata={"help": "upload the final model (with its card) to the Hub after training"}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "the Hub repo, user/name (default: the output_dir's name)"}
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: the logged-in one); never written to the run"}
    )
    hub_private_repo: bool | None = field(default=None, metadata={"help": "create the Hub repo as private"})
    stop_after_steps: int = field(
        default=-1, metadata={"help": "simulate a pre-emption: checkpoint and stop after N steps"}
    )
    disable_tqdm: bool = field(default=False)


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TemdeTrainingArguments)
FIELD_NAMES = frozenset(f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls))

# Settings of transformers' contrastive-image-text example (run_clip.py, its TrainingArguments) that mean
# the same thing here under another name. (Most TrainingArguments names are the same here already.)
RUN_CLIP_NAMES = {
    "model_name_or_path": "init_from",
    "train_file": "data",
    "max_seq_length": "max_text_length",
    "image_processor_name": "image_processor_path",
    "tokenizer_name": "tokenizer_path",
    "freeze_vision_model": "freeze_vision_tower",
    "freeze_text_model": "freeze_text_tower",
    "token": "hub_token",
}
# run_clip settings that change nothing here: accepted, with a warning saying why.
NO_OP_NAMES = {
    "do_train": "this command always trains",
    "remove_unused_columns": "the collator reads only the image and caption columns",
    "overwrite_cache": "nothing is preprocessed into a datasets cache",
    "use_fast_tokenizer": "the tokenizer folder decides",
    "trust_remote_code": "T-EMDE's own classes load every checkpoint",
    "use_auth_token": "the Hub token is --hub_token (default: the logged-in one)",
}
# run_clip settings with no counterpart here: the fix for each.
UNSUPPORTED_NAMES = {
    "validation_file": "the evaluation images are --data's --eval_split",
    "test_file": "score a trained model with `temde-hf evaluate`",
    "do_predict": "score a trained model with `temde-hf evaluate`",
    "max_train_samples": "use --max_train_images (it counts images, each with all its captions)",
    "max_eval_samples": "use --max_eval_images (it counts images, each with all its captions)",
    "config_name": "use --model_config (a TemdeConfig JSON)",
    "dataset_config_name": "point --data at the dataset's files or a Hub id without a config",
    "data_dir": "point --data at the dataset and --image_root at its images",
    "cache_dir": "towers are read from local folders (--vision_model_path, --text_model_path)",
    "model_revision": "towers are read from local folders (--vision_model_path, --text_model_path)",
    "preprocessing_num_workers": "use --dataloader_num_workers",
}
_TRUE, _FALSE = {"true", "1", "yes", "y"}, {"false", "0", "no", "n"}


def _truthy(value: Any) -> bool | None:
    """A bool setting's value (``None``: not a boolean)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML/JSON settings file into a flat dict (sections ``model``/``data``/``training`` merged)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise FileNotFoundError(f"training config {path} cannot be read: {error}") from error
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"{path}: not valid {kind} ({' '.join(str(error).split())}); fix the file") from None
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


def _translate(values: dict[str, Any], source: str, flag: str = "") -> tuple[dict[str, Any], list[str]]:
    """Map run_clip names to ours, drop no-op settings (warning), and list one problem line per bad key.

    Args:
        values: Setting name -> value.
        source: Where they come from (the config file, or "command line"), for the messages.
        flag: ``"--"`` for command-line flags, so the messages show them as typed.

    Returns:
        The settings under our names, and the problems (one line each; empty when all are known).
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    do_eval = None
    for key, value in values.items():
        name = RUN_CLIP_NAMES.get(key, key)
        if name in FIELD_NAMES:
            if name in out and name != key:
                problems.append(
                    f"{source}: {flag}{key} and {flag}{name} are the same setting; keep {flag}{name}"
                )
            out.setdefault(name, value) if name != key else out.update({name: value})
        elif key == "do_eval":
            do_eval = _truthy(value)
        elif key in NO_OP_NAMES:
            if key == "do_train" and _truthy(value) is False:
                problems.append(f"{source}: {flag}do_train false: this command only trains; drop the setting")
            else:
                logger.warning("%s: %s%s ignored (%s)", source, flag, key, NO_OP_NAMES[key])
        elif key in UNSUPPORTED_NAMES:
            problems.append(
                f"{source}: {flag}{key} is not a setting of this trainer; {UNSUPPORTED_NAMES[key]}"
            )
        else:
            problems.append(
                f"{source}: unknown setting {flag}{key}; see `temde-hf train --help` for the valid names"
            )
    if do_eval is False:  # run_clip's switch for evaluation: our --eval_split none
        out.setdefault("eval_split", "none")
    return out, problems


def _flag_values(argv: list[str]) -> list[tuple[str, list[str]]]:
    """``--name value ...`` tokens as (name, values); ``--name=value`` split. Values never start with ``--``."""
    pairs: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            pairs.append((name.replace("-", "_"), [value] if eq else []))  # --max-steps is --max_steps
        elif pairs:
            pairs[-1][1].append(token)
        else:
            raise ValueError(
                f"unexpected argument {token!r}: settings are --flag value pairs after the config file"
            )
    return pairs


def _translate_argv(argv: list[str]) -> list[str]:
    """The command line with run_clip's flags under our names (see `_translate`)."""
    if "-h" in argv or "--help" in argv:
        return argv  # the parser prints the help and exits
    pairs = _flag_values(argv)
    known = {name: values for name, values in pairs}
    translated, problems = _translate(
        {name: (values[0] if len(values) == 1 else values or "true") for name, values in pairs},
        "command line",
        "--",
    )
    if problems:
        raise ValueError("\n".join(problems))
    out: list[str] = []
    for name, value in translated.items():
        values = known.get(name)
        if values is None:  # a mapped name: its value as given under the run_clip name
            values = value if isinstance(value, list) else [str(value)]
        if name == "report_to" and len(values) > 1:  # transformers' `--report_to a b` form
            values = [",".join(values)]
        out += [f"--{name}", *values]
    return out


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TemdeTrainingArguments]:
    """Parse ``[CONFIG.yaml|json] [--flag value ...]``: file values first, CLI flags over them.

    Settings named as in transformers' ``run_clip.py`` example are mapped to ours (`RUN_CLIP_NAMES`),
    the ones that change nothing here are ignored with a warning (`NO_OP_NAMES`).

    Args:
        argv: Arguments without the program name (``None``: an empty list, never ``sys.argv``).

    Returns:
        The three settings dataclasses.

    Raises:
        ValueError: Unknown settings (one line per setting, naming it), or an invalid value.
    """
    argv = list(argv or [])
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        path = Path(argv.pop(0))
        values, problems = _translate(_read_config_file(path), str(path))
        if problems:
            raise ValueError("\n".join(problems))
        if isinstance(values.get("report_to"), list):  # transformers' list form
            values["report_to"] = ",".join(map(str, values["report_to"]))
        # file values become the parser's defaults, so explicit flags still win
        parser.set_defaults(**values)
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=_translate_argv(argv))
    if data_args.dataset_name is not None and not data_args.streaming:
        # run_clip's --dataset_name names the data a map-style run reads: our --data (one source, not both)
        if data_args.data is not None:
            raise ValueError("--dataset_name and --data name the same thing; keep one")
        data_args.data, data_args.dataset_name = data_args.dataset_name, None
    validate(model_args, data_args, train_args)
    return model_args, data_args, train_args


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"--{name} {value!r} is not one of {list(allowed)}")


def _check_number(
    name: str, value: float | None, low: float, high: float = math.inf, *, low_open: bool = False,
    high_open: bool = False, note: str = "",
) -> None:  # fmt: skip
    """Refuse a value outside ``low .. high`` (open ends excluded), NaN or inf, naming the flag and the range."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf:
            rule = f"{'>' if low_open else '>='} {low:g}"
        else:
            rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"--{name} {value!r} must be a finite number {rule}{note}")


# Optimizer steps of these schedules need no more than the run's length and warm-up; the others
# (reduce_lr_on_plateau, greedy) need the evaluation loss and are not offered.
TRANSFORMERS_SCHEDULES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)  # fmt: skip
SCHEDULES = (*TRANSFORMERS_SCHEDULES, "step")


def report_to_list(value: str | list[str] | None) -> list[str]:
    """``--report_to`` as accelerate tracker names (``[]`` for none; ``["all"]`` for every installed one)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    names = list(dict.fromkeys(str(item).strip().lower() for item in items if str(item).strip()))
    return [] if names in ([], ["none"]) else names


def _check_trackers(names: list[str]) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name == "none" and len(names) > 1:
            raise ValueError(f"--report_to {','.join(names)}: 'none' cannot be combined with trackers")
        if name == "all":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"--report_to {name!r} is not one of {sorted(LOGGER_TYPE_TO_CLASS)} (or all / none)"
            )
        if name not in installed:
            raise ValueError(
                f"--report_to {name}: the {name} package is not installed; pip install {name}, or report "
                f"to an installed tracker ({', '.join(sorted(installed)) or 'none is installed'}) or none"
            )


def _resolve_deprecated(args: TemdeTrainingArguments) -> None:
    """Move the deprecated ``--resume`` / ``--mixed_precision`` to their transformers names (warning)."""
    if args.resume is not None:
        logger.warning(
            "--resume is deprecated: use --resume_from_checkpoint (a folder, or true for the latest)"
        )
        if args.resume_from_checkpoint is not None and args.resume_from_checkpoint != args.resume:
            raise ValueError(
                "--resume and --resume_from_checkpoint differ: give only --resume_from_checkpoint"
            )
        args.resume_from_checkpoint, args.resume = args.resume, None
    if args.mixed_precision is not None:
        _choice("mixed_precision", args.mixed_precision, ("no", "fp16", "bf16"))
        logger.warning("--mixed_precision is deprecated: use --bf16 true or --fp16 true")
        args.bf16 = args.bf16 or args.mixed_precision == "bf16"
        args.fp16 = args.fp16 or args.mixed_precision == "fp16"
        args.mixed_precision = None
    value = args.resume_from_checkpoint
    if value is not None:  # transformers' forms: a folder, or True for the latest checkpoint
        flag = _truthy(value)
        args.resume_from_checkpoint = (
            None if flag is False else "latest" if flag or value == "latest" else value
        )


def mixed_precision(args: TemdeTrainingArguments) -> str:
    """accelerate's ``mixed_precision`` of ``--bf16`` / ``--fp16``."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "no"


def validate(model_args: ModelArguments, data_args: DataArguments, args: TemdeTrainingArguments) -> None:
    """Reject inconsistent settings early, naming the flag and the fix.

    Also moves deprecated flags to their new names and normalises ``--report_to`` and
    ``--resume_from_checkpoint``, so the recorded settings use one name for each.
    """
    _resolve_deprecated(args)
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 exclude each other: pick one")
    if args.torch_compile_backend is not None or args.torch_compile_mode is not None:
        args.torch_compile = True  # as in transformers
    _choice("lr_scheduler_type", args.lr_scheduler_type, SCHEDULES)
    _choice("negatives", args.negatives, ("global", "local"))
    trackers = report_to_list(args.report_to)
    _check_trackers(trackers)
    args.report_to = ",".join(trackers) or "none"
    LOSSES.check(args.loss_type, label=f"--loss_type {args.loss_type!r}")
    _choice("sampling", args.sampling, ("pairs", "images"))
    _choice("feature_cache_dtype", args.feature_cache_dtype, ("float32", "float16", "bfloat16"))
    _choice("feature_cache_backend", args.feature_cache_backend, ("auto", "onnx", "torch"))
    _choice("alignment_loss_type", args.alignment_loss_type, tuple(SCORE_LOSSES))
    _choice("itm_negatives", args.itm_negatives, ("sample", "hardest"))
    _choice("distill_teacher", args.distill_teacher, ("alignment", "itm"))
    _validate_numbers(model_args, data_args, args)
    if args.lr_scheduler_type == "constant" and (args.warmup_steps or args.warmup_ratio):
        raise ValueError(
            "--lr_scheduler_type constant has no warm-up (as in transformers): use constant_with_warmup, "
            "or set --warmup_steps 0 and --warmup_ratio 0"
        )
    if data_args.cv_folds == 1:
        raise ValueError("--cv_folds must be 0 (no cross-validation) or at least 2")
    if data_args.cv_folds and not 0 <= data_args.cv_fold < data_args.cv_folds:
        raise ValueError(f"--cv_fold {data_args.cv_fold} must be in 0 .. {data_args.cv_folds - 1}")
    sources = [model_args.init_from, model_args.model_config, model_args.vision_model_path]
    if sum(s is not None for s in sources) != 1:
        raise ValueError(
            "give exactly one model source: --vision_model_path + --text_model_path (pretrained towers), "
            "--model_config (random init) or --init_from (a saved TemdeModel)"
        )
    if model_args.vision_model_path is not None and model_args.text_model_path is None:
        raise ValueError("--vision_model_path needs --text_model_path (the text tower folder)")
    for name in (
        "init_from",
        "vision_model_path",
        "text_model_path",
        "image_processor_path",
        "tokenizer_path",
    ):
        if getattr(model_args, name) is not None:  # a mistyped folder is never looked up on the Hub
            fix = "pass an existing folder written by save_pretrained" + (
                "" if name == "init_from" else " (a Hub id has the form ORG/NAME)"
            )
            require_folder(getattr(model_args, name), f"--{name}", fix, hub_ids=name != "init_from")
    if data_args.data is None and data_args.synthetic_images <= 0 and not data_args.streaming:
        raise ValueError(
            "no training data: set --data (e.g. a Karpathy split JSON), --synthetic_images N or --streaming"
        )
    if data_args.data is None and not data_args.streaming and data_args.synthetic_images < 2:
        raise ValueError(
            "--synthetic_images must be >= 2: a contrastive batch needs at least two distinct images"
        )
    if args.gradient_accumulation_steps > 1 and args.gradient_cache_micro_batches == 1:
        # the name meant gradient caching here before it took transformers' meaning: say what it does now
        logger.warning(
            "--gradient_accumulation_steps %d: each of the %d batches of a step has only its own pairs as "
            "negatives; --gradient_cache_micro_batches %d keeps all of them as negatives of each other",
            *(args.gradient_accumulation_steps,) * 3,
        )
    if args.push_to_hub and args.stop_after_steps > 0:
        raise ValueError("--push_to_hub with --stop_after_steps: a stopped run has no final model to push")
    split = trainable_layers(args)["vision"]
    if model_args.sketch_vision_feature_layers and split and args.cache_tower_outputs:
        raise ValueError(SPLIT_WITH_FEATURE_LAYERS)


def _validate_numbers(
    model_args: ModelArguments, data_args: DataArguments, args: TemdeTrainingArguments
) -> None:
    """Every numeric flag within its range (NaN and inf refused everywhere)."""
    for name in ARCHITECTURE_COUNTS:
        _check_number(name, getattr(model_args, name), 1)
    _check_number("sketch_temperature", model_args.sketch_temperature, 0, low_open=True)
    _check_number("sketch_weight", model_args.sketch_weight, 0)
    _check_number("synthetic_images", data_args.synthetic_images, 0, note=" (0: use --data)")
    _check_number("cv_folds", data_args.cv_folds, 0, note=" (0: no cross-validation, else >= 2)")
    _check_number(
        "max_train_images", data_args.max_train_images, 2, note=" (a contrastive batch needs 2 images)"
    )
    _check_number("max_eval_images", data_args.max_eval_images, 0, note=" (0: no evaluation)")
    _check_number("max_text_length", data_args.max_text_length, 3, note=" (tokens, with [CLS] and [SEP])")
    _check_number("dataloader_num_workers", data_args.dataloader_num_workers, 0)
    _check_number("num_train_epochs", args.num_train_epochs, 0, low_open=True)
    if args.max_steps != -1:
        _check_number("max_steps", args.max_steps, 1, note=" (or -1: use --num_train_epochs)")
    for name in ("per_device_train_batch_size", "gradient_cache_micro_batches", "gradient_accumulation_steps",
                 "per_device_eval_batch_size", "logging_steps", "save_total_limit"):  # fmt: skip
        _check_number(name, getattr(args, name), 1)
    _check_number("margin", args.margin, 0)
    _check_number("learning_rate", args.learning_rate, 0, low_open=True)
    _check_number("vision_lr_multiplier", args.vision_lr_multiplier, 0)
    _check_number("text_lr_multiplier", args.text_lr_multiplier, 0)
    _check_number("weight_decay", args.weight_decay, 0)
    _check_number("adam_beta1", args.adam_beta1, 0, 1, high_open=True)
    _check_number("adam_beta2", args.adam_beta2, 0, 1, high_open=True)
    _check_number("adam_epsilon", args.adam_epsilon, 0, low_open=True)
    _check_number("warmup_steps", args.warmup_steps, 0)
    _check_number("warmup_ratio", args.warmup_ratio, 0, 1, note=" (a fraction of the run's steps)")
    _check_number("lr_step_size", args.lr_step_size, 0, note=" (0: every epoch)")
    _check_number("lr_step_epochs", args.lr_step_epochs, 0, note=" (0: use --lr_step_size)")
    _check_number("lr_step_gamma", args.lr_step_gamma, 0, 1, low_open=True)
    _check_number("max_grad_norm", args.max_grad_norm, 0, note=" (0: no clipping)")
    _check_number(
        "max_logit_scale",
        args.max_logit_scale,
        1,
        low_open=True,
        note=" (it bounds exp(logit_scale); CLIP uses 100)",
    )
    _check_number("vse_warmup_epochs", args.vse_warmup_epochs, 0)
    _check_number("sketch_init_batches", args.sketch_init_batches, 0, note=" (0: no median init)")
    _check_number("sketch_warmup_epochs", args.sketch_warmup_epochs, 0)
    for name in ("alignment_weight", "itm_weight", "distill_weight"):
        _check_number(name, getattr(args, name), 0, note=" (0 turns the term off)")
    _check_number("distill_topk", args.distill_topk, 2, note=" (the positive and at least one candidate)")
    _check_number("distill_temperature", args.distill_temperature, 0, low_open=True)
    for tower in ("vision", "text"):
        _check_number(f"{tower}_trainable_layers", getattr(args, f"{tower}_trainable_layers"), 0,
                      note=" (leave it unset to train the whole tower)")  # fmt: skip
    _check_number("save_steps", args.save_steps, 0, note=" (0: only at the end)")
    _check_number("eval_steps", args.eval_steps, 0, note=" (0: every epoch)")
    if args.stop_after_steps != -1:
        _check_number("stop_after_steps", args.stop_after_steps, 1, note=" (or -1: no simulated stop)")


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
        "training": recordable(train_args),
    }
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path


def recordable(args: TemdeTrainingArguments) -> dict[str, Any]:
    """The training settings as written to the run folder, the card and trackers: secrets left out."""
    values = dataclasses.asdict(args)
    values["hub_token"] = None  # a credential: never written anywhere
    return values


# The settings that decide which pairs each optimizer step sees, in which order: a resume with other
# values would not continue the run it resumes (`checkpointing.check_resume_settings`).
DATA_ORDER_SETTINGS = (
    "per_device_train_batch_size", "gradient_cache_micro_batches", "gradient_accumulation_steps", "seed",
    "sampling", "image_flip_augmentation",
    "data", "data_format", "image_root", "synthetic_images", "train_split", "cv_folds", "cv_fold", "cv_seed",
    "max_train_images", "image_column", "caption_column",
)  # fmt: skip


def data_order_settings(
    data_args: DataArguments, args: TemdeTrainingArguments, num_processes: int
) -> dict[str, Any]:
    """`DATA_ORDER_SETTINGS` of this run, and the number of processes (``num_processes``)."""
    values = {**dataclasses.asdict(data_args), **dataclasses.asdict(args)}
    return {**{name: values[name] for name in DATA_ORDER_SETTINGS}, "num_processes": num_processes}


def needs_matching_head(args: TemdeTrainingArguments) -> bool:
    """Whether the run trains (or distils from) the matching head, so the model must have one."""
    return args.itm_weight > 0 or (args.distill_weight > 0 and args.distill_teacher == "itm")


def trainable_layers(args: TemdeTrainingArguments) -> dict[str, int | None]:
    """Per tower: ``None`` (train all), ``0`` (frozen) or the number of top blocks that train."""
    return {
        "vision": 0 if args.freeze_vision_tower else args.vision_trainable_layers,
        "text": 0 if args.freeze_text_tower else args.text_trainable_layers,
    }
