"""Scale benchmark: frozen-tower caches on disk, from real photos to COCO-sized synthetic data and beyond.

Two parts, one JSON (`benchmarks/results/scale.json`) and one RESULTS.md section:

1. **Cache build speed on real photos** (``--photos N``): the first N training photos of the shared
   Flickr8k-6k data through the real towers (EfficientNet-Lite0 + all-MiniLM-L6-v2), with the cache pass
   as it was (eager PyTorch, images decoded in the main process, float32) and as it is by default
   (onnxruntime, decoding in DataLoader workers, float16), in the same run, so the ratio holds on a shared
   machine. Captions likewise (no workers: tokenising is cheap).
2. **Training at scale on synthetic caches** (``--sizes 2000,70000``): caches with the real token shapes
   (images 49 x 1280 tokens + pooled 1280; 5 captions per image, 40 x 384 tokens + pooled 384 + mask;
   float16), written batch by batch with the cache writer; then, per size, a fresh process trains the demo
   recipe's head on them through the trainer's own batch path (`EpochBatchSampler`, `PairCollator`,
   memory-mapped `RowView` reads) and reports steps/s and its peak anonymous resident memory (RssAnon,
   sampled every 10 ms: the file-backed cache pages are shared through the page cache and not counted).
   Extrapolated to COCO (118,287 images, 591,753 captions) and to 400M pairs (one caption per image):
   disk from the bytes per image, build time from part 1's images/s, memory from the two sizes (a
   constant plus what grows per pair: the caption strings and the epoch order the trainer holds).

Target: the peak anonymous RSS of a frozen-tower run does not grow with the cache: <= half the cache
size + 1 GiB at any size.

    python benchmarks/scale.py --photos 300 --sizes 2000,70000 --work-dir /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import device_info, write_json, write_section

from temde_hf.evaluation.tables import format_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "scale.json"
PHOTOS = REPO.parent / "shared" / "data" / "flickr8k-6k" / "dataset_flickr8k.json"
# The demo recipe these caches were measured with (mean pooling over the last maps: the synthetic caches hold
# no 14 x 14 stage, which the demo's T-EMDE sketch now also reads)
RECIPE = REPO / "benchmarks" / "configs" / "flickr8k_6k_text2_demo.yaml"
# real token shapes: EfficientNet-Lite0's last map (7 x 7 x 1280) and MiniLM at the demo's 40 tokens
IMAGE_TOKENS, IMAGE_WIDTH, TEXT_TOKENS, TEXT_WIDTH, CAPTIONS_PER_IMAGE = 49, 1280, 40, 384, 5
SHARED_6K_PHOTOS = 6_090  # the shared Flickr8k-6k set, train + val
COCO = {"images": 118_287, "captions": 591_753}
LARGE = {"images": 400_000_000, "captions": 400_000_000}
GIB = 2**30


class PeakRss:
    """The largest RssAnon of this process, sampled in a thread (``/proc/self/status``, Linux)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak, self.interval, self._stop = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


# ----------------------------------------------------------------------------- part 1: real photos


def real_towers(work_dir: Path) -> tuple[Any, Any]:
    """The demo's towers (EfficientNet-Lite0 converted once under `work_dir`, MiniLM) and processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from temde_hf.convert.towers import offline_towers
    from temde_hf.models.temde import TemdeModel, TemdeProcessor

    vision_dir, text_dir = offline_towers(work_dir)
    model = TemdeModel.from_vision_text_pretrained(vision_dir, text_dir).eval()
    processor = TemdeProcessor(
        AutoImageProcessor.from_pretrained(vision_dir), AutoTokenizer.from_pretrained(text_dir)
    )
    return model, processor


def _subset(make_inputs: Any, items: list[int], rows: list[int]) -> dict[str, torch.Tensor]:
    return make_inputs([items[r] for r in rows])


def build_speed(
    n_photos: int, work_dir: Path, batch_size: int, workers: int, chunk_size: int = 512
) -> list[dict[str, Any]]:
    """Images/s and captions/s of the cache pass as it was and as it is now, same photos, same run.

    Three passes over the same items: as it was (eager, the whole build batch in one forward, images
    decoded in the main process, float32; captions in row order), the eager tower as it runs now (a few
    images per forward on a CPU, decoding in workers, float16, captions by length), and the default
    (the same through onnxruntime). They alternate over chunks of `chunk_size` photos (each chunk a whole
    build, with its start-up), so a change of the machine's load hits all alike.
    """
    from temde_hf.data import load_image_captions
    from temde_hf.data.pairs import flat_captions
    from temde_hf.training.batches import ImageInputs, TextInputs
    from temde_hf.training.features import build_tower_cache, caption_lengths
    from temde_hf.training.tower_cache import TowerOutputs

    model, processor = real_towers(work_dir)
    photos = load_image_captions(str(PHOTOS), split="train").select(range(n_photos))
    for item in photos.cast_column("image", __import__("datasets").Image(decode=False))["image"]:
        Path(item["path"]).read_bytes() if item.get("path") else None  # files in the page cache for all
    images = ImageInputs(photos, processor)
    texts = TextInputs(flat_captions(photos), processor, TEXT_TOKENS)
    lengths = caption_lengths(processor.tokenizer, texts.captions, TEXT_TOKENS)
    folder = work_dir / "build-speed"
    shutil.rmtree(folder, ignore_errors=True)
    graphs = folder / "graphs"
    rows = []
    for part, tower, inputs, n_tok in (
        ("images", model.vision_model, images, None),
        ("captions", model.text_model, texts, lengths),
    ):
        # the graphs are exported once per tower (seconds, then reused by every build): timed apart
        start, n_export = time.perf_counter(), min(batch_size, len(inputs))
        if n_tok is not None:  # traced at the longest caption of all, as the real build is
            n_tok_export = n_tok[:n_export].copy()
            n_tok_export[0] = n_tok.max()
        build_tower_cache(folder / f"export-{part}", "x", tower, inputs, n_export, batch_size=batch_size,
                          lengths=None if n_tok is None else n_tok_export, backend="onnx", graph_dir=graphs)  # fmt: skip
        export_s = time.perf_counter() - start
        # before: captions in row order (equal lengths keep it), padded to each batch's longest
        in_row_order = None if n_tok is None else np.full_like(n_tok, n_tok.max())
        variants = (  # name, backend, decoding workers, dtype, caption lengths, images per forward
            ("eager, whole batch per forward, main-process decoding, float32 (before)", "torch", 0, "float32",
             in_row_order, None),
            (f"eager, few images per forward, {workers} decoding workers, float16", "torch", workers,
             "float16", n_tok, "auto"),
            (f"onnxruntime, few images per forward, {workers} decoding workers, float16 (default)", "auto",
             workers, "float16", n_tok, "auto"),
        )  # fmt: skip
        seconds = [0.0] * len(variants)
        step = chunk_size * (CAPTIONS_PER_IMAGE if part == "captions" else 1)  # the same photos per chunk
        for chunk in range(0, len(inputs), step):
            items = list(range(chunk, min(chunk + step, len(inputs))))
            for v, (_, backend, n_workers, dtype, counts, per_call) in enumerate(variants):
                start = time.perf_counter()
                build_tower_cache(folder / f"{part}-{v}-{chunk}", "x", tower, partial(_subset, inputs, items),
                                  len(items), batch_size=batch_size, dtype=dtype,
                                  lengths=None if counts is None else counts[items], backend=backend,
                                  num_workers=n_workers if part == "images" else 0, graph_dir=graphs,
                                  images_per_call=per_call)  # fmt: skip
                seconds[v] += time.perf_counter() - start
        first = len(rows)
        reference = TowerOutputs(folder / f"{part}-0-0", "x").rows(torch.arange(min(step, len(inputs))))
        for v, ((name, *_), spent) in enumerate(zip(variants, seconds)):
            other = TowerOutputs(folder / f"{part}-{v}-0", "x").rows(torch.arange(min(step, len(inputs))))
            # caption rows of two caches may have different lengths (zeros past each caption): the common part
            t = min(reference[0].shape[1], other[0].shape[1])
            diff = max((reference[0][:, :t].float() - other[0][:, :t].float()).abs().max(),
                       (reference[1].float() - other[1].float()).abs().max())  # fmt: skip
            rows.append({"items": part, "pass": name, "n": len(inputs), "seconds": spent,
                         "per_s": len(inputs) / spent, "speedup": seconds[0] / spent,
                         "max_abs_diff_vs_eager": float(diff), "graph_export_s": export_s})  # fmt: skip
        assert len(rows) - first == len(variants)
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def fill_projection(speed: list[dict[str, Any]], n_photos: int, views: int = 2) -> list[dict[str, Any]]:
    """Seconds to fill every cache of `n_photos` (`views` image views + 5 captions each) per pass."""
    by_pass: dict[int, dict[str, float]] = {}
    for row in speed:
        index = [r["pass"] for r in speed if r["items"] == row["items"]].index(row["pass"])
        by_pass.setdefault(index, {"name": row["pass"]})[row["items"]] = row["per_s"]
    out = []
    for _, rates in sorted(by_pass.items()):
        seconds = n_photos * views / rates["images"] + n_photos * CAPTIONS_PER_IMAGE / rates["captions"]
        out.append({"pass": rates["name"].replace(" (before)", "").replace(" (default)", ""),
                    "photos": n_photos, "image_views": views, "seconds": seconds})  # fmt: skip
    for row in out:
        row["speedup"] = out[0]["seconds"] / row["seconds"]
    return out


# ----------------------------------------------------------------------------- part 2: synthetic caches


def synthetic_caches(folder: Path, n_images: int, batch_size: int = 512) -> dict[str, Any]:
    """Write synthetic image and caption caches of `n_images` (real shapes, float16) batch by batch."""
    from temde_hf.training.tower_cache import CachePlan, CacheWriter

    n_captions = n_images * CAPTIONS_PER_IMAGE
    plans = {
        "vision": CachePlan("synthetic", n_images, IMAGE_TOKENS, IMAGE_WIDTH, IMAGE_WIDTH, "float16", False, batch_size),
        "text": CachePlan("synthetic", n_captions, TEXT_TOKENS, TEXT_WIDTH, TEXT_WIDTH, "float16", True, batch_size),
    }  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    start, baseline = time.perf_counter(), PeakRss.now()
    with PeakRss() as rss:
        for part, plan in plans.items():
            writer = CacheWriter(folder / part, plan)
            writer.prepare()
            # one random block reused with a per-batch shift: the values do not matter, the bytes do
            block = torch.randn(batch_size, plan.tokens, plan.width, generator=generator)
            for batch in writer.pending():
                n = len(writer.rows(batch))
                hidden = block[:n] + 0.01 * batch
                mask = None
                if plan.has_mask:
                    lengths = torch.randint(8, plan.tokens + 1, (n,), generator=generator)
                    mask = (torch.arange(plan.tokens)[None] < lengths[:, None]).long()
                writer.write(batch, hidden, hidden[:, 0], mask)
            writer.finish()
    seconds = time.perf_counter() - start
    disk = sum(p.stat().st_blocks * 512 for p in folder.rglob("*.bin"))
    return {
        "n_images": n_images,
        "n_captions": n_captions,
        "cache_bytes": disk,
        "bytes_per_image": disk / n_images,
        "write_s": seconds,
        "write_mb_per_s": disk / seconds / 1e6,
        "writer_rss_anon_increase": rss.peak - baseline,  # what writing adds to the process
    }


def train_worker(folder: Path, n_images: int, steps: int, batch_size: int, threads: int) -> dict[str, Any]:
    """Train the demo recipe's head on the caches in `folder` (this process only), as the trainer does."""
    import datasets
    import yaml
    from transformers import BertConfig

    from temde_hf.models.temde import TemdeConfig, TemdeModel
    from temde_hf.models.temde.configuration_efficientnet_lite import EfficientNetLiteConfig
    from temde_hf.training.batches import (
        EpochBatchSampler,
        ImageInputs,
        PairCollator,
        TextInputs,
        index_loader,
        model_inputs,
    )
    from temde_hf.training.losses import contrastive_loss
    from temde_hf.training.optim import freeze_towers
    from temde_hf.training.tower_cache import RowView, TowerOutputs

    torch.set_num_threads(threads)
    with PeakRss() as rss:
        recipe = yaml.safe_load(RECIPE.read_text())["model"]
        text = BertConfig(
            hidden_size=TEXT_WIDTH, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        )
        config = TemdeConfig(vision_config=EfficientNetLiteConfig(), text_config=text, **recipe)
        model = TemdeModel(config).train()
        freeze_towers(model, {"vision": 0, "text": 0})
        n_captions = n_images * CAPTIONS_PER_IMAGE
        vision = TowerOutputs(folder / "vision", "synthetic")
        captions = TowerOutputs(folder / "text", "synthetic")
        # what the trainer holds per item besides the caches: the image column (lazy) and caption strings
        pool = datasets.Dataset.from_dict({"image": [None] * n_images})
        strings = [f"a synthetic caption number {i} of about fifty characters" for i in range(n_captions)]
        c2i = torch.arange(n_images).repeat_interleave(CAPTIONS_PER_IMAGE)
        images = ImageInputs(pool, None, RowView([vision], torch.arange(n_images)))
        texts = TextInputs(strings, None, TEXT_TOKENS, RowView([captions], torch.arange(n_captions)))
        sampler = EpochBatchSampler(c2i, batch_size, seed=0)
        loader = index_loader(sampler, PairCollator(images, texts, c2i))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        times = []
        for step, batch in enumerate(loader):
            if step == steps + 3:
                break
            start = time.perf_counter()
            out = model(**model_inputs(batch), return_dict=True)
            loss = contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale, batch["pair_ids"],
                                    negatives="local")  # fmt: skip
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 3:  # after warm-up
                times.append(time.perf_counter() - start)
        loader_s = 0.0
        for step, _ in enumerate(
            index_loader(EpochBatchSampler(c2i, batch_size, seed=1), PairCollator(images, texts, c2i))
        ):
            if step == 0:
                start = time.perf_counter()
            if step == steps:
                loader_s = (time.perf_counter() - start) / (steps - 1)
                break
    return {
        "steps": len(times),
        "batch_size": batch_size,
        "step_s": sorted(times)[len(times) // 2],
        "steps_per_s": 1 / sorted(times)[len(times) // 2],
        "batch_read_s": loader_s,
        "peak_rss_anon": rss.peak,
        "threads": threads,
    }


def scale_rows(
    sizes: list[int], work_dir: Path, steps: int, batch_size: int, threads: int
) -> list[dict[str, Any]]:
    rows = []
    for n_images in sizes:
        folder = work_dir / f"synthetic-{n_images}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            row = synthetic_caches(folder, n_images)
            command = [sys.executable, __file__, "--train-worker", str(folder), "--sizes", str(n_images),
                       "--steps", str(steps), "--batch-size", str(batch_size), "--threads", str(threads)]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode:
                raise SystemExit(f"scale: the training worker failed:\n{result.stderr[-3000:]}")
            row.update(json.loads(result.stdout.strip().splitlines()[-1]))
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the synthetic caches are large: never left behind
        row["target_rss"] = row["cache_bytes"] / 2 + GIB
        row["meets_target"] = row["peak_rss_anon"] <= row["target_rss"]
        rows.append(row)
    return rows


def extrapolate(rows: list[dict[str, Any]], speed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO and 400M pairs from the measured sizes: disk per item, build speed, memory per pair."""
    small, large = rows[0], rows[-1]
    image_bytes = IMAGE_TOKENS * IMAGE_WIDTH * 2 + IMAGE_WIDTH * 2
    caption_bytes = TEXT_TOKENS * TEXT_WIDTH * 2 + TEXT_WIDTH * 2 + TEXT_TOKENS
    pairs = (large["n_captions"] - small["n_captions"]) or 1
    per_pair = max(0.0, (large["peak_rss_anon"] - small["peak_rss_anon"]) / pairs)
    fixed = small["peak_rss_anon"] - per_pair * small["n_captions"]
    speeds = {row["items"]: row["per_s"] for row in speed if "onnxruntime" in row["pass"]}
    out = []
    for name, size in (("COCO train", COCO), ("400M pairs", LARGE)):
        cache = size["images"] * image_bytes + size["captions"] * caption_bytes
        rss = fixed + per_pair * size["captions"]
        out.append({
            "dataset": name, **size, "cache_bytes": cache, "cache_gib": cache / GIB,
            "build_hours_one_process": (size["images"] / speeds.get("images", float("nan"))
                                        + size["captions"] / speeds.get("captions", float("nan"))) / 3600,
            "peak_rss_anon_gib": rss / GIB, "target_gib": (cache / 2 + GIB) / GIB,
            "meets_target": rss <= cache / 2 + GIB, "rss_per_pair_bytes": per_pair,
        })  # fmt: skip
    return out


def markdown(payload: dict[str, Any]) -> str:
    speed, rows, extra = payload.get("build_speed"), payload.get("scale"), payload.get("extrapolated")
    parts = []
    for part, run in payload["runs"].items():
        parts.append(f"- {part}: measured by `{run['command']}` on {run['env']['cpu_threads']} CPU threads (load "
                     f"average {run['env']['loadavg'][0]:.1f} on a shared machine: compare rows of one run).")  # fmt: skip
    parts.append("")
    if speed:
        parts.append(
            "Cache pass on real photos (first Flickr8k-6k training photos, real towers, build batches of "
            f"{payload.get('build_batch_size', 64)}; captions before in row order, now in length order; "
            "max abs diff: the stored rows against the float32 rows of the pass as it was; graph export "
            "timed apart, once per tower):\n\n"
            + format_table(
                [{**r, "graph_export_s": r["graph_export_s"] if "onnx" in r["pass"] else ""} for r in speed],
                ["items", "pass", "n", "per_s", "speedup", "max_abs_diff_vs_eager", "graph_export_s"],
                ["items", "cache pass", "n", "items/s", "speed-up", "max abs diff", "ONNX export (s)"],
                float_format=".3g",
            )
        )
    fill = payload.get("fill_6k")
    if fill:
        parts.append(
            f"\nFilling every cache of the {fill[0]['photos']:,} Flickr8k-6k photos (the image and its mirror, "
            "5 captions each), from the rates above:\n\n"
            + format_table(
                fill,
                ["pass", "seconds", "speedup"],
                ["cache pass", "seconds", "speed-up"],
                float_format=".3g",
            )
        )
    if rows:
        table = [{**r, "cache_gib": r["cache_bytes"] / GIB, "rss_gib": r["peak_rss_anon"] / GIB,
                  "target_gib": r["target_rss"] / GIB, "writer_gib": r["writer_rss_anon_increase"] / GIB,
                  "kb_per_image": r["bytes_per_image"] / 1e3} for r in rows]  # fmt: skip
        parts.append(
            "\nSynthetic caches with real token shapes (images 49 x 1280, 5 captions x 40 x 384, float16), "
            f"training the demo head, batch {rows[0]['batch_size']}, one process:\n\n"
            + format_table(
                table,
                [
                    "n_images",
                    "n_captions",
                    "cache_gib",
                    "kb_per_image",
                    "write_mb_per_s",
                    "writer_gib",
                    "steps_per_s",
                    "rss_gib",
                    "target_gib",
                    "meets_target",
                ],
                [
                    "images",
                    "captions",
                    "cache (GiB)",
                    "disk/image (kB)",
                    "write MB/s",
                    "writer anon RSS increase (GiB)",
                    "train steps/s",
                    "peak anon RSS (GiB)",
                    "target (GiB)",
                    "meets",
                ],
                float_format=".3g",
            )
        )
    if extra:
        parts.append(
            "\nExtrapolated (disk from the bytes per item; build time at the onnxruntime rates above, one "
            "process; memory = the small run's + the measured growth per pair, clipped at 0 when the two sizes "
            "differ by less than the sampling noise). The caches add no anonymous memory at any size; what "
            "still grows per pair is the trainer's list of caption strings and its epoch order (Python "
            "lists), small at COCO size but not at 400M pairs: that is what streaming training data "
            "removes.\n\n"
            + format_table(
                extra,
                [
                    "dataset",
                    "images",
                    "captions",
                    "cache_gib",
                    "build_hours_one_process",
                    "peak_rss_anon_gib",
                    "target_gib",
                    "meets_target",
                ],
                [
                    "dataset",
                    "images",
                    "captions",
                    "cache (GiB)",
                    "build (h, 1 process)",
                    "peak anon RSS (GiB)",
                    "target (GiB)",
                    "meets",
                ],
                float_format=".3g",
            )
        )
    return "\n".join(parts)


def _run_info(command: str) -> dict[str, Any]:
    return {"command": command, "env": {**device_info(torch.device("cpu")), "loadavg": os.getloadavg()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300, help="real photos for the build speed (0: skip)")
    parser.add_argument("--sizes", default="2000,70000", help="synthetic cache sizes in images ('' : skip)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "scale")
    parser.add_argument("--batch-size", type=int, default=128, help="training pairs per step")
    parser.add_argument("--build-batch-size", type=int, default=64, help="items per cache build batch")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers of the default pass")
    parser.add_argument("--chunk", type=int, default=512, help="photos per alternation of the passes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-docs", action="store_true", help="do not write the RESULTS.md section")
    parser.add_argument("--train-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.train_worker:
        print(
            json.dumps(train_worker(args.train_worker, sizes[0], args.steps, args.batch_size, args.threads))
        )
        return {}
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # a part not run this time keeps its figures from the previous JSON (each part is measured once)
    payload = json.loads(args.output.read_text()) if args.output.is_file() else {}
    payload.setdefault("runs", {})
    command = "python benchmarks/scale.py " + " ".join(
        a for a in argv if "work-dir" not in a and not a.startswith("/")
    )
    if args.photos:
        payload["build_speed"] = build_speed(
            args.photos, args.work_dir, args.build_batch_size, args.workers, args.chunk
        )
        payload["build_batch_size"] = args.build_batch_size
        payload["fill_6k"] = fill_projection(payload["build_speed"], SHARED_6K_PHOTOS)
        payload["runs"]["build_speed"] = _run_info(command)
    if sizes:
        payload["scale"] = scale_rows(sizes, args.work_dir, args.steps, args.batch_size, args.threads)
        payload["runs"]["scale"] = _run_info(command)
    payload["benchmark"] = "scale"
    rows, speed = payload.get("scale", []), payload.get("build_speed", [])
    payload["extrapolated"] = extrapolate(rows, speed) if len(rows) >= 2 and speed else []
    print(markdown(payload))
    print(f"wrote {write_json(payload, args.output)}")
    if not args.no_docs:
        write_section(
            REPO / "benchmarks" / "RESULTS.md", "scale", markdown(payload), "Scale: tower caches on disk"
        )
    return payload


if __name__ == "__main__":
    main()
