"""Encoding throughput (images/s, captions/s) of a T-EMDE model against the same towers with plain pooling.

Variants share tower configs and input batches; only the head differs: `plain-mean` is
`sketch_fusion="none"` (masked-mean pooling), `temde-concat` adds the shared sketch (fused Triton kernel
on CUDA under `sketch_kernel="auto"`), and on CUDA `temde-concat-torch-kernel` forces the PyTorch sketch.

    python benchmarks/encode_throughput.py --device cuda --towers base     # ViT-B/16 + BERT-base, bf16
    python benchmarks/encode_throughput.py --device cpu --quick            # tiny towers smoke run

Target (GPU): T-EMDE throughput >= 0.95x plain pooling on the same towers.

With ``--checkpoint CKPT`` it compares the encoder backends of a real checkpoint on the CPU instead
(eager PyTorch, onnxruntime fp32, onnxruntime int8; graphs from ``temde-hf export-onnx CKPT --int8``):
images/s and captions/s of the model on preprocessed batches of the shared Flickr8k photos and
captions, images/s of the whole pipeline (decode + preprocess + model), the largest difference of the
embeddings to eager, and the test-split RSUM each backend gives through ``encode_dataset``:

    python benchmarks/encode_throughput.py --checkpoint outputs/demo --output benchmarks/results/encode_backends_cpu.json
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import (
    FLICKR8K_JSON,
    device_info,
    make_batch,
    model_benchmark_args,
    model_benchmark_settings,
    time_fn,
    variant_models,
    write_json,
)

from temde_hf.data import load_image_captions, open_image
from temde_hf.evaluation.folds import evaluate_embeddings
from temde_hf.evaluation.tables import format_table
from temde_hf.inference.encode import encode_dataset, encode_images
from temde_hf.inference.encoder import load_encoder

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "encode_throughput.json"


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CUDA when asked; plain fp32 otherwise."""
    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def backend_rows(
    checkpoint: Path, batch_size: int, repeats: int, data: Path = FLICKR8K_JSON
) -> list[dict[str, Any]]:
    """Speed, agreement with eager and test RSUM of each encoder backend of a real checkpoint (CPU)."""
    import datasets

    test = load_image_captions(str(data), split="test")
    eager, processor = load_encoder(checkpoint, backend="torch", device="cpu")
    photos = test.cast_column("image", datasets.Image(decode=False))["image"][:batch_size]
    pixel_values = processor(images=[open_image(p) for p in photos], return_tensors="pt")["pixel_values"]
    captions = [c for row in test["captions"] for c in row][: batch_size * 4]
    text = processor(text=captions, padding=True, truncation=True, max_length=40, return_tensors="pt")
    cpu, rows, reference = torch.device("cpu"), [], None
    for backend in ("torch", "onnx", "onnx-int8"):
        model = eager if backend == "torch" else load_encoder(checkpoint, backend=backend)[0]
        with torch.inference_mode():
            image_ms = time_fn(lambda m=model: m.encode_image(pixel_values), cpu, 1, repeats)
            text_ms = time_fn(
                lambda m=model: m.encode_text(text["input_ids"], text["attention_mask"]), cpu, 1, repeats
            )
            pipeline_ms = time_fn(
                lambda m=model: encode_images(m, processor, photos, batch_size=batch_size, progress=False),
                cpu,
                0,
                2,
            )
        images, texts, c2i = encode_dataset(model, processor, test, batch_size, "cpu", 40)
        reference = reference or (images, texts)
        rows.append({
            "backend": backend, "images_per_s": batch_size / image_ms * 1e3,
            "captions_per_s": len(captions) / text_ms * 1e3, "pipeline_images_per_s": batch_size / pipeline_ms * 1e3,
            "max_abs_diff_vs_eager": float(max((images - reference[0]).abs().max(), (texts - reference[1]).abs().max())),
            "test_rsum": evaluate_embeddings(images, texts, c2i, fold_size=None)["full"]["rsum"],
        })  # fmt: skip
    for row in rows:
        row["image_speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["text_speedup"] = row["captions_per_s"] / rows[0]["captions_per_s"]
        row["rsum_minus_eager"] = row["test_rsum"] - rows[0]["test_rsum"]
    return rows


def backends_main(argv: list[str]) -> dict[str, Any]:
    """The ``--checkpoint`` mode: encoder backends of a real checkpoint on the CPU."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description="encoder backends of a checkpoint (CPU)")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=FLICKR8K_JSON, help="its test split is encoded")
    parser.add_argument("--device", choices=["cpu"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (onnxruntime: one per core)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT.with_name("encode_backends_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = backend_rows(args.checkpoint, args.batch_size, args.repeats, args.data)
    payload = {
        "benchmark": "encode_throughput",
        "env": {**device_info(torch.device("cpu")), "loadavg": os.getloadavg()},
        "settings": {"checkpoint": str(args.checkpoint), "data": str(args.data), "batch_size": args.batch_size, "repeats": args.repeats,
                     "threads": args.threads, "captions_per_batch": 4 * args.batch_size, "max_length": 40},
        "results": rows,
    }  # fmt: skip
    path = write_json(payload, args.output)
    print(format_table(rows, ["backend", "images_per_s", "image_speedup", "pipeline_images_per_s", "captions_per_s",
                              "text_speedup", "max_abs_diff_vs_eager", "test_rsum", "rsum_minus_eager"]))  # fmt: skip
    print(f"wrote {path}")
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if "--checkpoint" in argv:
        return backends_main(argv)
    args = model_benchmark_args(argv, __doc__, DEFAULT_OUTPUT, batch_size=(256, 32), warmup=5, repeats=20)
    device, batch_size, warmup, repeats = args.device, args.batch_size, args.warmup, args.repeats
    rows = []
    for name, model, sizes in variant_models(args):
        model = model.eval()
        batch = make_batch(sizes, batch_size, device)
        with torch.inference_mode(), autocast(device, args.dtype):
            image_ms = time_fn(
                lambda m=model, b=batch: m.encode_image(b["pixel_values"]), device, warmup, repeats
            )
            text_ms = time_fn(
                lambda m=model, b=batch: m.encode_text(b["input_ids"], b["attention_mask"]),
                device,
                warmup,
                repeats,
            )
        rows.append({
            "variant": name, "embed_dim": model.config.embed_dim, "image_ms": image_ms, "text_ms": text_ms,
            "images_per_s": batch_size / image_ms * 1e3, "captions_per_s": batch_size / text_ms * 1e3,
        })  # fmt: skip
        del model
    base = rows[0]
    for row in rows:
        row["image_ratio_vs_plain"] = row["images_per_s"] / base["images_per_s"]
        row["text_ratio_vs_plain"] = row["captions_per_s"] / base["captions_per_s"]
    settings = model_benchmark_settings(args, sizes)
    payload = {
        "benchmark": "encode_throughput",
        "env": device_info(device),
        "settings": settings,
        "results": rows,
    }
    path = write_json(payload, args.output)
    columns = [
        "variant",
        "embed_dim",
        "images_per_s",
        "captions_per_s",
        "image_ratio_vs_plain",
        "text_ratio_vs_plain",
    ]
    print(format_table(rows, columns))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
