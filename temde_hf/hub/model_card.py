"""Model cards rendered from data: a checkpoint's config + an evaluation JSON -> ``README.md``.

The card is never written by hand. Its YAML header (``ModelCardData``) carries the Hub metadata and a
``model-index`` built from the same evaluation JSON that fills the results table, so the two cannot
drift apart; the prose comes from ``templates/model_card.md.jinja``.

Metadata a Hub user can rely on:
- ``model-index``: the task is the Hub task the card is tagged with (``zero-shot-image-classification``:
  the Hub has no image-text retrieval task; ``text-retrieval`` is text-only and ``visual-document-retrieval``
  is for documents), each R@K is a ``recall`` metric named by its direction ("image-to-text R@1"),
  values rounded to two decimals; the dataset ``type`` is an id (a Hub dataset id where one is known),
  its ``name`` the readable name.
- ``base_model`` and ``datasets`` hold Hub ids only: a tower or dataset without one (a local folder, the
  converted EfficientNet-Lite0 weights, Flickr8k, which has no official Hub copy) is named in the
  prose instead. Without explicit ``base_models``, the towers' ``_name_or_path`` in ``config.json`` are
  used when they are Hub ids (a model composed from Hub towers records them).

Evaluation JSON: the ``metrics.json`` of ``temde-hf evaluate``
(``{"full": {"i2t_r1": .., "t2i_r10": .., "rsum": ..}, "split": "test", "data": .., "n_images": ..}``)
or the nested form it is converted to::

    {"dataset": "flickr8k", "split": "test", "n_images": 100, "n_captions": 500,
     "i2t": {"R@1": .., "R@5": .., "R@10": .., "medr": .., "meanr": ..},
     "t2i": {...}, "rsum": ..}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..models.temde import TemdeConfig

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md.jinja"

DEFAULT_TAGS = ["temde", "emde", "sketch", "image-text-retrieval", "cross-modal-retrieval", "dual-encoder"]
# Widget of the Hub page: the pipeline tag makes it a zero-shot image classifier.
DEFAULT_WIDGET = [
    {
        "src": "https://huggingface.co/datasets/mishig/sample_images/resolve/main/cat-dog-music.png",
        "candidate_labels": "a dog playing music, a cat, a bicycle",
        "example_title": "Dog playing music",
    }
]
RECALL_KEYS = ("R@1", "R@5", "R@10")
RANK_KEYS = ("medr", "meanr")
METRIC_NAMES = {"R@1": "R@1", "R@5": "R@5", "R@10": "R@10", "medr": "median rank", "meanr": "mean rank"}
DIRECTIONS = {"i2t": "image-to-text", "t2i": "text-to-image"}
# A Hub task id (huggingface.js `PIPELINE_DATA`): the card's pipeline tag, see the module docstring.
TASK_TYPE = "zero-shot-image-classification"
TASK_NAME = "Image-text retrieval"
METRIC_DECIMALS = 2
# Evaluation dataset names (the data folder's name) -> Hub dataset ids, only where an official copy is
# known; every other name stays a plain id in the model-index and out of `datasets:`.
HUB_DATASET_IDS: dict[str, str] = {}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Config fields shown in the card's settings table, in this order (absent ones are left out).
SETTING_KEYS = (
    "projection_dim",
    "embed_dim",
    "pooling",
    "sketch_fusion",
    "sketch_coder",
    "n_sketches",
    "n_hyperplanes",
    "sketch_width",
    "sketch_temperature",
    "learn_sketch_temperature",
    "sketch_weight",
    "token_layer_norm",
    "logit_scale_init_value",
)


def _dataset_name(data: str) -> str:
    """A readable dataset name from the ``data`` path of ``temde-hf evaluate`` (its folder's name)."""
    path = Path(data)
    return (path.parent.name if path.suffix else path.name) or path.stem


def _from_flat(metrics: Mapping[str, Any], block_name: str, source: str) -> dict[str, Any]:
    """Convert the ``temde-hf evaluate`` layout (``{"full": {"i2t_r1": ..}, "data": .., ..}``)."""
    block = metrics.get(block_name)
    if not isinstance(block, Mapping):
        raise ValueError(f"{source}: no {block_name!r} metrics block (has {sorted(metrics)})")
    canonical: dict[str, Any] = {
        "dataset": metrics.get("dataset") or _dataset_name(str(metrics.get("data", ""))),
        "split": metrics.get("split"),
        "n_images": metrics.get("n_images"),
        "n_captions": metrics.get("n_captions"),
        "rsum": block.get("rsum"),
    }
    canonical.update(_directions(block))
    if block_name == "folds_mean":
        canonical["note"] = f"Mean over {len(metrics.get('folds', []))} folds."
    rerank = metrics.get("rerank")
    if isinstance(rerank, Mapping) and isinstance(rerank.get(block_name), Mapping):
        # `temde-hf evaluate --rerank`: the same queries with the second stage, and how it was run
        canonical["second_stage"] = {
            "reranker": rerank.get("reranker"),
            "k": rerank.get("k"),
            "stage1_weight": rerank.get("stage1_weight") or 0,
            "rsum": rerank[block_name].get("rsum"),
            "latency_ms": rerank.get("latency_ms"),
            **_directions(rerank[block_name]),
        }
    return canonical


def _directions(block: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"i2t": {"R@1": .., "medr": ..}, "t2i": {..}}`` from a flat block (``i2t_r1``, ``t2i_medr``, ...)."""
    return {
        direction: {
            key: block[f"{direction}_{key.lower().replace('@', '')}"]
            for key in RECALL_KEYS + RANK_KEYS
            if f"{direction}_{key.lower().replace('@', '')}" in block
        }
        for direction in DIRECTIONS
    }


def load_eval_results(eval_json: str | Path | Mapping[str, Any], *, block: str = "full") -> dict[str, Any]:
    """Read and validate an evaluation JSON, in either layout, as the canonical card dict.

    Args:
        eval_json: path to the ``metrics.json`` written by ``temde-hf evaluate``, or a loaded dict.
            Both its layout (``{"full": {"i2t_r1": ..}, "split": .., "data": ..}``) and the nested
            one of the module docstring are accepted.
        block: which block of the ``temde-hf evaluate`` layout to report: ``"full"`` (the whole
            split) or ``"folds_mean"`` (e.g. COCO 1K).

    Returns:
        ``{"dataset", "split", "n_images", "n_captions", "i2t": {"R@1", ..}, "t2i": {..}, "rsum"}``
        with the numbers exactly as stored.

    Raises:
        ValueError: a required field is missing or not numeric (the message names the file and field).
    """
    source = "<dict>"
    if isinstance(eval_json, (str, Path)):
        source = str(eval_json)
        try:
            metrics = json.loads(Path(eval_json).read_text())
        except FileNotFoundError as err:
            raise ValueError(
                f"evaluation JSON {source} does not exist; run `temde-hf evaluate` first"
            ) from err
    else:
        metrics = dict(eval_json)
    if "i2t" not in metrics:
        metrics = _from_flat(metrics, block, source)
    for field in ("dataset", "split"):
        if not isinstance(metrics.get(field), str) or not metrics[field]:
            raise ValueError(f"{source}: field {field!r} must be a string (e.g. 'flickr8k', 'test')")
    for direction in DIRECTIONS:
        values = metrics.get(direction)
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: field {direction!r} must be an object with R@1/R@5/R@10")
        for key in RECALL_KEYS:
            if not isinstance(values.get(key), (int, float)):
                raise ValueError(
                    f"{source}: field {direction}.{key} (or {direction}_r{key[2:]}) must be a number"
                )
    if not isinstance(metrics.get("rsum"), (int, float)):
        raise ValueError(f"{source}: field 'rsum' must be a number (the sum of the six recalls)")
    return metrics


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub repo id (``owner/name``) and is not a local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def build_eval_results(metrics: Mapping[str, Any], *, dataset_name: str | None = None) -> list[EvalResult]:
    """Turn evaluation metrics into ``model-index`` entries (one task, one dataset, many metrics).

    Args:
        metrics: a validated evaluation dict (see `load_eval_results`).
        dataset_name: readable dataset name; defaults to the dataset id.

    Returns:
        One `EvalResult` per recall (R@1/5/10 of both directions), typed ``recall`` and named e.g.
        "image-to-text R@1", with the value rounded to `METRIC_DECIMALS`. Ranks and RSUM are not
        recalls: the prose table shows them.
    """
    dataset_id = HUB_DATASET_IDS.get(metrics["dataset"], metrics["dataset"])
    common = {
        "task_type": TASK_TYPE,
        "task_name": TASK_NAME,
        "dataset_type": dataset_id,
        "dataset_name": dataset_name or metrics["dataset"],
        "dataset_split": metrics["split"],
    }
    results = []
    for direction, label in DIRECTIONS.items():
        for key in RECALL_KEYS:
            results.append(
                EvalResult(
                    metric_type="recall",
                    metric_name=f"{label} {METRIC_NAMES[key]}",
                    metric_value=round(float(metrics[direction][key]), METRIC_DECIMALS),
                    metric_args={"k": int(key[2:])},
                    **common,
                )
            )
    return results


def read_settings(checkpoint_dir: str | Path) -> dict[str, Any]:
    """T-EMDE settings of a checkpoint, read from its ``config.json`` (no model is built).

    Raises:
        ValueError: ``config.json`` is missing or is not a T-EMDE config.
    """
    config_path = Path(checkpoint_dir) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: pass a folder written by `model.save_pretrained`")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "temde":
        raise ValueError(f"{config_path}: model_type is {config.get('model_type')!r}, expected 'temde'")
    settings: dict[str, Any] = {
        "vision_model_type": (config.get("vision_config") or {}).get("model_type", "?"),
        "text_model_type": (config.get("text_config") or {}).get("model_type", "?"),
    }
    for key in SETTING_KEYS:
        if key in config:
            settings[key] = config[key]
    # The model's own numbers (K and the embedding width follow from the coder's rules), not a recomputation.
    temde_config = TemdeConfig.from_pretrained(Path(checkpoint_dir))
    settings["sketch_width"] = temde_config.sketch_width
    settings["embed_dim"] = temde_config.embed_dim
    return settings


def tower_hub_ids(checkpoint_dir: str | Path) -> list[str]:
    """Hub ids the two towers were loaded from (``_name_or_path`` of the sub-configs), where they are ids."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    names = [(config.get(f"{kind}_config") or {}).get("_name_or_path") or "" for kind in ("vision", "text")]
    return [name for name in names if is_hub_id(name)]


def render_model_card(
    checkpoint_dir: str | Path,
    eval_json: str | Path | Mapping[str, Any] | None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_models: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    training_info: Mapping[str, Any] | None = None,
    run_settings: str | None = None,
    license: str = "apache-2.0",
    tags: Sequence[str] = (),
    widget: list[dict[str, Any]] | None = None,
    dataset_name: str | None = None,
    eval_block: str = "full",
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """Render the model card of a checkpoint from its config and its measured results.

    Args:
        checkpoint_dir: folder written by `save_pretrained` (its ``config.json`` gives the settings).
        eval_json: evaluation JSON path or dict; ``None`` renders a card without results.
        repo_id: Hub repo id used in the usage snippet (``temde-hf publish --repo-id``); without one the
            snippet shows where the id goes.
        model_name: title and ``model-index`` name (defaults to the repo name, else the folder name).
        base_models: the pretrained towers; Hub ids go to ``base_model`` (default: `tower_hub_ids`),
            the others are named in the prose only.
        datasets: the training data; Hub dataset ids go to ``datasets:``, the others are named in the
            prose only. Defaults to the evaluation dataset.
        training_info: flat training settings (epochs, batch size, loss, ...) shown as a table.
        run_settings: the run's exact settings (the YAML `temde-hf train` saves), shown verbatim.
        license: SPDX-style license id of the weights.
        tags: extra tags on top of the T-EMDE ones.
        widget: Hub widget examples; defaults to one zero-shot classification example.
        dataset_name: the evaluation dataset's name (default: from the JSON).
        eval_block: ``"full"`` or ``"folds_mean"`` (see `load_eval_results`).
        template_path: the jinja template.

    Returns:
        The rendered `ModelCard`; ``card.save(path)`` writes ``README.md``.
    """
    settings = read_settings(checkpoint_dir)
    results = load_eval_results(eval_json, block=eval_block) if eval_json is not None else None
    model_name = model_name or (repo_id or Path(checkpoint_dir).resolve().name).split("/")[-1]
    towers = list(base_models) if base_models else tower_hub_ids(checkpoint_dir)
    if datasets:
        datasets = list(datasets)
    elif results:
        datasets = [HUB_DATASET_IDS.get(results["dataset"], results["dataset"])]
    hub_datasets = [d for d in datasets or [] if is_hub_id(d)]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=TASK_TYPE,
        license=license,
        language="en",
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        datasets=hub_datasets or None,
        base_model=[m for m in towers if is_hub_id(m)] or None,
        metrics=["recall"] if results else None,
        eval_results=build_eval_results(results, dataset_name=dataset_name) if results else None,
        widget=DEFAULT_WIDGET if widget is None else widget,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id,
        settings=settings,
        results=results,
        dataset_name=dataset_name or (results["dataset"] if results else None),
        base_models=towers,
        trained_on=datasets or [],
        datasets_text=", ".join(datasets) if datasets else "its training data",
        training_info=dict(training_info or {}),
        run_settings=run_settings,
    )


def write_model_card(
    checkpoint_dir: str | Path,
    eval_json: str | Path | Mapping[str, Any] | None,
    out_path: str | Path,
    **kwargs: Any,
) -> Path:
    """Render the card (see `render_model_card`) and save it; returns the written path."""
    card = render_model_card(checkpoint_dir, eval_json, **kwargs)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    card.save(out_path)
    return out_path
