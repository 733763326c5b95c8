"""Where a checkpoint's ONNX graphs live: written by `temde_hf.export.onnx_export`, read by `onnx_runtime`.

The layout of ONNX weights on the Hub (transformers.js, optimum): an ``onnx/`` subfolder beside the
weights, a dual encoder's halves named like CLIP's, quantised variants with ``_quantized``. Folders
exported before, with the graphs beside the weights, are still read (`onnx_layout`).
"""

from __future__ import annotations

from pathlib import Path

ONNX_DIR = "onnx"
# Paths relative to the checkpoint folder.
IMAGE_GRAPH, TEXT_GRAPH, META_FILE = "onnx/vision_model.onnx", "onnx/text_model.onnx", "onnx/onnx_export.json"
INT8_SUFFIX = "_quantized.onnx"
# The flat layout of earlier exports, still read.
LEGACY_LAYOUT = ("image_encoder.onnx", "text_encoder.onnx", "onnx_export.json")
LEGACY_INT8_SUFFIX = ".int8.onnx"


def int8_name(graph: str) -> str:
    """``onnx/vision_model.onnx`` -> ``onnx/vision_model_quantized.onnx`` (older layout: ``x.int8.onnx``)."""
    suffix = LEGACY_INT8_SUFFIX if graph in LEGACY_LAYOUT else INT8_SUFFIX
    return graph.removesuffix(".onnx") + suffix


def onnx_layout(checkpoint: str | Path) -> tuple[str, str, str]:
    """`(image graph, text graph, metadata)` paths relative to `checkpoint`: the ``onnx/`` layout, or the
    flat layout of earlier exports when only that one is there."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / META_FILE).is_file() and (checkpoint / LEGACY_LAYOUT[2]).is_file():
        return LEGACY_LAYOUT
    return IMAGE_GRAPH, TEXT_GRAPH, META_FILE
