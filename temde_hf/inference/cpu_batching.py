"""How many images one forward of an image tower takes on a CPU, and running a larger batch in such chunks.

A batch of images is a unit of reading, progress and writing; on a CPU it is not the best unit for the
tower's forward. EfficientNet-Lite0's early activations take ~5 MB per image: at 32 images a forward's
tensors are larger than the blocks the C allocator keeps between calls, so each forward maps fresh memory
and the kernel zeroes it page by page (on 2 cores, hundreds of thousands of page faults per forward and
more system time than compute). A few images per forward stay in the allocator's reuse and in the CPU
caches, and onnxruntime, which keeps its own arena, is fastest at a few images too;
``benchmarks/scale.py`` measures both backends at both sizes. On a GPU the whole batch goes in one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

CPU_IMAGES_PER_FORWARD = 4

Output = TypeVar("Output")


def images_per_forward(device: torch.device | str) -> int | None:
    """Images per forward on `device`: `CPU_IMAGES_PER_FORWARD` on a CPU, ``None`` (all) elsewhere."""
    return CPU_IMAGES_PER_FORWARD if torch.device(device).type == "cpu" else None


def in_chunks(
    forward: Callable[[torch.Tensor], Output], pixel_values: torch.Tensor, rows: int | None
) -> Output:
    """``forward(pixel_values)`` run on at most `rows` images at a time, the outputs concatenated.

    Args:
        forward: Images `(b, 3, H, W)` -> a tensor `(b, ...)`, a tuple of them, or a ``ModelOutput``
            whose tensors all have the batch first.
        pixel_values: `(B, 3, H, W)`.
        rows: Images per call; ``None`` or ``>= B``: one call.

    Returns:
        What one call on all `B` images returns (the same values, up to kernels' batch-size-dependent
        rounding).
    """
    if rows is None or len(pixel_values) <= rows:
        return forward(pixel_values)
    parts = [forward(chunk) for chunk in pixel_values.split(rows)]
    return _concatenate(parts)


def _concatenate(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple) and not hasattr(first, "keys"):
        return tuple(_concatenate([part[i] for part in parts]) for i in range(len(first)))
    if hasattr(first, "keys"):  # a ModelOutput: rebuilt with every field concatenated
        return type(first)(**{key: _concatenate([part[key] for part in parts]) for key in first})
    raise TypeError(f"cannot concatenate forward outputs of type {type(first).__name__}")
