"""Training batches: a seeded, resumable order of (image, caption) pairs, and the model inputs of a batch.

The order of epoch `e` is drawn from ``seed + e`` alone, so any process, in any run, can rebuild it;
resuming skips the batches already consumed without loading them. Each optimizer step takes
`steps.BatchPlan.step_size` pairs per process (the plan builds the sampler and splits each step), and the
processes take consecutive slices of one global batch (process 0 holds the first rows of the batch the
loss sees). The tail of an epoch that does not fill a global batch is dropped, so every process always has
the same number of rows (needed to gather them).

A batch holds either raw inputs (``pixel_values``; ``input_ids`` + ``attention_mask``) or, for a frozen
tower whose outputs were cached (`temde_hf.training.features`), that tower's outputs
(``vision_hidden`` + ``vision_pooled``, + ``vision_layer<i>`` for each extra hidden state the sketch reads;
``text_hidden`` + ``text_pooled`` + ``attention_mask``), or, for a
tower whose top blocks train, its cached lower part (``vision_lower``; ``text_lower`` +
``attention_mask``: `temde_hf.training.tower_split`), plus ``pair_ids``; `model_inputs` turns any of them
into `TemdeModel.forward` keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import torch
from PIL import ImageOps
from torch.utils.data import DataLoader, Sampler
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..data.common import open_image
from .tower_cache import RowView, TowerOutputs
from .tower_split import LowerStates

SAMPLING = ("pairs", "images")


def epoch_pairs(
    caption_to_image: torch.Tensor, sampling: str, seed: int, epoch: int, n_views: int = 1
) -> list[int]:
    """The pair (caption) indices of one epoch, in training order.

    Args:
        caption_to_image: `(n_pairs,)` the image row of every caption.
        sampling: ``"pairs"``: every (image, caption) pair once; ``"images"``: every image once, with one
            of its captions drawn at random (fewer steps per epoch, never two captions of one image in a
            batch).
        seed: Base seed; epoch `e` uses ``seed + e``.
        epoch: The epoch.
        n_views: Views of each image (2 with flip augmentation): item ``pair * n_views + view``, the view
            drawn per pair and epoch.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    if sampling == "pairs":
        order = torch.randperm(len(caption_to_image), generator=generator)
        return _with_views(order, n_views, generator)
    if sampling != "images":
        raise ValueError(f"--sampling {sampling!r}: use one of {SAMPLING}")
    n_images = int(caption_to_image.max()) + 1 if len(caption_to_image) else 0
    counts = torch.bincount(caption_to_image, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    pick = (torch.rand(n_images, generator=generator) * counts).long()  # one caption per image
    order = torch.randperm(n_images, generator=generator)
    return _with_views((starts + pick)[order], n_views, generator)


def _with_views(pairs: torch.Tensor, n_views: int, generator: torch.Generator) -> list[int]:
    if n_views == 1:
        return pairs.tolist()
    views = torch.randint(0, n_views, (len(pairs),), generator=generator)
    return (pairs * n_views + views).tolist()


class EpochBatchSampler(Sampler[list[int]]):
    """This process's batches of pair indices for one epoch, optionally skipping the first `skip_batches`.

    Args:
        caption_to_image: `(n_pairs,)` the image row of every pair.
        batch_size: Pairs per process per step.
        rank: This process's index.
        world_size: Number of processes.
        seed: Base seed; the order of epoch `e` uses ``seed + e``.
        epoch: Epoch whose order to yield.
        skip_batches: Batches already consumed (resume).
        sampling: See `epoch_pairs`.
        n_views: See `epoch_pairs`.
    """

    def __init__(
        self,
        caption_to_image: torch.Tensor,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        skip_batches: int = 0,
        sampling: str = "pairs",
        n_views: int = 1,
    ) -> None:
        self.caption_to_image, self.sampling, self.n_views = caption_to_image, sampling, n_views
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.epoch, self.skip_batches = seed, epoch, skip_batches
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set gives {self.items_per_epoch} pairs per epoch (--sampling {sampling}), "
                f"fewer than one global batch of {batch_size} x {world_size} processes; lower "
                "--per_device_train_batch_size or --gradient_accumulation_steps, or add data"
            )

    @property
    def items_per_epoch(self) -> int:
        if self.sampling == "images":
            return int(self.caption_to_image.max()) + 1 if len(self.caption_to_image) else 0
        return len(self.caption_to_image)

    @property
    def steps_per_epoch(self) -> int:
        return self.items_per_epoch // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.skip_batches)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_pairs(self.caption_to_image, self.sampling, self.seed, self.epoch, self.n_views)
        global_batch = self.batch_size * self.world_size
        for step in range(self.skip_batches, self.steps_per_epoch):
            start = step * global_batch + self.rank * self.batch_size
            yield order[start : start + self.batch_size]


class ImageInputs:
    """Image rows -> model inputs: ``pixel_values`` from the files, or the cached vision tower outputs.

    View 1 of an image is its horizontal mirror (flip augmentation); view 0 the image itself.

    Args:
        dataset: Image-level dataset with an ``image`` column (from a `temde_hf.data` loader).
        processor: A `TemdeProcessor` (its image processor is used).
        cache: The vision tower's cached outputs (frozen tower; memory-mapped, read per batch), or ``None``:
            row ``view * n + r`` holds view ``view`` of image ``r``.
        lower: The cache holds the tower's lower part (its top blocks train), not its outputs.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        processor: Any,
        cache: TowerOutputs | RowView | None = None,
        lower: bool = False,
    ) -> None:
        self.images = dataset.cast_column("image", datasets.Image(decode=False))["image"]
        self.processor, self.cache, self.lower = processor, cache, lower

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, rows: Sequence[int], views: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        views = [0] * len(rows) if views is None else list(views)
        if self.cache is not None:
            index = torch.as_tensor(rows, dtype=torch.long) + len(self) * torch.as_tensor(
                views, dtype=torch.long
            )
            hidden, pooled, _ = self.cache.rows(index)
            if self.lower:
                if self.cache.grid is not None:  # tokens -> the (B, C, h, w) map the top blocks take
                    hidden = hidden.transpose(1, 2).reshape(len(hidden), -1, *self.cache.grid)
                return {"vision_lower": hidden}
            # the extra maps the sketch reads (`TemdeConfig.sketch_vision_feature_layers`), when cached
            layers = {f"vision_layer{i}": rows for i, rows in self.cache.layer_rows(index).items()}
            return {"vision_hidden": hidden, "vision_pooled": pooled, **layers}
        images = [open_image(self.images[int(row)]) for row in rows]
        images = [ImageOps.mirror(image) if view else image for image, view in zip(images, views)]
        image_processor = getattr(self.processor, "image_processor", self.processor)
        return {"pixel_values": image_processor(images=images, return_tensors="pt")["pixel_values"]}


class TextInputs:
    """Caption indices -> model inputs: token ids, or the cached text tower outputs (with their mask).

    Args:
        captions: All captions, in `caption_to_image` order.
        processor: A `TemdeProcessor` (its tokenizer is used).
        max_length: Captions are truncated to this many tokens.
        cache: The text tower's cached outputs for these captions (frozen tower), or ``None``.
        lower: The cache holds the tower's lower part (its top layers train), not its outputs.
    """

    def __init__(
        self,
        captions: list[str],
        processor: Any,
        max_length: int,
        cache: TowerOutputs | RowView | None = None,
        lower: bool = False,
    ) -> None:
        self.captions, self.processor, self.max_length, self.cache = captions, processor, max_length, cache
        self.lower = lower

    def __len__(self) -> int:
        return len(self.captions)

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            index = torch.as_tensor(indices, dtype=torch.long)
            hidden, pooled, mask = self.cache.rows(index)
            length = max(1, int(mask.sum(1).max()))  # drop the all-padding tail shared by the batch
            if self.lower:
                return {"text_lower": hidden[:, :length], "attention_mask": mask[:, :length]}
            return {
                "text_hidden": hidden[:, :length],
                "text_pooled": pooled,
                "attention_mask": mask[:, :length],
            }
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokens = tokenizer(
            text=[self.captions[int(i)] for i in indices],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


class PairCollator:
    """Pair indices -> one training batch (both modalities) with ``pair_ids``.

    ``pair_ids`` `(n,)` int64 is the image row of each pair: captions of one image are not each other's
    negatives.
    """

    def __init__(
        self, images: ImageInputs, texts: TextInputs, caption_to_image: torch.Tensor, n_views: int = 1
    ) -> None:
        self.images, self.texts, self.caption_to_image = images, texts, caption_to_image
        self.n_views = n_views  # items are `pair * n_views + view` (see `epoch_pairs`)

    def __call__(self, items: list[int]) -> dict[str, torch.Tensor]:
        items = torch.as_tensor(items, dtype=torch.long)
        pairs, views = items // self.n_views, items % self.n_views
        rows = self.caption_to_image[pairs]
        batch = {**self.images(rows.tolist(), views.tolist()), **self.texts(pairs.tolist())}
        batch["pair_ids"] = rows
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A batch (raw or cached) -> keyword arguments of `TemdeModel.forward` (``pair_ids`` left out)."""
    inputs: dict[str, Any] = {}
    if "pixel_values" in batch:
        inputs["pixel_values"] = batch["pixel_values"]
    elif "vision_lower" in batch:
        inputs["vision_outputs"] = LowerStates(batch["vision_lower"].float())
    elif "vision_hidden" in batch:
        layers = {
            int(k.removeprefix("vision_layer")): v.float()
            for k, v in batch.items()
            if k.startswith("vision_layer")
        }
        inputs["vision_outputs"] = BaseModelOutputWithPooling(
            last_hidden_state=batch["vision_hidden"].float(),
            pooler_output=batch["vision_pooled"].float(),
            hidden_states=layers or None,  # {index: tokens}: the states `TemdeModel` reads by index
        )
    if "input_ids" in batch:
        inputs["input_ids"] = batch["input_ids"]
        inputs["attention_mask"] = batch["attention_mask"]
    elif "text_lower" in batch:
        inputs["text_outputs"] = LowerStates(batch["text_lower"].float())
        inputs["attention_mask"] = batch["attention_mask"]
    elif "text_hidden" in batch:
        inputs["text_outputs"] = BaseModelOutputWithPooling(
            last_hidden_state=batch["text_hidden"].float(), pooler_output=batch["text_pooled"].float()
        )
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def split_micro_batches(batch: dict[str, torch.Tensor], n_micro: int) -> list[dict[str, torch.Tensor]]:
    """Split every tensor of `batch` into `n_micro` chunks along dim 0 (the last may be smaller)."""
    n = len(batch["pair_ids"])
    size = -(-n // n_micro)
    return [{k: v[start : start + size] for k, v in batch.items()} for start in range(0, n, size)]


def index_loader(
    sampler: Sampler[list[int]], collate: Any, num_workers: int = 0, seed: int = 0
) -> DataLoader:
    """A loader whose items are the sampler's indices and whose collator builds the batch.

    The loader gets its own generator: creating an iterator would otherwise draw its workers' base
    seed from the global RNG, and a resumed run (which creates it mid-epoch) would then replay
    different dropout masks from an uninterrupted one.
    """
    return DataLoader(
        _Indices(),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


class _Indices(torch.utils.data.Dataset):
    """Item ``i`` is ``i``: the collator does the reading."""

    def __getitem__(self, index: int) -> int:
        return index
