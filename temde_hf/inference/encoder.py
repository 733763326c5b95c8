"""Load a checkpoint folder as an encoder: the eager `TemdeModel` or onnxruntime over its exported graphs.

Both have ``encode_image(pixel_values)`` / ``encode_text(input_ids, attention_mask)``, so every caller of
`temde_hf.inference.encode` (evaluate, index, search, the Space, the benchmarks) takes either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from ..loading import check_checkpoint_dir, load_checkpoint
from .onnx_runtime import OnnxTemdeEncoder, onnx_available

# What the command lines offer. "onnx-int8" (dynamic int8 graphs) stays a Python-only option: on the demo
# checkpoint it cost 45 test RSUM (benchmarks/RESULTS.md), far outside the 1-RSUM bar for offering it.
BACKENDS = ("auto", "torch", "onnx")
EXPERIMENTAL_BACKENDS = ("onnx-int8",)


def load_encoder(
    checkpoint: str | Path,
    backend: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """The encoder and processor of a saved checkpoint folder (safetensors weights only).

    Args:
        checkpoint: A folder written by ``save_pretrained`` (model + processor).
        backend: ``"torch"`` (eager), ``"onnx"`` (onnxruntime over the graphs ``temde-hf export-onnx``
            wrote beside the weights), or ``"auto"``: onnxruntime when those graphs exist, onnxruntime
            is installed and the device is the CPU, else eager. ``"onnx-int8"`` (experimental, not
            accurate enough to offer on the command line) runs the ``--int8`` graphs.
        device: ``"cpu"`` / ``"cuda"`` (default: cuda when available).

    Returns:
        `(encoder, processor)`; the encoder has ``encode_image`` / ``encode_text`` and, for eager,
        is the `TemdeModel` in eval mode.
    """
    if backend not in BACKENDS + EXPERIMENTAL_BACKENDS:
        raise ValueError(f"backend {backend!r} unknown; choose one of {BACKENDS}")
    checkpoint = check_checkpoint_dir(checkpoint)  # a local folder with safetensors weights, or one line
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "auto":
        backend = "onnx" if device == "cpu" and onnx_available(checkpoint) else "torch"
    if backend == "torch":
        return load_checkpoint(checkpoint, device, trust_remote_code)
    processor = transformers.AutoProcessor.from_pretrained(
        str(checkpoint), trust_remote_code=trust_remote_code
    )
    return OnnxTemdeEncoder(checkpoint, quantized=backend == "onnx-int8"), processor
