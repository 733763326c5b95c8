"""Encoding throughput (images/s, captions/s) of a T-EMDE model against the same towers with plain pooling.

Variants share tower configs and input batches; only the head differs: `plain-mean` is
`sketch_fusion="none"` (masked-mean pooling), `temde-concat` adds the shared sketch (fused Triton kernel
on CUDA under `sketch_kernel="auto"`), and on CUDA `temde-concat-torch-kernel` forces the PyTorch sketch.

    python benchmarks/encode_throughput.py --device cuda --towers base     # ViT-B/16 + BERT-base, bf16
    python benchmarks/encode_throughput.py --device cpu --quick            # tiny towers smoke run

Target (GPU): T-EMDE throughput >= 0.95x plain pooling on the same towers.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import (
    build_model,
    device_info,
    format_table,
    make_batch,
    model_benchmark_args,
    model_variants,
    resolve_device,
    time_fn,
    write_json,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "encode_throughput.json"


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CUDA when asked; plain fp32 otherwise."""
    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = model_benchmark_args(argv, __doc__, DEFAULT_OUTPUT, "default 256 (cuda) / 32 (cpu)")
    device = resolve_device(args.device)
    batch_size = args.batch_size or (8 if args.quick else 256 if device.type == "cuda" else 32)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    repeats = args.repeats or (3 if args.quick else 20)
    n_sketches, n_hyperplanes = (int(v) for v in args.sketch.lower().split("x"))
    rows = []
    for name, (fusion, kernel) in model_variants(device).items():
        model, sizes = build_model(
            args.towers, fusion, kernel, n_sketches, n_hyperplanes, args.projection_dim
        )
        model = model.to(device).eval()
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
    settings = {
        "towers": args.towers, "batch_size": batch_size, "projection_dim": args.projection_dim, "sketch": args.sketch,
        "dtype": args.dtype if device.type == "cuda" else "fp32", "warmup": warmup, "repeats": repeats, **sizes,
    }  # fmt: skip
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
