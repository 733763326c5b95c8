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

Each run writes its RESULTS.md section (named after the JSON), the table and the verdict computed from the
JSON; ``--report --output JSON`` rewrites it from a stored JSON of either mode without measuring.
"""

from __future__ import annotations

import shlex
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import (
    FLICKR8K_JSON,
    checkpoint_sentence,
    checkpoint_summary,
    device_info,
    env_sentence,
    load_report,
    load_sentence,
    make_batch,
    model_benchmark_args,
    model_benchmark_command,
    model_benchmark_settings,
    num,
    results_doc,
    shown_path,
    stored_path,
    time_fn,
    variant_models,
    write_json,
    write_section,
)

from temde_hf.data import load_image_captions, open_image
from temde_hf.evaluation.folds import evaluate_embeddings
from temde_hf.evaluation.tables import format_table
from temde_hf.inference.encode import encode_dataset, encode_images
from temde_hf.inference.encoder import load_encoder

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "encode_throughput.json"
BACKENDS_OUTPUT = DEFAULT_OUTPUT.with_name("encode_backends_cpu.json")
DEFAULTS = {"batch_size": (256, 32), "warmup": 5, "repeats": 20}  # of `model_benchmark_args`
HEADING = "Encode throughput: T-EMDE against plain pooling"
BACKENDS_HEADING = "Encoding backends of a checkpoint (CPU)"
RATIO_TARGET = (
    0.95  # T-EMDE images/s and captions/s over plain pooling's, on real towers (ViT-B/16 + BERT-base)
)
BACKEND_SPEEDUP, BACKEND_MAX_DIFF = (
    2.0,
    1e-4,
)  # a backend worth offering: >= 2x eager images/s, same embeddings


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
    parser.add_argument("--output", type=Path, default=BACKENDS_OUTPUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = backend_rows(args.checkpoint, args.batch_size, args.repeats, args.data)
    payload = {
        "benchmark": "encode_throughput",
        "env": {**device_info(torch.device("cpu")), "loadavg": os.getloadavg(), "onnxruntime": _version("onnxruntime")},
        "settings": {"checkpoint": str(args.checkpoint), "data": stored_path(args.data), "batch_size": args.batch_size, "repeats": args.repeats,
                     "threads": args.threads, "captions_per_batch": 4 * args.batch_size, "max_length": 40,
                     "model": checkpoint_summary(args.checkpoint)},
        "results": rows,
    }  # fmt: skip
    path = write_json(payload, args.output)
    print(format_table(rows, ["backend", "images_per_s", "image_speedup", "pipeline_images_per_s", "captions_per_s",
                              "text_speedup", "max_abs_diff_vs_eager", "test_rsum", "rsum_minus_eager"]))  # fmt: skip
    write_report(payload, path)
    print(f"wrote {path} and its section of {results_doc(path)}")
    return payload


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------
# The RESULTS.md sections, from the JSON alone
# ----------------------------------------------------------------------------------------------
def render_variants(payload: dict[str, Any], output: Path) -> str:
    """The section of a tower-variant run: command, setup, table, and the target on real towers."""
    settings, env, rows = payload["settings"], payload["env"], payload["results"]
    command = model_benchmark_command("encode_throughput.py", payload, output, DEFAULTS)
    report = shlex.join(
        ["python", "benchmarks/encode_throughput.py", "--report", "--output", shown_path(output)]
    )
    cells = [{"variant": r["variant"], "dim": r["embed_dim"], "images": num(r["images_per_s"]),
              "image_ratio": f"{r['image_ratio_vs_plain']:.2f}×", "captions": num(r["captions_per_s"]),
              "text_ratio": f"{r['text_ratio_vs_plain']:.2f}×"} for r in rows]  # fmt: skip
    table = format_table(cells, ["variant", "dim", "images", "image_ratio", "captions", "text_ratio"],
                         ["variant", "embedding dim", "images/s", "vs plain", "captions/s", "vs plain"])  # fmt: skip
    lines = [f"    {command}", f"    {report}", "",
             f"Measured on {env_sentence(env)}: `{settings['towers']}` towers ({settings['image_size']}-px images, "
             f"captions of {settings['text_len']} tokens), projection {settings['projection_dim']}, sketch {settings['sketch']} "
             f"(N×H), {settings['dtype']}, batch {settings['batch_size']}; median of {settings['repeats']} calls after "
             f"{settings['warmup']} warm-up calls.", "", table]  # fmt: skip
    temde = [r for r in rows if r["variant"] != "plain-mean"]
    if settings["towers"] == "base" and temde:
        worst = min(min(r["image_ratio_vs_plain"], r["text_ratio_vs_plain"]) for r in temde)
        lines += ["", f"Target (T-EMDE ≥ {RATIO_TARGET}× plain pooling's throughput on these towers): "
                  + ("**met**" if worst >= RATIO_TARGET else "**not met**") + f" (lowest ratio {worst:.2f}×)."]  # fmt: skip
    return "\n".join(lines)


def backends_command(payload: dict[str, Any], output: Path) -> str:
    """The ``--checkpoint`` command that measured `payload`, rebuilt from its settings (defaults left out)."""
    settings = payload["settings"]
    words = ["--checkpoint", settings["checkpoint"]]
    if settings.get("data") not in (None, stored_path(FLICKR8K_JSON)):
        words += ["--data", settings["data"]]
    for flag, key, default in (
        ("--batch-size", "batch_size", 32),
        ("--repeats", "repeats", 5),
        ("--threads", "threads", 2),
    ):
        if settings[key] != default:
            words += [flag, str(settings[key])]
    return shlex.join(["python", "benchmarks/encode_throughput.py", *words, "--output", shown_path(output)])


def render_backends(payload: dict[str, Any], output: Path) -> str:
    """The section of a ``--checkpoint`` run: command, setup, table and the verdict per backend."""
    settings, env, rows = payload["settings"], payload["env"], payload["results"]
    report = shlex.join(
        ["python", "benchmarks/encode_throughput.py", "--report", "--output", shown_path(output)]
    )
    names = {"torch": "eager PyTorch", "onnx": "onnxruntime fp32", "onnx-int8": "onnxruntime int8 (dynamic)"}
    cells = [{"backend": names.get(r["backend"], r["backend"]), "images": num(r["images_per_s"]),
              "image_speedup": f"{r['image_speedup']:.2f}×", "pipeline": num(r["pipeline_images_per_s"]),
              "captions": num(r["captions_per_s"]), "text_speedup": f"{r['text_speedup']:.2f}×",
              "diff": f"{r['max_abs_diff_vs_eager']:.2g}", "rsum": f"{r['test_rsum']:.1f}",
              "delta": f"{r['rsum_minus_eager']:+.1f}"} for r in rows]  # fmt: skip
    table = format_table(cells, ["backend", "images", "image_speedup", "pipeline", "captions", "text_speedup", "diff", "rsum", "delta"],
                         ["backend", "images/s", "vs eager", "pipeline images/s", "captions/s", "vs eager",
                          "max \\|Δ embedding\\|", "test RSUM", "Δ RSUM"])  # fmt: skip
    model = checkpoint_sentence(settings.get("model", {}))
    runtime = f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else ""
    lines = [f"    {backends_command(payload, output)}", f"    {report}", "",
             f"Checkpoint `{settings['checkpoint']}`" + (f" ({model})" if model else " (the JSON records its path only)")
             + f", measured on {env_sentence(env)}{runtime}; "
             f"{load_sentence({'during the run': env.get('loadavg')})}. Model only: a batch of {settings['batch_size']} "
             f"preprocessed test photos / {settings['captions_per_batch']} captions (≤ {settings['max_length']} tokens), "
             f"median of {settings['repeats']}; pipeline: decode + preprocess + model over {settings['batch_size']} photos; "
             "test RSUM: the test split encoded through `encode_dataset` by each backend.", "", table]  # fmt: skip

    def meets(r: dict[str, Any]) -> bool:
        return (r["image_speedup"] >= BACKEND_SPEEDUP and r["max_abs_diff_vs_eager"] <= BACKEND_MAX_DIFF
                and abs(r["rsum_minus_eager"]) < 0.05)  # fmt: skip

    others = rows[1:]
    met = [r for r in others if meets(r)]
    verdict = (f"Target (≥ {BACKEND_SPEEDUP:g}× eager images/s, embeddings within {BACKEND_MAX_DIFF:g}, test RSUM "
               "unchanged): " + (", ".join(f"**met by {names.get(r['backend'], r['backend'])}**" for r in met) or "**not met**"))  # fmt: skip
    missed = [f"{names.get(r['backend'], r['backend'])} ({r['image_speedup']:.2f}×, {r['max_abs_diff_vs_eager']:.2g}, "
              f"RSUM {r['rsum_minus_eager']:+.1f})" for r in others if not meets(r)]  # fmt: skip
    if missed:
        verdict += "; not by " + ", ".join(missed)
    lines += ["", verdict + "."]
    if met:
        best = max(met, key=lambda r: r["pipeline_images_per_s"])
        hours = [1e6 / r["pipeline_images_per_s"] / 3600 for r in (best, rows[0])]
        share = 1 - best["pipeline_images_per_s"] / best["images_per_s"]
        # the pipeline runs the one encode path, which splits a CPU batch into smaller forwards: where that
        # beats one forward over the whole batch, the rates do not give the decoding's share
        decode = (f"decoding and resizing is {share:.0%} of its pipeline time" if share > 0 else
                  "the encode path's smaller forwards outrun one forward over the whole batch, so these rates do "
                  "not give the decoding's share")  # fmt: skip
        lines += ["", f"A million photos end to end at the pipeline rates above: {num(hours[0], 2)} hours with "
                  f"{names.get(best['backend'], best['backend'])}, {num(hours[1], 2)} hours eager; {decode}."]  # fmt: skip
    return "\n".join(lines)


def render(payload: dict[str, Any], output: Path) -> str:
    """The RESULTS.md section of a stored JSON of either mode (``--checkpoint`` runs record a checkpoint)."""
    return (render_backends if "checkpoint" in payload["settings"] else render_variants)(payload, output)


def write_report(payload: dict[str, Any], output: Path, trial: bool = False) -> str:
    """Render `payload` (stored at `output`, either mode) into its RESULTS.md section (named after the JSON)."""
    heading = BACKENDS_HEADING if "checkpoint" in payload["settings"] else HEADING
    markdown = render(payload, output)
    write_section(results_doc(output, trial), Path(output).stem, markdown, heading)
    return markdown


def report_main(argv: list[str]) -> dict[str, Any]:
    """``--report``: rewrite the section of a stored JSON of either mode, measuring nothing."""
    import argparse

    parser = argparse.ArgumentParser(description="rewrite the RESULTS.md section from a stored JSON")
    parser.add_argument("--report", action="store_true", required=True)
    parser.add_argument(
        "--output", type=Path, default=BACKENDS_OUTPUT if "--checkpoint" in argv else DEFAULT_OUTPUT
    )
    args, _ = parser.parse_known_args(argv)  # the measuring flags may stay on the line: they are not used
    payload = load_report(args.output)
    print(write_report(payload, args.output))
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if "--report" in argv:
        return report_main(argv)
    if "--checkpoint" in argv:
        return backends_main(argv)
    args = model_benchmark_args(argv, __doc__, DEFAULT_OUTPUT, batch_size=DEFAULTS["batch_size"],
                                warmup=DEFAULTS["warmup"], repeats=DEFAULTS["repeats"])  # fmt: skip
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
    write_report(payload, path, args.quick)
    print(f"wrote {path} and its section of {results_doc(path, args.quick)}")
    return payload


if __name__ == "__main__":
    main()
