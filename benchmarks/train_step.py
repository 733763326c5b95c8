"""Throughput of one training step (forward with loss, backward, AdamW) of T-EMDE vs plain pooling.

Same towers, same batch of image-caption pairs; variants as in `encode_throughput.py`. Reports median
step time, pairs/s, the ratio to plain pooling and, on CUDA, the step's peak memory.

    python benchmarks/train_step.py --device cuda --towers base      # ViT-B/16 + BERT-base, bf16 autocast
    python benchmarks/train_step.py --device cpu --quick             # tiny towers smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import (
    device_info,
    make_batch,
    model_benchmark_args,
    model_benchmark_settings,
    peak_memory_mib,
    time_fn,
    variant_models,
    write_json,
)
from encode_throughput import autocast

from temde_hf.evaluation.tables import format_table

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "train_step.json"


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, dtype: str):
    """A closure running one full optimisation step on `batch`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = model_benchmark_args(argv, __doc__, DEFAULT_OUTPUT, batch_size=(128, 16), warmup=3, repeats=10)
    device, batch_size = args.device, args.batch_size
    rows = []
    for name, model, sizes in variant_models(args):
        model = model.train()
        step = make_step(model, make_batch(sizes, batch_size, device), device, args.dtype)
        ms = time_fn(step, device, args.warmup, args.repeats)
        rows.append(
            {
                "variant": name,
                "step_ms": ms,
                "pairs_per_s": batch_size / ms * 1e3,
                "peak_mib": peak_memory_mib(step, device),
            }
        )
        del model, step
    for row in rows:
        row["ratio_vs_plain"] = row["pairs_per_s"] / rows[0]["pairs_per_s"]
    settings = model_benchmark_settings(args, sizes)
    payload = {"benchmark": "train_step", "env": device_info(device), "settings": settings, "results": rows}
    path = write_json(payload, args.output)
    print(format_table(rows, ["variant", "step_ms", "pairs_per_s", "ratio_vs_plain", "peak_mib"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
