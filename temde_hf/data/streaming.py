"""Image-caption pairs from a stream: parquet or webdataset tar shards, or a Hub dataset read with ``streaming=True``.

Nothing is loaded whole: `datasets` reads the shards lazily (a `datasets.IterableDataset`), and the only
examples held in memory are one shuffle block (`ShuffledStream`, at most ``buffer_size`` raw examples).

How the examples are ordered, and why:

- **Shards.** ``IterableDataset.shuffle(seed, buffer_size=1, max_buffer_input_shards=1)`` shuffles the
  shard order from `seed`, and ``set_epoch(e)`` draws a new one each epoch. Shards are read one at a time:
  `datasets` interleaves several through threads that, for parquet, pause 5 s whenever an iterator is
  closed (a workaround for an Arrow issue), at every epoch end. So write shards in random order (as
  webdataset tools do): the block buffer below mixes within a block only. `shard_for_process`
  then gives each process whole shards with ``datasets.distributed.split_dataset_by_node``, so the
  processes read disjoint data and each example is read by exactly one process. That needs the number of
  shards to be a multiple of the number of processes: otherwise `split_dataset_by_node` falls back to
  every process reading *every* example and keeping one in ``world_size`` (``world_size`` times the I/O),
  which is refused here with a one-line error saying how to re-shard.
- **Examples.** The shuffle buffer is a block buffer of our own, not `IterableDataset.shuffle`'s rolling
  buffer: `datasets` documents that a rolling buffer's content is lost on resume (it is refilled with new
  data), so a resumed run would train on other samples than an uninterrupted one. A block of
  ``buffer_size`` examples is read, permuted by a generator seeded from ``(seed, rank, epoch, block)``
  and yielded; the resume state (`ShuffledStream.state_dict`, plain JSON) is the `datasets` stream state
  at the start of the current block plus how many of its examples were used, so a resume re-reads at
  most one block and continues at exactly the next example.

Bad samples (an image `decode_image` refuses, a missing or blank caption) are skipped, counted and the
first few named (`SkipReport`); the trainer lists them at the end of the run.
"""

from __future__ import annotations

import copy
import glob
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import datasets.distributed
import numpy as np
from PIL import Image

from .errors import DataError
from .hub import _as_captions
from .image_decoding import ImageDecodeError, decode_image
from .text import text_problem

logger = logging.getLogger("temde_hf.data")

# Column names tried in order when none is given: webdataset extensions and the usual table columns.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("captions", "caption", "txt", "text", "json")
KEY_COLUMNS = ("__key__", "image_id", "key", "id")
# Keys of a webdataset ``.json`` sample (or a dict column) that hold its caption(s).
CAPTION_KEYS = ("captions", "caption", "text", "sentences")
BUILDERS = {".parquet": "parquet", ".tar": "webdataset"}
N_LISTED = 20  # skipped samples named in a report; the rest are only counted


def resolve_files(pattern: str) -> list[str]:
    """The shard files a glob (or comma-separated globs) names, sorted.

    Raises:
        DataError: No file matches, or the files mix formats.
    """
    files = sorted({f for part in pattern.split(",") if part.strip() for f in glob.glob(part.strip())})
    if not files:
        raise DataError(f"--train_files {pattern!r}: no file matches; check the path or the glob")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) > 1 or not suffixes <= set(BUILDERS):
        raise DataError(
            f"--train_files {pattern!r}: matched {sorted(suffixes)} files; give one kind of shard "
            f"({' or '.join(BUILDERS)})"
        )
    return files


def open_stream(
    *,
    dataset_name: str | None = None,
    train_files: str | None = None,
    split: str = "train",
    **load_kwargs: Any,
) -> datasets.IterableDataset:
    """The training stream: a Hub dataset id / local folder, or local shards, read with ``streaming=True``.

    Args:
        dataset_name: A Hub dataset id (or a local folder `datasets.load_dataset` can read).
        train_files: A glob of ``.parquet`` or webdataset ``.tar`` shards (``{key}.jpg`` + ``{key}.txt`` /
            ``{key}.json`` per sample).
        split: The `datasets` split to read.
        **load_kwargs: More `datasets.load_dataset` arguments (``revision``, ``data_files``, ...).

    Raises:
        DataError: Nothing to read, or the dataset cannot be opened (names it and the fix).
    """
    if (dataset_name is None) == (train_files is None):
        raise DataError(
            "--streaming reads exactly one of --dataset_name (Hub id or folder) and --train_files (glob)"
        )
    if train_files is not None:
        files = resolve_files(train_files)
        path, load_kwargs = BUILDERS[Path(files[0]).suffix], {**load_kwargs, "data_files": files}
        split = "train"  # `data_files` as a list is the builder's "train" split
    else:
        path = dataset_name
    try:
        return datasets.load_dataset(path, split=split, streaming=True, **load_kwargs)
    except (
        FileNotFoundError,
        ConnectionError,
        ValueError,
    ) as exc:  # DatasetNotFoundError is a FileNotFoundError
        raise DataError(
            f"{dataset_name or train_files}: cannot be streamed ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); check the dataset id / path and --train_split"
        ) from exc


@dataclass(frozen=True)
class StreamColumns:
    """Which columns of the stream hold the image, the caption(s) and the sample key."""

    image: str
    caption: str
    key: str | None

    @classmethod
    def detect(
        cls, names: list[str], image: str | None = None, caption: str | None = None, source: str = "stream"
    ) -> StreamColumns:
        """Pick the columns among `names` (the given ones, else the first of `IMAGE_COLUMNS` / ...).

        Raises:
            DataError: A column is missing; names the columns the stream has and the flag to set.
        """

        def pick(given: str | None, candidates: tuple[str, ...], flag: str) -> str:
            if given is not None and given in names:
                return given
            found = next((c for c in candidates if c in names), None)
            if given is not None or found is None:
                wanted = repr(given) if given is not None else f"any of {list(candidates)}"
                raise DataError(f"{source}: no column {wanted} (it has {names}); set {flag}")
            return found

        return cls(
            pick(image, IMAGE_COLUMNS, "--image_column"),
            pick(caption, CAPTION_COLUMNS, "--caption_column"),
            next((c for c in KEY_COLUMNS if c in names), None),
        )


def prepare_stream(
    dataset: datasets.IterableDataset, columns: StreamColumns, seed: int
) -> datasets.IterableDataset:
    """Keep the columns used, leave images undecoded (they go through `decode_image`), shuffle the shards."""
    dataset = dataset.select_columns([c for c in (columns.image, columns.caption, columns.key) if c])
    if isinstance((dataset.features or {}).get(columns.image), datasets.Image):
        dataset = dataset.cast_column(columns.image, datasets.Image(decode=False))
    # buffer_size=1: shard order only; the example shuffle is `ShuffledStream`'s (resumable) block buffer
    return dataset.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)


def shard_for_process(
    dataset: datasets.IterableDataset, rank: int, world_size: int, source: str
) -> datasets.IterableDataset:
    """This process's disjoint share of the shards (``split_dataset_by_node``, whole shards only).

    Raises:
        DataError: The shards cannot be dealt evenly (their number is not a multiple of `world_size`).
    """
    if world_size == 1:
        return dataset
    if dataset.num_shards % world_size:
        raise DataError(
            f"{source}: {dataset.num_shards} shard(s) cannot be dealt evenly to {world_size} processes; "
            f"re-shard into a multiple of {world_size} files (each process reads whole shards of its own)"
        )
    return datasets.distributed.split_dataset_by_node(dataset, rank=rank, world_size=world_size)


@dataclass
class SkipReport:
    """Samples left out of training: how many, and the first `N_LISTED` as ``[key, reason]``."""

    n_skipped: int = 0
    listed: list[list[str]] = field(default_factory=list)

    def add(self, key: str, reason: str) -> None:
        self.n_skipped += 1
        if len(self.listed) < N_LISTED:
            self.listed.append([key, reason])
            logger.warning("skipped sample %s: %s", key, reason)

    def merge(self, other: SkipReport) -> None:
        self.n_skipped += other.n_skipped
        self.listed.extend(other.listed[: max(0, N_LISTED - len(self.listed))])

    def summary(self, source: str) -> str:
        shown = "; ".join(f"{key}: {reason}" for key, reason in self.listed[:5])
        more = " ..." if self.n_skipped > 5 else ""
        return f"{source}: skipped {self.n_skipped} bad sample(s)" + (f" ({shown}{more})" if shown else "")


@dataclass
class PairSample:
    """One usable training pair decoded from a stream example."""

    key: str
    image: Image.Image
    caption: str


def decode_example(example: dict[str, Any], columns: StreamColumns, key: str, pick: float) -> PairSample:
    """Decode one stream example into a pair; a sample with several captions uses the one `pick` selects.

    Args:
        example: The raw example (image undecoded: ``{"bytes", "path"}`` or bytes).
        columns: Where the image and the captions are.
        key: How to name the sample.
        pick: A number in ``[0, 1)`` choosing the caption (drawn by the stream, so a resume picks the same).

    Raises:
        DataError: The image cannot be decoded or no caption is usable (the reason, without the key).
    """
    value = example[columns.caption]
    if isinstance(value, dict):  # a webdataset .json sample, or a struct column
        value = next((value[k] for k in CAPTION_KEYS if value.get(k) is not None), None)
    captions = [] if value is None else _as_captions(value, "raw")
    captions = [c for c in captions if text_problem(c) is None]
    if not captions:
        raise DataError(
            f"no usable caption in column {columns.caption!r} ({text_problem(value) or 'empty list'})"
        )
    image = example[columns.image]
    if image is None:
        raise DataError(f"no image in column {columns.image!r}")
    source = image if isinstance(image, bytes | bytearray) else image.get("bytes") or image.get("path")
    try:
        decoded = decode_image(source)
    except (ImageDecodeError, FileNotFoundError) as exc:
        raise DataError(str(exc)) from exc
    return PairSample(key, decoded, captions[min(int(pick * len(captions)), len(captions) - 1)].strip())


class ShuffledStream:
    """One process's stream, epoch by epoch, block-shuffled, with a JSON state that resumes it exactly.

    Args:
        dataset: This process's share of the stream (`prepare_stream`, then `shard_for_process`).
        buffer_size: Examples per shuffle block (the most raw examples held in memory).
        seed: Seeds the block permutations and the per-example draws.
        rank: This process's index (its blocks draw their own permutations).
    """

    def __init__(self, dataset: datasets.IterableDataset, buffer_size: int, seed: int, rank: int = 0) -> None:
        if buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size {buffer_size} must be >= 1")
        self.dataset, self.buffer_size, self.seed, self.rank = dataset, buffer_size, seed, rank
        self.epoch, self.block, self.taken, self.block_start = 0, 0, 0, None

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, as plain JSON types: epoch, block, examples used of it, its source state."""
        return {
            "epoch": self.epoch,
            "block": self.block,
            "taken": self.taken,
            "block_start": self.block_start,
            "buffer_size": self.buffer_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was taken.

        Raises:
            ValueError: `state` was taken with another buffer size or seed (its blocks would differ).
        """
        saved = (state.get("buffer_size"), state.get("seed"))
        if saved != (self.buffer_size, self.seed):
            raise ValueError(
                f"the checkpoint's stream used --shuffle_buffer_size {saved[0]} and --seed {saved[1]}, "
                f"this run {self.buffer_size} and {self.seed}; resume with the checkpoint's settings"
            )
        self.epoch, self.block, self.taken = int(state["epoch"]), int(state["block"]), int(state["taken"])
        self.block_start = state["block_start"]

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.block, self.taken, self.block_start = epoch, 0, 0, None

    def __iter__(self) -> Iterator[tuple[dict[str, Any], float, int]]:
        """The rest of the current epoch: ``(raw example, caption draw in [0, 1), view 0 or 1)``.

        The state is advanced before each example is handed out, so `state_dict` taken while the
        consumer holds an example resumes right after it.
        """
        dataset = copy.deepcopy(self.dataset)  # a fresh object: a loaded state must not leak to later epochs
        dataset.set_epoch(self.epoch)
        if self.block_start is not None:
            dataset.load_state_dict(copy.deepcopy(self.block_start))
        source = iter(dataset)
        while True:
            block = [example for _, example in zip(range(self.buffer_size), source)]
            if not block:
                return
            rng = np.random.default_rng([self.seed, self.rank, self.epoch, self.block])
            order, picks, views = (
                rng.permutation(len(block)),
                rng.random(len(block)),
                rng.integers(0, 2, len(block)),
            )
            while self.taken < len(block):
                j = self.taken
                self.taken += 1
                yield block[order[j]], float(picks[j]), int(views[j])
            self.block, self.taken = self.block + 1, 0
            self.block_start = dataset.state_dict()  # after this block's last example: the next block's start
