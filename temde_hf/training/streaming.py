"""Training batches from a stream (`temde_hf.data.streaming`): the trainer's other source of batches.

A map-style run draws each epoch's order with `batches.EpochBatchSampler`; a streaming run has no length
and no random access, so its batches are the stream's next usable samples, in order: each process takes
``per_device_train_batch_size * gradient_accumulation_steps`` pairs per step from its own shards. Tower
outputs are computed live (a stream has no fixed item list to cache against).

An epoch ends, on every process together, at the first step where some process's shards run out (one
collective per step says whether every process filled its batch): the processes that still hold
examples leave them for the next epoch's new shard order, as a map-style epoch drops its last partial
global batch. With evenly sized shards every sample is used exactly once per epoch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from PIL import ImageOps

from ..data.errors import DataError
from ..data.streaming import (
    PairSample,
    ShuffledStream,
    SkipReport,
    StreamColumns,
    decode_example,
    open_stream,
    prepare_stream,
    shard_for_process,
)
from .arguments import DataArguments, TemdeTrainingArguments
from .batches import TextInputs
from .checkpointing import STREAM_STATE_FILE

logger = logging.getLogger("temde_hf.training")

SKIPPED_FILE = "skipped_samples.json"  # in the output folder at the end of a run
KEYS_FOLDER = "stream_keys"  # --streaming_log_keys: one JSON line per step and process


def check_streaming_args(data_args: DataArguments, args: TemdeTrainingArguments) -> None:
    """Reject settings a stream cannot serve, naming the flag and the fix.

    Raises:
        ValueError: No ``--max_steps``, a per-epoch schedule, or map-style data flags given with it.
    """
    if (data_args.dataset_name is None) == (data_args.train_files is None):
        raise ValueError(
            "--streaming needs exactly one of --dataset_name (Hub id or folder) and --train_files (glob)"
        )
    if args.max_steps <= 0:
        raise ValueError(
            "--streaming: a stream has no length, so the run cannot count epochs; set --max_steps N "
            "(optimizer steps) instead of --num_train_epochs"
        )
    per_epoch = {"sketch_warmup_epochs": args.sketch_warmup_epochs, "vse_warmup_epochs": args.vse_warmup_epochs,
                 "lr_step_epochs": args.lr_step_epochs}  # fmt: skip
    for name, value in per_epoch.items():
        if value:
            raise ValueError(
                f"--{name} counts epochs, which a stream does not know; leave it at 0 with --streaming"
            )
    if args.lr_scheduler_type == "step" and args.lr_step_size <= 0:
        raise ValueError("--lr_scheduler_type step with --streaming needs --lr_step_size N (steps per decay)")
    if data_args.data is not None or data_args.cv_folds:
        raise ValueError(
            "--streaming trains from --train_files / --dataset_name; leave --data and --cv_folds unset"
        )
    if data_args.shuffle_buffer_size < 1:
        raise ValueError(f"--shuffle_buffer_size {data_args.shuffle_buffer_size} must be >= 1")


class StreamBatches:
    """This process's training batches from the stream, with the state a checkpoint saves.

    Args:
        data_args: Data settings (the stream source, columns, buffer size, caption length).
        processor: A `TemdeProcessor`.
        accelerator: The run's `Accelerator` (rank, world size, the per-step collective).
        batch_size: Pairs per process per step.
        seed: The run's seed.
        flip: Mirror each image with probability 1/2 (flip augmentation).
        output_dir: The run folder (key logs, the skipped-samples report).
    """

    def __init__(
        self, data_args: DataArguments, processor: Any, accelerator: Any, batch_size: int, seed: int, flip: bool,
        output_dir: str | Path,
    ) -> None:  # fmt: skip
        self.source = data_args.dataset_name or data_args.train_files
        raw = open_stream(dataset_name=data_args.dataset_name, train_files=data_args.train_files,
                          split=data_args.train_split)  # fmt: skip
        names = list(raw.features) if raw.features is not None else list(next(iter(raw)))
        self.columns = StreamColumns.detect(
            names, data_args.image_column, data_args.caption_column, self.source
        )
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        stream = shard_for_process(
            prepare_stream(raw, self.columns, seed), self.rank, self.world, self.source
        )
        self.stream = ShuffledStream(stream, data_args.shuffle_buffer_size, seed, self.rank)
        self.processor, self.accelerator, self.batch_size = processor, accelerator, batch_size
        self.max_text_length, self.flip = data_args.max_text_length, flip
        self.report = SkipReport()
        self.n_used = 0  # examples this process has drawn from the stream, good and bad
        self.output_dir = Path(output_dir)
        self.key_log = (
            self.output_dir / KEYS_FOLDER / f"rank{self.rank}.jsonl" if data_args.streaming_log_keys else None
        )

    @property
    def name(self) -> str:
        return Path(self.source.split(",")[0]).stem.split("*")[0] or "stream"

    def _samples(self, stream: ShuffledStream, report: SkipReport) -> Iterator[tuple[PairSample, int]]:
        for example, pick, view in stream:
            self.n_used += stream is self.stream
            key = (
                str(example[self.columns.key])
                if self.columns.key
                else f"process {self.rank} sample {self.n_used}"
            )
            try:
                yield decode_example(example, self.columns, key, pick), view
            except DataError as exc:
                report.add(key, str(exc))

    def _local_batches(
        self, stream: ShuffledStream, report: SkipReport
    ) -> Iterator[tuple[dict[str, torch.Tensor], list[str]]]:
        """Full batches of this process's stream, and their sample keys (a partial last batch is dropped)."""
        samples = []
        for sample, view in self._samples(stream, report):
            samples.append((sample, view))
            if len(samples) == self.batch_size:
                yield self._collate(samples), [s.key for s, _ in samples]
                samples = []

    def _collate(self, samples: list[tuple[PairSample, int]]) -> dict[str, torch.Tensor]:
        images = [ImageOps.mirror(s.image) if self.flip and view else s.image for s, view in samples]
        image_processor = getattr(self.processor, "image_processor", self.processor)
        texts = TextInputs([s.caption for s, _ in samples], self.processor, self.max_text_length)
        return {
            "pixel_values": image_processor(images=images, return_tensors="pt")["pixel_values"],
            **texts(range(len(samples))),
            # the rows of each process are distinct pairs: ids unique across the gathered global batch
            "pair_ids": torch.arange(len(samples)) + self.rank * len(samples),
        }

    def preview(self, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """The first `n_batches` batches of epoch 0 of this process, read apart from the training stream."""
        fresh = ShuffledStream(self.stream.dataset, self.stream.buffer_size, self.stream.seed, self.rank)
        batches = []
        for batch, _ in self._local_batches(fresh, SkipReport()):
            batches.append(batch)
            if len(batches) == n_batches:
                break
        if not batches:
            raise DataError(
                f"{self.source}: fewer than {self.batch_size} usable samples on process {self.rank}"
            )
        return batches

    def epoch_batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch (collective: every process runs it, and all stop together).

        Args:
            step: The run's global step before the first batch (for the key log).
        """
        epoch, n_batches = self.stream.epoch, 0
        from_start = self.stream.block == 0 and self.stream.taken == 0  # not resumed at the epoch's end
        local = self._local_batches(self.stream, self.report)
        while True:
            batch, keys = next(local, (None, []))
            everyone = self.accelerator.gather(
                torch.tensor([int(batch is not None)], device=self.accelerator.device)
            )
            if not bool(everyone.all()):
                break
            n_batches += 1
            if self.key_log is not None:
                self.key_log.parent.mkdir(parents=True, exist_ok=True)
                with self.key_log.open("a") as file:
                    file.write(json.dumps({"epoch": epoch, "step": step + n_batches, "keys": keys}) + "\n")
            yield batch
        if n_batches == 0 and from_start:
            raise DataError(
                f"{self.source}: epoch {epoch} gave no full step ({self.batch_size} usable samples on each of "
                f"{self.world} process(es)); add data or lower --per_device_train_batch_size"
            )
        logger.info("stream epoch %d ended after %d steps", epoch, n_batches)
        self.stream.start_epoch(epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """This process's position and skip count, as plain JSON types."""
        return {"stream": self.stream.state_dict(), "n_used": self.n_used,
                "n_skipped": self.report.n_skipped, "skipped": self.report.listed}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.n_used = int(state["n_used"])
        self.report = SkipReport(int(state["n_skipped"]), [list(x) for x in state["skipped"]])

    def finish(self) -> SkipReport:
        """Gather every process's skip report (collective); the main process logs it and writes it out."""
        total = SkipReport()
        for report in gather_object([self.report]):
            total.merge(report)
        if self.accelerator.is_main_process:
            (self.output_dir / SKIPPED_FILE).write_text(
                json.dumps(
                    {"source": self.source, "n_skipped": total.n_skipped, "first": total.listed}, indent=1
                )
            )
            (logger.warning if total.n_skipped else logger.info)(total.summary(self.source))
        return total


def load_stream_state(folder: str | Path, rank: int) -> dict[str, Any]:
    """Read one process's stream state from a checkpoint folder.

    Raises:
        ValueError: The file is missing (a checkpoint of a map-style run, or another number of processes).
    """
    path = Path(folder) / STREAM_STATE_FILE.format(rank=rank)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: no readable stream state ({type(exc).__name__}); resume a streaming run from its own "
            "checkpoints with the same number of processes"
        ) from exc
