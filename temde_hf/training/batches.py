"""Training batches: a seeded, resumable order of (image, caption) pairs, sharded over processes.

The order of epoch `e` is a permutation drawn from ``seed + e`` alone, so any process, in any run,
can rebuild it; resuming skips the batches already consumed without loading them. Each optimizer step
takes ``per_device_train_batch_size * gradient_accumulation_steps`` pairs per process, and the
processes take consecutive slices of one global batch (so process 0 holds the first rows of the
batch the loss sees). The tail of an epoch that does not fill a global batch is dropped, so every
process always has the same number of rows (needed to gather them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """This process's batches of one epoch, optionally skipping the first `skip_batches`.

    Args:
        n_items: Size of the dataset.
        batch_size: Items per process per step.
        rank: This process's index.
        world_size: Number of processes.
        seed: Base seed; the order of epoch `e` uses ``seed + e``.
        epoch: Epoch whose order to yield.
        skip_batches: Batches already consumed (resume).
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        skip_batches: int = 0,
    ) -> None:
        self.n_items, self.batch_size = n_items, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.skip_batches = seed, epoch, skip_batches
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {n_items} pairs, fewer than one global batch of "
                f"{batch_size} x {world_size} processes; lower --per_device_train_batch_size or "
                "--gradient_accumulation_steps, or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.n_items // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.skip_batches)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n_items, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(self.skip_batches, self.steps_per_epoch):
            start = step * global_batch + self.rank * self.batch_size
            yield order[start : start + self.batch_size]


class PairCollator:
    """Turn `CaptionPairs` items into model inputs with the processor.

    Args:
        processor: A `TemdeProcessor`.
        max_length: Captions are truncated to this many tokens.

    Returns (on call):
        ``pixel_values`` `(n, 3, h, w)`, ``input_ids`` / ``attention_mask`` `(n, seq_len)` and
        ``pair_ids`` `(n,)` int64 (the image row: captions of one image are not each other's negatives).
    """

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        inputs = self.processor(
            images=[item["image"] for item in items],
            text=[item["caption"] for item in items],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        )
        batch = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask")}
        batch["pair_ids"] = torch.tensor([item["image_index"] for item in items], dtype=torch.long)
        return batch


def epoch_loader(
    pairs: Dataset,
    collator: PairCollator,
    sampler: EpochBatchSampler,
    num_workers: int = 0,
) -> DataLoader:
    """A loader over `sampler`'s batches.

    The loader gets its own generator: creating an iterator would otherwise draw its workers' base
    seed from the global RNG, and a resumed run (which creates it mid-epoch) would then replay
    different dropout masks from an uninterrupted one.
    """
    return DataLoader(
        pairs,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(sampler.seed + sampler.epoch),
        persistent_workers=False,
    )
