"""``temde-hf export-onnx CKPT``: both encoders of a checkpoint as ONNX graphs, written beside the weights.

Each graph computes exactly what the model's public feature functions return, the fused retrieval
embedding (global part + sketch):

- ``onnx/vision_model.onnx``: ``pixel_values`` `(batch, 3, H, W)` -> ``image_embeds`` `(batch, E)`;
- ``onnx/text_model.onnx``: ``input_ids``, ``attention_mask`` `(batch, seq)` -> ``text_embeds`` `(batch, E)`;
- ``onnx/vision_model_quantized.onnx`` / ``onnx/text_model_quantized.onnx`` with ``--int8``:
  onnxruntime's dynamic int8 quantisation of the same graphs. Experimental: on the demo checkpoint it
  cost 45 test RSUM (``benchmarks/encode_throughput.py --checkpoint``), so no command line runs them;
- ``onnx/onnx_export.json``: the checkpoint's fingerprint, the embedding width, the longest caption the
  text graph takes, and the largest difference to the eager model measured right after export.

This is the layout of ONNX weights on the Hub that transformers.js and optimum's exports use: the graphs
in an ``onnx/`` subfolder beside the weights (``temde-hf publish`` ships it), a dual encoder's halves
named like CLIP's (``vision_model``, ``text_model``), quantised variants with ``_quantized``. Folders
exported before, with ``image_encoder.onnx`` / ``text_encoder.onnx`` / ``onnx_export.json`` beside the
weights, are still read (`temde_hf.inference.onnx_layout`).
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inference.encoder import load_encoder
from ..inference.fingerprint import checkpoint_fingerprint
from ..inference.onnx_layout import IMAGE_GRAPH, META_FILE, ONNX_DIR, TEXT_GRAPH, int8_name
from ..inference.onnx_runtime import OnnxTemdeEncoder, require_onnxruntime

logger = logging.getLogger("temde_hf.export")

OPSET = 18  # BitwiseAnd (the sketch's bucket codes) needs opset >= 18
DEFAULT_MAX_TEXT_LENGTH = 128


class _ImageGraph(nn.Module):
    """`pixel_values` -> the fused image embedding, as `get_image_features` computes it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output


class _TextGraph(nn.Module):
    """`input_ids`, `attention_mask` -> the fused text embedding, as `get_text_features` computes it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _stable_log_sigmoid(g: Any, x: Any) -> Any:
    """``log σ(x) = −(relu(−x) + log(1 + exp(−|x|)))`` as ONNX ops.

    The exporter's own ``Log(Sigmoid(x))`` is −inf once σ(x) underflows (real photos give such sketch
    logits), and the sketch's bucket sums then turn −inf · 0 into NaN; this form never overflows.
    """
    one = g.op("Constant", value_t=torch.tensor(1.0))
    softplus = g.op("Log", g.op("Add", one, g.op("Exp", g.op("Neg", g.op("Abs", x)))))
    return g.op("Neg", g.op("Add", g.op("Relu", g.op("Neg", x)), softplus))


def _export(
    module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, names: list[str], out: str | list[str]
) -> None:
    # The TorchScript exporter traces the model once; the sketch's chunk loop is unrolled for the traced
    # length, so the text graph is traced at its longest length (shorter inputs give empty chunks).
    dynamic = {name: {0: "batch"} for name in names}
    if len(names) > 1:
        dynamic = {name: {0: "batch", 1: "sequence"} for name in names}
    outs = [out] if isinstance(out, str) else out
    for name in outs:  # token outputs (tower graphs) keep the sequence axis of their inputs
        dynamic[name] = dynamic[names[0]] if name.endswith("hidden") else {0: "batch"}
    torch.onnx.register_custom_op_symbolic("aten::log_sigmoid", _stable_log_sigmoid, OPSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow, expected here
        torch.onnx.export(
            module.eval(),  # the wrapper's mode is restored after export: eval, or dropout stays on
            args,
            str(path),
            input_names=names,
            output_names=outs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def _image_size(processor: Any) -> tuple[int, int]:
    """(height, width) of the processor's output images."""
    image_processor = getattr(processor, "image_processor", processor)
    size = (
        getattr(image_processor, "crop_size", None)
        if getattr(image_processor, "do_center_crop", False)
        else None
    )
    size = size or image_processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 224))
    return edge, edge


def _max_text_length(model: nn.Module, processor: Any, requested: int | None) -> int:
    limit = getattr(model.config.text_config, "max_position_embeddings", None) or DEFAULT_MAX_TEXT_LENGTH
    tokenizer_limit = getattr(getattr(processor, "tokenizer", processor), "model_max_length", limit)
    length = requested or min(DEFAULT_MAX_TEXT_LENGTH, limit, tokenizer_limit)
    if length > min(limit, tokenizer_limit):
        raise ValueError(
            f"--max-text-length {length} exceeds the text tower's limit {min(limit, tokenizer_limit)}"
        )
    return int(length)


def quantize_int8(graph: Path) -> Path:
    """onnxruntime dynamic int8 quantisation of one graph (weights int8, activations quantised per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = graph.with_name(Path(int8_name(graph.name)).name)
    quantize_dynamic(str(graph), str(out), weight_type=QuantType.QInt8)
    return out


def export_onnx(
    checkpoint: str | Path,
    *,
    max_text_length: int | None = None,
    int8: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Write the ONNX graphs of both encoders into the checkpoint folder.

    Args:
        checkpoint: A folder written by ``save_pretrained`` (model + processor).
        max_text_length: Longest caption (in tokens) the text graph accepts (default: 128, or the
            tower's limit if smaller); longer captions are refused by the runtime, never cut silently.
        int8: Also write dynamically int8-quantised graphs.
        verify: Run both graphs on a probe batch and record the largest difference to eager PyTorch.

    Returns:
        What ``onnx_export.json`` records.
    """
    require_onnxruntime()
    checkpoint = Path(checkpoint)
    model, processor = load_encoder(checkpoint, backend="torch", device="cpu")
    # The tracer records Python shapes as constants: the factored CPU sketch (batched products shaped by
    # the traced batch) would be frozen to the example's shapes, the log-space path traces shape-generic.
    # This model is only traced, never saved, so its config may say so.
    model.config.sketch_kernel = "reference"
    height, width = _image_size(processor)
    length = _max_text_length(model, processor, max_text_length)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, height, width, generator=generator)
    input_ids = torch.randint(1, model.config.text_config.vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    (checkpoint / ONNX_DIR).mkdir(exist_ok=True)
    _export(_ImageGraph(model), (pixel_values,), checkpoint / IMAGE_GRAPH, ["pixel_values"], "image_embeds")
    _export(
        _TextGraph(model),
        (input_ids, attention_mask),
        checkpoint / TEXT_GRAPH,
        ["input_ids", "attention_mask"],
        "text_embeds",
    )
    meta: dict[str, Any] = {
        "fingerprint": checkpoint_fingerprint(checkpoint),
        "embed_dim": int(model.config.embed_dim),
        "image_size": [height, width],
        "max_text_length": length,
        "opset": OPSET,
        "graphs": [IMAGE_GRAPH, TEXT_GRAPH],
    }
    if int8:
        meta["graphs"] += [
            quantize_int8(checkpoint / g).relative_to(checkpoint).as_posix()
            for g in (IMAGE_GRAPH, TEXT_GRAPH)
        ]
    (checkpoint / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if verify:
        meta["max_abs_diff"] = verify_export(model, checkpoint)
        (checkpoint / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def verify_export(model: nn.Module, checkpoint: Path) -> dict[str, float]:
    """Largest |onnxruntime − eager| of each fp32 graph on a probe batch (random pixels, padded captions)."""
    encoder = OnnxTemdeEncoder(checkpoint)
    generator = torch.Generator().manual_seed(1)
    height, width = encoder.image_size
    pixel_values = torch.randn(3, 3, height, width, generator=generator)
    input_ids = torch.randint(1, model.config.text_config.vocab_size, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # one padded caption: padding must add nothing to the sketch
    with torch.inference_mode():
        image = (encoder.encode_image(pixel_values) - model.encode_image(pixel_values)).abs().max()
        text = encoder.encode_text(input_ids, attention_mask) - model.encode_text(input_ids, attention_mask)
    return {"image": float(image), "text": float(text.abs().max())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``temde-hf export-onnx CKPT [--int8] [--max-text-length N]``."""
    parser = argparse.ArgumentParser(prog="temde-hf export-onnx", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="folder saved with save_pretrained (model + processor)")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write dynamic int8 graphs (experimental: -45 test RSUM on the demo checkpoint; no CLI uses them)",
    )
    parser.add_argument("--max-text-length", type=int, default=None, help="longest caption in tokens")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    meta = export_onnx(args.checkpoint, max_text_length=args.max_text_length, int8=args.int8)
    print(f"wrote {', '.join(meta['graphs'])} and {META_FILE} into {args.checkpoint}")
    print(f"largest |onnxruntime - eager|: image {meta['max_abs_diff']['image']:.2e}, "
          f"text {meta['max_abs_diff']['text']:.2e}")  # fmt: skip
    return meta
