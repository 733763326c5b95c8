"""Throughput of one training step (forward with loss, backward, AdamW) of T-EMDE vs plain pooling.

Same towers, same batch of image-caption pairs; variants as in `encode_throughput.py`. Reports median
step time, pairs/s, the ratio to plain pooling and, on CUDA, the step's peak memory.

    python benchmarks/train_step.py --device cuda --towers base      # ViT-B/16 + BERT-base, bf16 autocast
    python benchmarks/train_step.py --device cpu --quick             # tiny towers smoke run
    python benchmarks/train_step.py --report --output benchmarks/results/train_step_cpu_tiny.json

Each run writes its RESULTS.md section (named after the JSON); ``--report`` rewrites it from the stored JSON.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import (
    device_info,
    env_sentence,
    load_report,
    make_batch,
    model_benchmark_args,
    model_benchmark_command,
    model_benchmark_settings,
    num,
    peak_memory_mib,
    results_doc,
    shown_path,
    time_fn,
    variant_models,
    write_json,
    write_section,
)
from encode_throughput import autocast

from temde_hf.evaluation.tables import format_table

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "train_step.json"
DEFAULTS = {"batch_size": (128, 16), "warmup": 3, "repeats": 10}  # of `model_benchmark_args`
HEADING = "One training step: T-EMDE against plain pooling"


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


def render(payload: dict[str, Any], output: Path) -> str:
    """The RESULTS.md section of a stored run: its command, setup and table."""
    settings, env, rows = payload["settings"], payload["env"], payload["results"]
    report = shlex.join(["python", "benchmarks/train_step.py", "--report", "--output", shown_path(output)])
    cells = [{"variant": r["variant"], "ms": num(r["step_ms"]), "pairs": num(r["pairs_per_s"]),
              "ratio": f"{r['ratio_vs_plain']:.2f}×", "peak": num(r.get("peak_mib"))} for r in rows]  # fmt: skip
    columns, headers = (
        ["variant", "ms", "pairs", "ratio"],
        ["variant", "ms per step", "train pairs/s", "vs plain"],
    )
    if any(r.get("peak_mib") is not None for r in rows):
        columns, headers = [*columns, "peak"], [*headers, "peak MiB"]
    return "\n".join([
        f"    {model_benchmark_command('train_step.py', payload, output, DEFAULTS)}", f"    {report}", "",
        f"Measured on {env_sentence(env)}: `{settings['towers']}` towers ({settings['image_size']}-px images, captions "
        f"of {settings['text_len']} tokens), projection {settings['projection_dim']}, sketch {settings['sketch']} (N×H), "
        f"{settings['dtype']}, batch {settings['batch_size']} pairs; forward with loss, backward, AdamW; median of "
        f"{settings['repeats']} steps after {settings['warmup']} warm-up steps.", "",
        format_table(cells, columns, headers),
    ])  # fmt: skip


def write_report(payload: dict[str, Any], output: Path, trial: bool = False) -> str:
    """Render `payload` (stored at `output`) into its RESULTS.md section (named after the JSON)."""
    markdown = render(payload, output)
    write_section(results_doc(output, trial), Path(output).stem, markdown, HEADING)
    return markdown


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = model_benchmark_args(argv, __doc__, DEFAULT_OUTPUT, batch_size=DEFAULTS["batch_size"],
                                warmup=DEFAULTS["warmup"], repeats=DEFAULTS["repeats"])  # fmt: skip
    if args.report:
        payload = load_report(args.output)
        print(write_report(payload, args.output))
        return payload
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
    write_report(payload, path, args.quick)
    print(f"wrote {path} and its section of {results_doc(path, args.quick)}")
    return payload


if __name__ == "__main__":
    main()
