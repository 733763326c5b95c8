"""How the pairs of one optimizer step are drawn and split: the batch plan, in one place.

One optimizer step takes, on each process, ``gradient_accumulation_steps`` contrastive batches (each
pair's negatives are the pairs of its own contrastive batch, on every process), each made of
``gradient_cache_micro_batches`` micro-batches of ``per_device_train_batch_size`` pairs (one forward
each; gradient caching joins them into one loss, `accumulation`)::

    step (per process)  = accumulation_steps x contrastive batch
    contrastive batch   = micro_batches x micro-batch
    micro-batch         = micro_batch_size pairs

`BatchPlan` holds these numbers and the data-order settings, builds the sampler that draws each step's
pairs (`batches.EpochBatchSampler`: an epoch's tail that fills no global step is dropped, so every
process always has the same number of rows) and splits a step's collated batch into its contrastive
batches and their micro-batches. `PairBatches` is a map-style run's source of steps: the plan over the
training pairs, collated; a streaming run's is `streaming.StreamBatches`, built with the plan's
`step_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .arguments import TemdeTrainingArguments
from .batches import EpochBatchSampler, PairCollator, index_loader, split_micro_batches

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BatchPlan:
    """The shape of one optimizer step, and the seeded order its pairs are drawn in.

    Attributes:
        micro_batch_size: Pairs per process in one forward (``--per_device_train_batch_size``).
        micro_batches: Micro-batches per contrastive batch (``--gradient_cache_micro_batches``).
        accumulation_steps: Contrastive batches per optimizer step (``--gradient_accumulation_steps``).
        rank: This process's index.
        world_size: Number of processes.
        seed: Base seed; the order of epoch `e` is drawn from ``seed + e``.
        sampling: ``"pairs"`` or ``"images"`` (see `batches.epoch_pairs`).
        n_views: Views of each image (2 with flip augmentation).
    """

    micro_batch_size: int
    micro_batches: int = 1
    accumulation_steps: int = 1
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    sampling: str = "pairs"
    n_views: int = 1

    @classmethod
    def from_args(cls, args: TemdeTrainingArguments, rank: int = 0, world_size: int = 1) -> BatchPlan:
        """The plan of `args` for process `rank` of `world_size`.

        Raises:
            ValueError: A contrastive batch (all processes' pairs) would hold fewer than 2 pairs.
        """
        plan = cls(
            micro_batch_size=args.per_device_train_batch_size,
            micro_batches=args.gradient_cache_micro_batches,
            accumulation_steps=args.gradient_accumulation_steps,
            rank=rank,
            world_size=world_size,
            seed=args.seed,
            sampling=args.sampling,
            n_views=2 if args.image_flip_augmentation else 1,
        )
        if plan.contrastive_batch_size * world_size < 2:
            raise ValueError(
                f"--per_device_train_batch_size {args.per_device_train_batch_size} x {world_size} "
                "process(es): each contrastive batch holds one pair and no negative; use at least 2 pairs"
            )
        return plan

    @property
    def contrastive_batch_size(self) -> int:
        """Pairs per process in one contrastive batch (one loss)."""
        return self.micro_batch_size * self.micro_batches

    @property
    def step_size(self) -> int:
        """Pairs per process in one optimizer step."""
        return self.contrastive_batch_size * self.accumulation_steps

    def sampler(
        self, caption_to_image: torch.Tensor, epoch: int = 0, skip_steps: int = 0
    ) -> EpochBatchSampler:
        """This process's pair indices of each step of `epoch`, after the first `skip_steps` (resume).

        Args:
            caption_to_image: `(n_pairs,)` the image row of every training pair.
            epoch: The epoch.
            skip_steps: Steps of the epoch already taken.
        """
        return EpochBatchSampler(
            caption_to_image,
            self.step_size,
            self.rank,
            self.world_size,
            self.seed,
            epoch,
            skip_steps,
            self.sampling,
            self.n_views,
        )

    def split(self, batch: Batch) -> list[list[Batch]]:
        """One step's batch `(step_size, ...)` -> its contrastive batches, each a list of micro-batches.

        Every tensor is cut along dim 0 into ``accumulation_steps`` consecutive contrastive batches of
        `contrastive_batch_size` rows, each into ``micro_batches`` micro-batches of `micro_batch_size`
        rows (views: no copy).
        """
        return [
            split_micro_batches(contrastive, self.micro_batches)
            for contrastive in split_micro_batches(batch, self.accumulation_steps)
        ]


@dataclass
class PairBatches:
    """A map-style run's steps: the plan's sampler over the training pairs, collated per step.

    Attributes:
        plan: The batch plan.
        caption_to_image: `(n_pairs,)` the image row of every training pair (drives the sampler).
        collator: Pair indices -> one batch (raw or cached inputs).
        num_workers: Loader worker processes (``--dataloader_num_workers``).
    """

    plan: BatchPlan
    caption_to_image: torch.Tensor
    collator: PairCollator
    num_workers: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.sampler(self.caption_to_image).steps_per_epoch

    def sampler(self, epoch: int = 0, skip_steps: int = 0) -> EpochBatchSampler:
        return self.plan.sampler(self.caption_to_image, epoch, skip_steps)

    def epoch(self, epoch: int, skip_steps: int = 0) -> DataLoader:
        """The collated batches of the rest of `epoch`, one per optimizer step."""
        sampler = self.sampler(epoch, skip_steps)
        return index_loader(sampler, self.collator, self.num_workers, self.plan.seed + epoch)

    def first_pairs(self, n: int) -> Batch:
        """The first `n` pairs of this process's first step, collated (a probe of the inputs' form)."""
        return self.collator(next(iter(self.sampler()))[:n])
