"""Frozen towers, trained head: cache the towers' outputs once, then train only the T-EMDE head.

With both towers frozen, every epoch would recompute the same tower outputs; caching them turns a
CPU fine-tune of the head (projections, pooling head, sketch, logit scale) into minutes. Used by the
Flickr8k demo and the quality ablation. The cached tensors are exactly what `get_image_features` /
`get_text_features` feed the head, so the trained model embeds raw pixels and captions identically.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.common import open_image
from ..evaluation.folds import evaluate_embeddings
from ..models.temde import TemdeModel

logger = logging.getLogger(__name__)


@dataclass
class TowerFeatures:
    """The frozen towers' outputs for one split.

    Attributes:
        image_hidden: `(n_images, image_tokens, C_vision)` float16 `last_hidden_state`.
        image_pooled: `(n_images, C_vision)` the vision tower's pooled output.
        text_hidden: `(n_captions, max_len, C_text)` float16, zero-padded.
        text_mask: `(n_captions, max_len)` int64 attention mask.
        text_pooled: `(n_captions, C_text)`.
        caption_to_image: `(n_captions,)` int64 row of each caption's image.
    """

    image_hidden: torch.Tensor
    image_pooled: torch.Tensor
    text_hidden: torch.Tensor
    text_mask: torch.Tensor
    text_pooled: torch.Tensor
    caption_to_image: torch.Tensor

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in self.__dict__.items()}, str(tmp))
        tmp.replace(path)  # atomic: an interrupted run never leaves a truncated cache

    @classmethod
    def load(cls, path: str | Path) -> TowerFeatures:
        return cls(**load_file(str(path)))


@torch.inference_mode()
def extract_tower_features(
    model: TemdeModel,
    processor: Any,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 32,
    max_length: int = 40,
    desc: str = "",
) -> TowerFeatures:
    """Run both frozen towers over a dataset (one row per image with a `captions` list)."""
    model.eval()
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    image_hidden, image_pooled = [], []
    for start in tqdm(range(0, len(raw), batch_size), desc=f"vision tower {desc}".strip(), unit="batch"):
        images = [open_image(v) for v in raw[start : start + batch_size]["image"]]
        out = model.vision_model(pixel_values=processor(images=images)["pixel_values"], return_dict=True)
        image_hidden.append(_tokens(out.last_hidden_state).half())
        image_pooled.append(out.pooler_output.flatten(1).float())
    captions = [c for row in dataset["captions"] for c in row]
    caption_to_image = torch.tensor([i for i, row in enumerate(dataset["captions"]) for _ in row])
    text_hidden, text_mask, text_pooled = [], [], []
    for start in tqdm(range(0, len(captions), 128), desc=f"text tower {desc}".strip(), unit="batch"):
        batch = processor(text=captions[start : start + 128], padding="max_length", max_length=max_length)
        kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = model.text_model(**kwargs, return_dict=True)
        text_hidden.append(out.last_hidden_state.half())
        text_mask.append(batch["attention_mask"])
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        text_pooled.append(pooled.float())
    return TowerFeatures(
        image_hidden=torch.cat(image_hidden),
        image_pooled=torch.cat(image_pooled),
        text_hidden=torch.cat(text_hidden),
        text_mask=torch.cat(text_mask).long(),
        text_pooled=torch.cat(text_pooled),
        caption_to_image=caption_to_image,
    )


def _tokens(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden


def embed_cached_images(model: TemdeModel, feats: TowerFeatures, index: torch.Tensor) -> torch.Tensor:
    """The head on cached vision outputs: rows `index` -> image embeddings `(len(index), E)`."""
    tokens, mask, pooled = model.project_image_hidden_states(
        feats.image_hidden[index].float(), feats.image_pooled[index]
    )
    return model.embed_tokens(tokens, mask, pooled)[0]


def embed_cached_texts(model: TemdeModel, feats: TowerFeatures, index: torch.Tensor) -> torch.Tensor:
    """The head on cached text outputs: rows `index` -> caption embeddings `(len(index), E)`."""
    mask = feats.text_mask[index]
    length = int(mask.sum(1).max())  # drop the all-padding tail shared by the batch
    tokens, mask, pooled = model.project_text_hidden_states(
        feats.text_hidden[index, :length].float(), mask[:, :length], feats.text_pooled[index]
    )
    return model.embed_tokens(tokens, mask, pooled)[0]


@torch.no_grad()
def embed_cached(
    model: TemdeModel, feats: TowerFeatures, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and caption of a split through the head: `(images (n_images, E), texts (n_captions, E))`."""
    model.eval()
    images = torch.cat(
        [embed_cached_images(model, feats, torch.arange(s, min(s + batch_size, len(feats.image_hidden))))
         for s in range(0, len(feats.image_hidden), batch_size)]
    )  # fmt: skip
    n_captions = len(feats.caption_to_image)
    texts = torch.cat(
        [embed_cached_texts(model, feats, torch.arange(s, min(s + batch_size, n_captions)))
         for s in range(0, n_captions, batch_size)]
    )  # fmt: skip
    return images, texts


def evaluate_cached(model: TemdeModel, feats: TowerFeatures, batch_size: int = 256) -> dict[str, Any]:
    """Standard retrieval protocol (i2t best-of-captions, t2i) on cached features."""
    images, texts = embed_cached(model, feats, batch_size)
    return evaluate_embeddings(images, texts, feats.caption_to_image, fold_size=None)["full"]


@dataclass
class HeadTrainingArguments:
    """Settings of a frozen-tower head fine-tune."""

    epochs: int = field(default=30, metadata={"help": "passes over all (image, caption) training pairs"})
    batch_size: int = field(default=128, metadata={"help": "pairs per step (in-batch negatives)"})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "linear warm-up, then cosine decay"})
    eval_every: int = field(default=5, metadata={"help": "epochs between validation evaluations"})
    sketch_warmup_epochs: float = field(
        default=0,
        metadata={"help": "epochs trained with the `concat` sketch branch off (λ = 0); the DLSH partition is "
                  "then fitted to the aligned token space and λ switched on"},
    )  # fmt: skip
    seed: int = field(default=0, metadata={"help": "seed of the head's init, the sketch init and data order"})


def train_head(
    model: TemdeModel,
    train: TowerFeatures,
    val: TowerFeatures | None,
    args: HeadTrainingArguments,
    *,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train the head on cached tower outputs; keeps the weights of the best validation RSUM.

    Each epoch visits every (image, caption) pair once in a seeded order; captions of the same image
    in a batch are not used as each other's negatives. The sketch is initialised (DLSH medians) from
    the first batch's tokens of both modalities; with `sketch_warmup_epochs`, the `concat` head first
    trains with λ = 0 and the sketch is initialised from the batch where λ is switched on, so the
    partition is drawn in a token space the projections have already aligned across modalities.

    Returns:
        History: `step_loss`, `epoch`, `val_rsum` (per evaluation) lists.
    """
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    for tower in (model.vision_model, model.text_model):
        tower.requires_grad_(False)
    head_params = [p for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(head_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    n_pairs = len(train.caption_to_image)
    steps_per_epoch = math.ceil(n_pairs / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_ratio * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        ),
    )
    history: dict[str, list[float]] = {"step_loss": [], "epoch": [], "val_rsum": []}
    best_rsum, best_state = -1.0, None
    warmup_steps = round(args.sketch_warmup_epochs * steps_per_epoch)
    if warmup_steps and (model.sketch is None or model.config.sketch_fusion != "concat"):
        raise ValueError(
            "sketch_warmup_epochs needs sketch_fusion='concat' (the other fusions have no λ to switch)"
        )
    sketch_weight = model.config.sketch_weight
    step = 0
    bar = tqdm(total=total, desc="train head", unit="step", disable=not progress)
    try:
        for epoch in range(1, args.epochs + 1):
            model.train()
            order = list(range(n_pairs))
            rng.shuffle(order)
            for start in range(0, n_pairs, args.batch_size):
                captions = torch.tensor(order[start : start + args.batch_size])
                images = train.caption_to_image[captions]
                if warmup_steps and step in (0, warmup_steps):
                    # Off during warm-up; then the partition is drawn on the tokens the projections now make.
                    model.config.sketch_weight = 0.0 if step == 0 else sketch_weight
                    if step == warmup_steps:
                        _init_sketch(model, train, images, captions, args.seed)
                if model.sketch is not None and not bool(model.sketch.initialized):
                    _init_sketch(model, train, images, captions, args.seed)
                step += 1
                loss = model.compute_loss(
                    embed_cached_images(model, train, images),
                    embed_cached_texts(model, train, captions),
                    pair_ids=images,
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at epoch {epoch}; lower --learning_rate or check the inputs"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head_params, 1.0)
                optimizer.step()
                schedule.step()
                with torch.no_grad():  # CLIP's clamp: a logit scale above 100 destabilises training
                    model.logit_scale.clamp_(0, math.log(100))
                history["step_loss"].append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            in_warmup = step <= warmup_steps and warmup_steps > 0  # a model with λ = 0 is not a candidate
            if val is not None and not in_warmup and (epoch % args.eval_every == 0 or epoch == args.epochs):
                rsum = evaluate_cached(model, val)["rsum"]
                history["epoch"].append(epoch)
                history["val_rsum"].append(rsum)
                logger.info("epoch %d: val RSUM %.1f", epoch, rsum)
                if rsum > best_rsum:
                    best_rsum, best_state = rsum, copy.deepcopy(model.state_dict())
    finally:  # λ is restored even when training stops early
        bar.close()
        model.config.sketch_weight = sketch_weight
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


@torch.no_grad()
def _init_sketch(
    model: TemdeModel, feats: TowerFeatures, images: torch.Tensor, captions: torch.Tensor, seed: int
) -> None:
    image_tokens, image_mask, _ = model.project_image_hidden_states(feats.image_hidden[images].float())
    text_tokens, text_mask, _ = model.project_text_hidden_states(
        feats.text_hidden[captions].float(), feats.text_mask[captions]
    )
    tokens = torch.cat([image_tokens[image_mask.bool()], text_tokens[text_mask.bool()]])
    model.initialize_sketch(tokens, generator=torch.Generator().manual_seed(seed))
