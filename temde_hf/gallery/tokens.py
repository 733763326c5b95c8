"""A gallery's stored token embeddings: one fp16 safetensors file, padded rows + lengths, memory-mapped.

A second-stage reranker (`temde_hf.inference.rerank`) re-scores each query's stage-1 candidates from
the images' joint-space tokens; keeping them beside the index (``temde-hf index --store-tokens``)
means a search never runs the vision tower again. File ``tokens.fp16.safetensors``:

- ``lengths`` `(n,)` int32: the real tokens of each image;
- ``tokens`` `(n, L, D)` float16: each image's tokens, zero-padded to the longest `L`.

Padded rather than ragged (values + offsets): an image's token count is fixed by the processor's
resolution (a ViT's patches, a CNN's grid), so padding costs nothing for the towers this package
builds, and a fixed row stride lets a query gather its K candidates with one index into the
memory-mapped file, without an offsets table. A gallery whose lengths vary pays for the padding; the
metadata reports both the stored and the valid bytes per image, so that cost is visible.

The file is written by streaming (its header only needs `n`, `L` and `D`): a sharded build copies one
shard at a time and never holds a gallery's tokens in memory. It is read by memory-mapping the data
section after checking the header, so a query reads only its candidates' rows from disk. It is plain
safetensors (``safetensors.safe_open`` reads it too); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..inference.tokens import TokenSet

TOKENS_FILE = "tokens.fp16.safetensors"
_HEADER_ALIGN = 8  # safetensors pads its JSON header with spaces so the data starts aligned


def token_lengths(mask: torch.Tensor) -> torch.Tensor:
    """`(n, L)` bool mask -> `(n,)` int32 lengths; the real tokens must come first (right padding)."""
    lengths = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1])[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask.bool()):
        raise ValueError(
            "token masks with padding before real tokens cannot be stored as lengths; store right-padded tokens"
        )
    return lengths.to(torch.int32)


def _header(n: int, length: int, dim: int) -> bytes:
    token_bytes = n * length * dim * 2
    header = {
        "lengths": {"dtype": "I32", "shape": [n], "data_offsets": [0, 4 * n]},
        "tokens": {"dtype": "F16", "shape": [n, length, dim], "data_offsets": [4 * n, 4 * n + token_bytes]},
        "__metadata__": {"layout": "padded rows + lengths", "written_by": "temde_hf.gallery.tokens"},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def write_token_file(
    path: str | Path,
    lengths: np.ndarray | torch.Tensor,
    dim: int,
    batches: Iterable[np.ndarray | torch.Tensor],
) -> Path:
    """Stream token rows into a safetensors file, atomically (temporary file + rename).

    Args:
        path: The file to write.
        lengths: `(n,)` real tokens per row, in the order the batches come.
        dim: Token width `D`.
        batches: `(b, l, D)` token rows in any float dtype, each row's real tokens first; stored as
            float16, zero-padded (or trimmed of padding) to `L = max(lengths)`, padding zeroed.

    Returns:
        `path`.
    """
    path = Path(path)
    lengths = np.asarray(lengths, dtype=np.int32)
    n, length = len(lengths), int(lengths.max(initial=1))
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "wb") as handle:
        handle.write(_header(n, length, dim))
        handle.write(lengths.astype("<i4").tobytes())
        for batch in batches:
            batch = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
            if batch.ndim != 3 or batch.shape[2] != dim:
                raise ValueError(f"token batch of shape {batch.shape} does not match the token width {dim}")
            batch_lengths = lengths[written : written + len(batch)]
            if len(batch_lengths) < len(batch) or np.any(batch_lengths > batch.shape[1]):
                raise ValueError(f"token rows {written}..{written + len(batch)} do not match their lengths")
            rows = np.zeros((len(batch), length, dim), dtype="<f2")
            keep = min(length, batch.shape[1])
            valid = np.arange(keep)[None, :] < batch_lengths[:, None]  # (b, keep): padding stored as 0
            rows[:, :keep] = np.where(valid[..., None], batch[:, :keep], 0)
            handle.write(rows.tobytes())
            written += len(batch)
    if written != n:
        tmp.unlink()
        raise ValueError(f"{written} token rows were written for {n} lengths")
    os.replace(tmp, path)  # the file appears complete or not at all
    return path


def read_token_file(path: str | Path, *, mmap: bool = True) -> TokenSet:
    """The `TokenSet` of a file written by `write_token_file` (tokens memory-mapped unless ``mmap=False``).

    Raises:
        ValueError: The file is missing or its header is not this layout (named, with the fix).
    """
    path = Path(path)
    rebuild = "rebuild the index with temde-hf index --store-tokens"
    if not path.is_file():
        raise ValueError(f"{path}: not found; {rebuild}")
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        # The first 8 bytes give the header's length: read no more than the file holds (a damaged
        # prefix must not become a MemoryError).
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else file_size
        if size > file_size - 8:
            raise ValueError(f"{path}: {file_size} bytes, too short for its header: truncated; {rebuild}")
        try:
            header = json.loads(handle.read(size))
            lengths_entry, tokens_entry = header["lengths"], header["tokens"]
            layout_ok = (
                lengths_entry["dtype"] == "I32"
                and tokens_entry["dtype"] == "F16"
                and len(tokens_entry["shape"]) == 3
            )
            n, length, dim = (int(v) for v in tokens_entry["shape"]) if layout_ok else (0, 0, 0)
            expected = 8 + size + int(tokens_entry["data_offsets"][1])
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{path}: not a token file of a gallery index ({err}); {rebuild}") from err
    if not layout_ok:
        raise ValueError(f"{path}: expected int32 lengths and (n, L, D) float16 tokens; {rebuild}")
    start = 8 + size
    if file_size != expected or expected - start < n * length * dim * 2:
        raise ValueError(f"{path}: {file_size} bytes, the header says {expected}: truncated; {rebuild}")
    lengths = np.fromfile(path, dtype="<i4", count=n, offset=start + lengths_entry["data_offsets"][0])
    offset = start + tokens_entry["data_offsets"][0]
    if mmap:
        # copy-on-write mapping: writable for torch.from_numpy, yet the file is never modified
        tokens = np.memmap(path, dtype="<f2", mode="c", offset=offset, shape=(n, length, dim))
    else:
        tokens = np.fromfile(path, dtype="<f2", count=n * length * dim, offset=offset).reshape(n, length, dim)
    mask = torch.arange(length)[None, :] < torch.from_numpy(lengths.astype(np.int64))[:, None]
    return TokenSet(torch.from_numpy(tokens), mask)


def token_info(tokens: TokenSet) -> dict[str, Any]:
    """What ``gallery.json`` records about stored tokens: layout and bytes per image (stored and valid)."""
    n, length, dim = tokens.tokens.shape
    stored = length * dim * 2 + 4  # a padded fp16 row + its int32 length
    return {
        "file": TOKENS_FILE,
        "dtype": "float16",
        "layout": "padded rows + lengths",
        "n_items": n,
        "max_tokens": length,
        "dim": dim,
        "mean_tokens": round(float(tokens.mask.sum()) / max(1, n), 3),
        "bytes_per_image": stored,
        "valid_bytes_per_image": round(float(tokens.mask.sum()) * dim * 2 / max(1, n), 1),
    }
