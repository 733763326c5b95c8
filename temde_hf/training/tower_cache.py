"""The on-disk format of a frozen tower's cached outputs: raw arrays, memory-mapped, with a JSON header.

One cache is a folder::

    build.json    the plan (key, shapes, dtype, batch size), written first
    hidden.bin    (n, tokens, C)   row-major, the storage dtype
    pooled.bin    (n, C)
    mask.bin      (n, tokens)      uint8, text only
    layer<i>.bin  (n, tokens_i, C_i)  hidden state i of the vision tower as tokens, for each index i of
                  `TemdeConfig.sketch_vision_feature_layers` (the extra maps the sketch reads)
    order.bin     int64, the items in build order (text only: by length, so a batch pads little)
    done.bin      one byte per build batch: 1 once that batch's rows are written
    header.json   the plan again, written last (atomically): its presence means "complete"

Why raw arrays + a JSON header (and not safetensors or Arrow): a batch of consecutive rows is one
contiguous byte range, so the builder writes each batch with one ``pwrite`` into the final file (nothing
of the cache is ever held in memory, and processes of an `accelerate launch` fill disjoint ranges of the
same file); readers ``np.memmap`` the file read-only, so a batch read copies only its rows and every
process of a node shares the same pages through the page cache. safetensors can be memory-mapped too,
but its header (with the final byte offsets) comes first and it has no partial state, so a build could
not be written in place and resumed; an Arrow cache stores variable-length rows and converts on read.
Nothing here is ever unpickled: the arrays are raw bytes and the header is JSON.

The folder name carries the cache key (a hash of everything the outputs depend on), and the header
repeats it: a reader given another key, or a header whose shapes do not match the file sizes, refuses the
folder instead of returning stale or truncated outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
HEADER, PLAN, DONE, ORDER = "header.json", "build.json", "done.bin", "order.bin"
# bfloat16 has no numpy dtype: its bits are stored as int16 and viewed back as bfloat16 on read.
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StaleCacheError(ValueError):
    """A cache folder that does not hold the outputs asked for (other key, damaged, or incomplete)."""


@dataclass(frozen=True)
class CachePlan:
    """What a cache holds; ``build.json`` and ``header.json`` are this, as JSON.

    Attributes:
        key: The cache key (a hash of the tower, processor, items and dtype).
        n_items: Rows.
        tokens: Tokens per row (text: the longest caption; shorter rows are zero-padded, mask 0).
        width: Channels of a token.
        pooled_width: Channels of the pooled output.
        dtype: ``float32`` | ``float16`` | ``bfloat16``.
        has_mask: Whether rows have an attention mask (text).
        batch_size: Rows per build batch (the unit of progress and of sharding across processes).
        ordered: Whether batches take the items in the order of ``order.bin`` (else in row order).
        grid: `(h, w)` when the tokens are a convolutional map's cells (row-major), else ``None``.
        layers: `[index, tokens, C]` of each extra hidden state stored (``layer<index>.bin``), or ``None``.
        version: The file format.
    """

    key: str
    n_items: int
    tokens: int
    width: int
    pooled_width: int
    dtype: str
    has_mask: bool
    batch_size: int
    ordered: bool = False
    grid: list[int] | None = None
    layers: list[list[int]] | None = None
    version: int = FORMAT_VERSION

    @property
    def n_batches(self) -> int:
        return -(-self.n_items // self.batch_size)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {
            "hidden": (self.n_items, self.tokens, self.width),
            "pooled": (self.n_items, self.pooled_width),
        }
        if self.has_mask:
            shapes["mask"] = (self.n_items, self.tokens)
        for index, tokens, width in self.layers or ():
            shapes[f"layer{index}"] = (self.n_items, tokens, width)
        return shapes

    def storage(self, name: str) -> np.dtype:
        return np.dtype(np.uint8 if name == "mask" else STORAGE[self.dtype])

    def n_bytes(self, name: str) -> int:
        return int(np.prod(self.shapes()[name])) * self.storage(name).itemsize

    @property
    def bytes_per_item(self) -> int:
        return sum(self.n_bytes(name) for name in self.shapes()) // max(1, self.n_items)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one


def is_complete(folder: Path, key: str) -> bool:
    """Whether `folder` holds a finished cache for `key`."""
    header = _read_json(folder / HEADER)
    return header is not None and header.get("key") == key and header.get("version") == FORMAT_VERSION


class CacheWriter:
    """Fills a cache folder batch by batch; every process of a run may hold one on the same folder.

    `prepare` (one process) creates the zero-filled files, or keeps those of an interrupted build of the
    same plan; `write` puts one batch's rows at their byte offsets and then marks the batch done, so a
    build interrupted at any point resumes from the batches marked done (`pending`); `finish` (one
    process, after all have written) flushes the files to disk and writes the header.
    """

    def __init__(self, folder: Path, plan: CachePlan) -> None:
        self.folder, self.plan = Path(folder), plan
        self.order: np.ndarray | None = None
        if plan.ordered and (self.folder / ORDER).is_file():
            self.order = np.fromfile(self.folder / ORDER, dtype=np.int64)

    def prepare(self, order: np.ndarray | None = None) -> None:
        """Create the files for `plan`, unless a build of the same plan was interrupted here (resume).

        Args:
            order: `(n_items,)` the items in build order (``plan.ordered``), e.g. captions by length.
        """
        if _read_json(self.folder / PLAN) == asdict(self.plan) and self._files_sized():
            return
        if self.folder.exists():
            shutil.rmtree(self.folder)  # another plan's partial build (other batch size, shapes)
        self.folder.mkdir(parents=True)
        for name in self.plan.shapes():
            with open(self.folder / f"{name}.bin", "wb") as file:
                file.truncate(self.plan.n_bytes(name))  # sparse zeros: no disk written yet
        with open(self.folder / DONE, "wb") as file:
            file.truncate(self.plan.n_batches)
        if self.plan.ordered:
            self.order = np.asarray(order, dtype=np.int64)
            if sorted(self.order.tolist()) != list(range(self.plan.n_items)):
                raise ValueError("the build order must hold every item once")
            self.order.tofile(self.folder / ORDER)
        _write_json(self.folder / PLAN, asdict(self.plan))

    def _files_sized(self) -> bool:
        sizes = {name: self.plan.n_bytes(name) for name in self.plan.shapes()}
        sizes[DONE.removesuffix(".bin")] = self.plan.n_batches
        if self.plan.ordered:
            sizes[ORDER.removesuffix(".bin")] = 8 * self.plan.n_items
        return all(
            (self.folder / f"{name}.bin").is_file() and (self.folder / f"{name}.bin").stat().st_size == size
            for name, size in sizes.items()
        )

    def done(self) -> np.ndarray:
        """`(n_batches,)` bool: which batches are written."""
        return np.fromfile(self.folder / DONE, dtype=np.uint8).astype(bool)

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This process's batches still to write: batch ``b`` belongs to process ``b % world_size``."""
        done = self.done()
        return [b for b in range(rank, self.plan.n_batches, world_size) if not done[b]]

    def rows(self, batch: int) -> list[int]:
        """The items (rows) of build batch `batch`."""
        start = batch * self.plan.batch_size
        rows = range(start, min(start + self.plan.batch_size, self.plan.n_items))
        return list(rows) if self.order is None else self.order[rows.start : rows.stop].tolist()

    def write(
        self,
        batch: int,
        hidden: torch.Tensor,
        pooled: torch.Tensor,
        mask: torch.Tensor | None = None,
        layers: tuple[torch.Tensor, ...] = (),
    ) -> None:
        """Write build batch `batch`.

        Args:
            batch: The batch index (its rows are `rows(batch)`).
            hidden: `(b, t, C)` tokens, ``t <= plan.tokens`` (zero-padded to ``plan.tokens`` here).
            pooled: `(b, C')`.
            mask: `(b, t)` attention mask (text), or ``None``.
            layers: `(b, t_i, C_i)` each extra hidden state of ``plan.layers``, in its order (images).
        """
        rows = self.rows(batch)
        if hidden.shape[0] != len(rows):
            raise ValueError(f"batch {batch} has {hidden.shape[0]} rows, expected {len(rows)}")
        pad = self.plan.tokens - hidden.shape[1]
        if pad < 0:  # never cut tokens silently: the plan's row length comes from every item's length
            raise ValueError(
                f"batch {batch} has {hidden.shape[1]} tokens, more than the cache's {self.plan.tokens}"
            )
        if mask is not None:  # padding tokens are zero: a row does not depend on its batch's padding
            hidden = hidden * mask[..., None].to(hidden.dtype)
        arrays = {"hidden": torch.nn.functional.pad(hidden, (0, 0, 0, pad)), "pooled": pooled}
        if self.plan.has_mask:
            arrays["mask"] = torch.nn.functional.pad(mask, (0, pad)).to(torch.uint8)
        if len(layers) != len(self.plan.layers or ()):
            raise ValueError(
                f"batch {batch} has {len(layers)} extra hidden states, the cache {self.plan.layers}"
            )
        for (index, *_), value in zip(self.plan.layers or (), layers):
            arrays[f"layer{index}"] = value
        for name, value in arrays.items():
            if name != "mask":
                value = value.to(TORCH_DTYPES[self.plan.dtype])
                if self.plan.dtype == "bfloat16":
                    value = value.view(torch.int16)
            data = value.detach().cpu().contiguous().numpy()
            row_bytes = self.plan.n_bytes(name) // self.plan.n_items
            fd = os.open(self.folder / f"{name}.bin", os.O_WRONLY)
            try:
                for first, last in _runs(rows):  # consecutive rows: one write (all of them in row order)
                    os.pwrite(fd, data[first:last].tobytes(), rows[first] * row_bytes)
            finally:
                os.close(fd)
        # Marked after the rows: a build killed between the two rewrites this batch, never skips it.
        fd = os.open(self.folder / DONE, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x01", batch)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Check every batch is written, flush the files to disk and write the header (main process)."""
        missing = np.flatnonzero(~self.done())
        if len(missing):
            raise RuntimeError(
                f"{self.folder}: {len(missing)} build batch(es) not written, e.g. {missing[:5]}"
            )
        for name in self.plan.shapes():
            fd = os.open(self.folder / f"{name}.bin", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _write_json(self.folder / HEADER, asdict(self.plan))


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """``[first, last)`` positions of the runs of consecutive values in `rows`."""
    breaks = [i for i in range(1, len(rows)) if rows[i] != rows[i - 1] + 1]
    starts = [0, *breaks]
    return list(zip(starts, [*breaks, len(rows)]))


class TowerOutputs:
    """A finished cache, memory-mapped read-only: `rows` copies only the rows asked for.

    Pickles as its folder and key (DataLoader workers reopen the maps instead of copying the arrays).

    Args:
        folder: The cache folder.
        key: The key the caller expects; a folder with another key raises.

    Raises:
        StaleCacheError: The folder is incomplete, holds another key, or its files do not match the header.
    """

    def __init__(self, folder: str | Path, key: str) -> None:
        self.folder, self.key = Path(folder), key
        header = _read_json(self.folder / HEADER)
        if header is None:
            raise StaleCacheError(f"{self.folder}: no finished tower-output cache (no {HEADER})")
        if header.get("key") != key or header.get("version") != FORMAT_VERSION:
            raise StaleCacheError(
                f"{self.folder}: cache of other inputs (key {header.get('key')}, expected {key}); "
                "delete the folder and it is recomputed"
            )
        self.plan = CachePlan(**header)
        self.arrays: dict[str, np.memmap] = {}
        for name, shape in self.plan.shapes().items():
            path = self.folder / f"{name}.bin"
            if not path.is_file() or path.stat().st_size != self.plan.n_bytes(name):
                raise StaleCacheError(
                    f"{path}: damaged tower-output cache (size does not match {HEADER}); delete "
                    f"{self.folder} and it is recomputed"
                )
            self.arrays[name] = np.memmap(path, dtype=self.plan.storage(name), mode="r", shape=shape)

    def __getstate__(self) -> dict:
        return {"folder": str(self.folder), "key": self.key}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state["key"])

    def __len__(self) -> int:
        return self.plan.n_items

    @property
    def grid(self) -> list[int] | None:
        """`(h, w)` of the map the tokens come from (see `CachePlan.grid`)."""
        return self.plan.grid

    def _tensor(self, name: str, index: np.ndarray) -> torch.Tensor:
        values = torch.from_numpy(np.ascontiguousarray(self.arrays[name][index]))
        if name == "mask":
            return values.long()
        return values.view(torch.bfloat16) if self.plan.dtype == "bfloat16" else values

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Rows `index` `(b,)` -> (hidden `(b, tokens, C)`, pooled `(b, C')`, mask `(b, tokens)` int64 or None)."""
        index = np.asarray(torch.as_tensor(index, dtype=torch.long))
        mask = self._tensor("mask", index) if self.plan.has_mask else None
        return self._tensor("hidden", index), self._tensor("pooled", index), mask

    def layer_rows(self, index: torch.Tensor) -> dict[int, torch.Tensor]:
        """Rows `index` `(b,)` of the extra hidden states: ``{i: (b, tokens_i, C_i)}`` (empty without any)."""
        index = np.asarray(torch.as_tensor(index, dtype=torch.long))
        return {i: self._tensor(f"layer{i}", index) for i, *_ in self.plan.layers or ()}


class RowView:
    """Selected rows of one or more caches (views of the same items), addressed view-major.

    Row ``view * len(rows) + i`` is row ``rows[i]`` of ``views[view]`` (with flip augmentation: the
    image, then its mirror). Nothing is read until `rows` is called.

    Args:
        views: The caches, one per view.
        rows: `(n,)` the rows of each cache this view exposes.
    """

    def __init__(self, views: list[TowerOutputs], rows: torch.Tensor) -> None:
        self.views, self.selected = views, torch.as_tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.views) * len(self.selected)

    @property
    def grid(self) -> list[int] | None:
        return self.views[0].grid

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As `TowerOutputs.rows`."""
        index = torch.as_tensor(index, dtype=torch.long)
        view, source = index // len(self.selected), self.selected[index % len(self.selected)]
        if len(self.views) == 1 or len(index) == 0:
            return self.views[0].rows(source)
        hidden = pooled = mask = None
        for v, cache in enumerate(self.views):
            take = view == v
            if not take.any():
                continue
            h, p, m = cache.rows(source[take])
            if hidden is None:
                hidden = h.new_empty((len(index), *h.shape[1:]))
                pooled = p.new_empty((len(index), *p.shape[1:]))
                mask = None if m is None else m.new_empty((len(index), *m.shape[1:]))
            hidden[take], pooled[take] = h, p
            if m is not None:
                mask[take] = m
        return hidden, pooled, mask

    def layer_rows(self, index: torch.Tensor) -> dict[int, torch.Tensor]:
        """As `TowerOutputs.layer_rows`."""
        index = torch.as_tensor(index, dtype=torch.long)
        view, source = index // len(self.selected), self.selected[index % len(self.selected)]
        out: dict[int, torch.Tensor] = {}
        for v, cache in enumerate(self.views):
            take = view == v
            if not take.any():
                continue
            for i, rows in cache.layer_rows(source[take]).items():
                out.setdefault(i, rows.new_empty((len(index), *rows.shape[1:])))[take] = rows
        return out
