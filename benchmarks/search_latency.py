"""Gallery search at 100k / 1M images with the embedding the model really makes: latency, recall, memory.

Gallery vectors have the structure of real ones. Each synthetic image is a real Flickr8k-800 photo's
token set (the checkpoint's projected EfficientNet tokens) with a random part of its tokens replaced by
another photo's tokens and a little noise, passed through the checkpoint's own T-EMDE head (pooling +
sketch + fusion): a real fused embedding of an image that does not exist. Queries are the checkpoint's
embeddings of real captions. Vectors are generated in chunks into the sharded build's shard files
(fp16, as ``temde-hf index --shard-dtype float16`` writes them) and every index is built by the sharded
path's merge step (`merge_shards`, rank 0's job), then saved and loaded as ``temde-hf search`` does.

Per index setting: median ms of one-query searches (one FAISS thread), recall@10 against the exact
fused top-10 (computed in float32 while generating), RAM bytes per image (``index.faiss``), bytes per
image of the memory-mapped re-rank store, build seconds. A 10M row extrapolates the measured 100k -> 1M
scaling (not measured). ``--protocol`` also scores the standard retrieval protocol on the test split
through each index type against the exact evaluation.

    python benchmarks/search_latency.py --checkpoint outputs/demo                  # 100k + 1M
    python benchmarks/search_latency.py --checkpoint outputs/demo --sizes 100000 --protocol
    python benchmarks/search_latency.py --synthetic-dim 64 --sizes 3000 --quick    # smoke, no checkpoint
    python benchmarks/search_latency.py --report --output benchmarks/results/search_latency.json

Each run writes its section of RESULTS.md (named after the JSON: `search_latency`), the table and the
verdicts computed from the JSON; ``--report`` rewrites it from the stored JSON without measuring.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
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
    num,
    resolve_device,
    results_doc,
    shown_path,
    stored_path,
    time_fn,
    write_json,
    write_section,
)

from temde_hf.data import caption_to_image, flat_captions, load_image_captions
from temde_hf.evaluation.folds import evaluate_embeddings
from temde_hf.evaluation.metrics import metrics_from_ranks
from temde_hf.evaluation.tables import format_table
from temde_hf.gallery.build import BuildSettings, merge_shards, shard_embeds, shard_path
from temde_hf.gallery.index import GalleryIndex
from temde_hf.gallery.sources import ImageList
from temde_hf.gallery.spec import parse_spec
from temde_hf.inference.encode import encode_texts, iter_image_features
from temde_hf.loading import load_checkpoint
from temde_hf.testing import save_tiny_checkpoint

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "search_latency.json"
SHARD_SIZE = 50_000
CHUNK = 512  # synthetic images per head call: the sketch holds (CHUNK, 49, N, K) probabilities
K = 10


# ----------------------------------------------------------------------------------------------
# Realistic vectors: real photos' tokens, mixed and perturbed, through the checkpoint's head
# ----------------------------------------------------------------------------------------------
def real_features(checkpoint: Path, data: Path, batch_size: int = 32) -> dict[str, Any]:
    """The checkpoint's model, projected image tokens of every photo of `data`, and every caption's embedding.

    Encodes through the library's one encode path (`iter_image_features` with tokens, `encode_texts`),
    split by split (train, val, test), as ``temde-hf index --store-tokens`` and ``temde-hf evaluate`` do.
    """
    model, processor = load_checkpoint(checkpoint, "cpu")
    out: dict[str, Any] = {"model": model, "tokens": [], "images": [], "texts": [], "caption_to_image": []}
    offset = 0
    for split in ("train", "val", "test"):
        dataset = load_image_captions(str(data), split=split)
        batches = list(
            iter_image_features(model, processor, dataset, token_dtype=torch.float32, batch_size=batch_size)
        )
        images = torch.cat([batch.embeds for batch in batches])  # (n_images, E)
        tokens = torch.cat([batch.tokens for batch in batches])  # (n_images, L, D): a fixed L per image
        texts = encode_texts(model, processor, flat_captions(dataset), 4 * batch_size, "cpu", 40)
        c2i = caption_to_image(dataset)
        out["tokens"].append(tokens)
        out["images"].append(images)
        out["texts"].append(texts)
        out["caption_to_image"].append(c2i + offset)
        out[split] = (images, texts, c2i)
        offset += len(images)
    for key in ("tokens", "images", "texts", "caption_to_image"):
        out[key] = torch.cat(out[key])
    return out


def synthetic_batch(model: Any, tokens: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """`(size, E)` fused embeddings of token sets mixed from two random photos plus noise."""
    n_photos, n_tokens, _ = tokens.shape
    base = torch.randint(0, n_photos, (size,), generator=generator)
    donor = torch.randint(0, n_photos, (size,), generator=generator)
    share = 0.5 * torch.rand(size, 1, generator=generator)  # up to half the tokens from the donor
    swap = torch.rand(size, n_tokens, generator=generator) < share  # (size, n_tokens)
    mixed = torch.where(swap[..., None], tokens[donor], tokens[base])  # (size, n_tokens, D)
    noise = 0.3 * torch.rand(size, 1, 1, generator=generator) * tokens.std()
    mixed = mixed + noise * torch.randn(mixed.shape, generator=generator)
    mask = torch.ones(size, n_tokens, dtype=torch.long)
    with torch.inference_mode():
        return model.embed_tokens(mixed, mask)[0].float()


def write_gallery(work: Path, n: int, make_batch: Any, queries: torch.Tensor) -> dict[str, Any]:
    """Generate `n` vectors into fp16 shards (reused when present) and the exact top-10 per query."""
    done = work / "exact_top10.safetensors"
    from safetensors.torch import load_file, save_file

    if done.is_file():
        return load_file(str(done))
    shutil.rmtree(work, ignore_errors=True)
    best_scores = torch.full((len(queries), K), -math.inf)
    best_rows = torch.zeros(len(queries), K, dtype=torch.long)
    started = time.perf_counter()
    for shard in range(-(-n // SHARD_SIZE)):
        rows, parts = [], []
        for start in range(shard * SHARD_SIZE, min(n, (shard + 1) * SHARD_SIZE), CHUNK):
            stop = min(start + CHUNK, n, (shard + 1) * SHARD_SIZE)
            vectors = make_batch(stop - start)  # (b, E) float32: the exact ranking uses these
            scores = queries @ vectors.T  # (n_queries, b)
            merged = torch.cat([best_scores, scores], 1)
            ids = torch.cat([best_rows, torch.arange(start, stop).expand(len(queries), -1)], 1)
            best_scores, top = merged.topk(K, dim=1)
            best_rows = ids.gather(1, top)
            rows.append(torch.arange(start, stop))
            parts.append(vectors.half())
        path = shard_path(work, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"rows": torch.cat(rows), "embeds": torch.cat(parts)}, str(path))
        path.with_suffix(".skipped.json").write_text("[]")
    exact = {"rows": best_rows, "scores": best_scores, "seconds": torch.tensor(time.perf_counter() - started)}
    save_file(exact, str(done))
    return exact


# ----------------------------------------------------------------------------------------------
# Index settings and measurements
# ----------------------------------------------------------------------------------------------
def settings_for(
    n: int, dim: int, global_dim: int | None, args: argparse.Namespace
) -> list[tuple[str, dict, list[dict]]]:
    """(index type, build overrides, search sweeps) to measure at gallery size `n`."""
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    runs: list[tuple[str, dict, list[dict]]] = []
    if n * dim * 4 <= 2**30:  # exhaustive scans only where the float32 gallery is <= 1 GiB
        runs += [("flat", {}, [{}]), ("fp16", {}, [{}]), ("sq8", {}, [{}])]
    probes = args.probes or ([8, 32] if args.quick else [16, 32, 64])
    factors = args.factors or ([10, 50] if args.quick else [10, 30, 100])
    if global_dim:
        sweep = [{"nprobe": p, "k_factor": f} for p in probes for f in factors]
        runs.append(("global", {"nlist": nlist}, sweep))
    pq_m = max(m for m in range(1, dim // 2 + 1) if dim % m == 0 and m <= 512)  # ≤ 512 B codes
    sweep = [{"nprobe": p, "k_factor": f} for p in probes for f in factors[:2]]
    runs.append(("ivfpq", {"nlist": nlist, "pq_m": pq_m}, sweep))
    return runs


def rss_mib() -> dict[str, float]:
    """This process's resident memory (MiB): anonymous (what it holds) and file-backed (mapped page cache)."""
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return {key: int(status[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}


def measure(
    gallery: GalleryIndex, queries: np.ndarray, exact: np.ndarray, search: dict, repeats: int
) -> dict[str, Any]:
    """Median one-query latency (ms) and mean recall@10 against the exact fused top-10."""
    found = gallery.search_vectors(queries, K, **search)[1]  # all queries at once, for recall
    recall = float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact)]))
    times = []
    for i in range(min(repeats, len(queries))):
        started = time.perf_counter()
        gallery.search_vectors(queries[i : i + 1], K, **search)
        times.append((time.perf_counter() - started) * 1e3)
    return {"ms": float(np.median(times)), "recall_at_10": recall}


def bench_size(n: int, work: Path, make_batch: Any, queries: torch.Tensor, args: argparse.Namespace,
               global_dim: int | None) -> list[dict[str, Any]]:  # fmt: skip
    import faiss

    exact = write_gallery(work / f"gallery-{n}", n, make_batch, queries)
    dim = queries.shape[1]
    source = ImageList(None, [f"synthetic-{i}" for i in range(n)], [None] * n)
    rows = []
    for kind, overrides, sweep in settings_for(n, dim, global_dim, args):
        if args.types and kind not in args.types:
            continue
        settings = BuildSettings(index_type=kind, shard_size=SHARD_SIZE, shard_dtype="float16",
                                 spec_overrides=overrides, memory_budget=args.memory_budget)  # fmt: skip
        faiss.omp_set_num_threads(args.build_threads)
        started = time.perf_counter()
        gallery = merge_shards(work / f"gallery-{n}", source, settings, model_path=args.checkpoint_for_fingerprint,
                               global_dim=global_dim)  # fmt: skip
        build_s = time.perf_counter() - started
        out = work / f"index-{n}-{kind}"
        gallery.save(out)
        del gallery
        rss_before = rss_mib()
        loaded = GalleryIndex.load(out)  # the store memory-mapped, as `temde-hf search` reads it
        faiss.omp_set_num_threads(1)  # one query per thread: 2 threads on one query only add overhead
        for search in sweep:
            result = measure(loaded, queries.numpy(), exact["rows"].numpy(), search, args.repeats)
            rows.append({
                "gallery": n, "dim": dim, "index": kind, "faiss": loaded.spec.factory(dim),
                "nprobe": search.get("nprobe"), "k_factor": search.get("k_factor"), **result,
                "ram_bytes_per_image": loaded.build_info["index_bytes"] / n,
                "store_bytes_per_image": loaded.build_info.get("store_bytes", 0) / n,
                "index_mib": loaded.build_info["index_bytes"] / 2**20, "build_s": build_s,
                **{f"{key}_growth_mib": value - rss_before[key] for key, value in rss_mib().items()},
            })  # fmt: skip
            print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        del loaded
        shutil.rmtree(out)
    return rows


COLUMNS = ["gallery", "index", "faiss", "nprobe", "k_factor", "ms", "recall_at_10", "ram_bytes_per_image",
           "store_bytes_per_image", "index_mib", "RssAnon_growth_mib", "RssFile_growth_mib", "build_s"]  # fmt: skip


def gpu_exact_rows(
    work: Path, n: int, queries: torch.Tensor, exact: dict, device: torch.device
) -> list[dict]:
    """Exact fused top-10 by one fp16 matrix product on the GPU (the gallery resident in GPU memory)."""
    files = sorted((work / f"gallery-{n}" / "shards").glob("*.safetensors"))
    gallery = torch.cat([torch.from_numpy(shard_embeds(f)).to(device, torch.float16) for f in files])
    q = queries.to(device, torch.float16)
    found = (q @ gallery.T).topk(K, dim=1).indices.cpu().numpy()
    recall = float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact["rows"].numpy())]))
    ms = time_fn(lambda: (gallery @ q[0]).topk(K).indices.cpu(), device, 3, 30)
    return [{"gallery": n, "dim": queries.shape[1], "index": "torch-cuda-fp16", "faiss": "-", "ms": ms,
             "recall_at_10": recall, "ram_bytes_per_image": 2 * queries.shape[1], "store_bytes_per_image": 0}]  # fmt: skip


def extrapolate_10m(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """10M rows on paper: per-image bytes as measured at 1M, latency scaled by the measured 100k -> 1M ratio."""
    by_key = {(r["index"], r["nprobe"], r["k_factor"], r["gallery"]): r for r in rows}
    out = []
    for (kind, nprobe, factor, size), row in by_key.items():
        small = by_key.get((kind, nprobe, factor, size // 10))
        if size != 1_000_000 or small is None:
            continue
        out.append({**row, "gallery": 10_000_000, "ms": row["ms"] * row["ms"] / small["ms"],
                    "recall_at_10": None, "index_mib": row["ram_bytes_per_image"] * 1e7 / 2**20,
                    "build_s": None, "status": "extrapolated"})  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# The retrieval protocol (test split) through each index type
# ----------------------------------------------------------------------------------------------
def protocol_through_index(feats: dict[str, Any], make_batch: Any, global_dim: int | None) -> list[dict]:
    """R@K / RSUM of the test split ranked by each index type vs the exact evaluation.

    Quantisers are trained on vectors of the same kind that are not the test set (synthetic images of
    the model, train + val captions); the test images / captions are then added and searched.
    """
    images, texts, caption_to_image = feats["test"]
    exact = evaluate_embeddings(images, texts, caption_to_image, fold_size=None)["full"]
    train_images = torch.cat([make_batch(CHUNK) for _ in range(20_000 // CHUNK)]).numpy()
    train_texts = torch.cat([feats["train"][1], feats["val"][1]]).numpy()
    rows = [{"index": "exact", "rsum": exact["rsum"], "i2t_r1": exact["i2t_r1"], "t2i_r1": exact["t2i_r1"]}]
    dim = images.shape[1]
    for kind in ("flat", "fp16", "sq8", "hnsw", "ivfpq", "global"):
        if kind == "global" and not global_dim:
            continue
        ranks = {}
        for name, gallery, queries, train in (
            ("t2i", images, texts, train_images),
            ("i2t", texts, images, train_texts),
        ):
            extra = {"nlist": 16, "nprobe": 8} if kind in ("ivfpq", "global") else {}
            if kind == "ivfpq":
                extra["pq_m"] = max(m for m in range(1, 513) if dim % m == 0)  # as in the gallery runs
            spec = parse_spec(kind, len(train), dim, global_dim=global_dim, **extra)
            index = GalleryIndex.build(spec, dim, train[: spec.train_size(len(train))], [gallery.numpy()],
                                       [str(i) for i in range(len(gallery))])  # fmt: skip
            found = index.search_vectors(queries.numpy(), K)[1]  # (n_queries, 10)
            if name == "t2i":
                hit = found == caption_to_image.numpy()[:, None]
            else:  # an image's rank is the best rank among its captions
                hit = caption_to_image.numpy()[found] == np.arange(len(images))[:, None]
            ranks[name] = torch.tensor(np.where(hit.any(1), hit.argmax(1), K))  # K = not in the top-10
        metrics = metrics_from_ranks(ranks["i2t"], ranks["t2i"])
        rows.append({"index": kind, "faiss": spec.factory(dim), "rsum": metrics["rsum"], "i2t_r1": metrics["i2t_r1"],
                     "t2i_r1": metrics["t2i_r1"], "rsum_minus_exact": metrics["rsum"] - exact["rsum"]})  # fmt: skip
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: also an exact fp16 scan on the GPU"
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="T-EMDE checkpoint (real structure)")
    parser.add_argument(
        "--data",
        type=Path,
        default=FLICKR8K_JSON,
        help="with --checkpoint: the photos and captions (all splits)",
    )
    parser.add_argument("--synthetic-dim", type=int, default=None, help="no checkpoint: Gaussian vectors")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=100, help="one-query searches timed per setting")
    parser.add_argument("--memory-budget", type=int, default=2**30)
    parser.add_argument("--build-threads", type=int, default=2, help="FAISS threads while training/adding")
    parser.add_argument(
        "--protocol", action="store_true", help="also the test-split protocol through each index"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sweeps")
    parser.add_argument("--probes", type=int, nargs="*", default=None, help="nprobe values to sweep")
    parser.add_argument("--factors", type=int, nargs="*", default=None, help="k_factor values to sweep")
    parser.add_argument("--types", nargs="*", default=None, help="only these index types")
    parser.add_argument("--work-dir", type=Path, default=Path("outputs") / "bench-search")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--report", action="store_true", help="rewrite the RESULTS.md section from --output; measure nothing"
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The RESULTS.md section, from the JSON alone
# ----------------------------------------------------------------------------------------------
HEADING = "Gallery search latency and recall (CPU)"
DEFAULT_PROBES, DEFAULT_FACTORS = [16, 32, 64], [10, 30, 100]
ALL_TYPES = ["flat", "fp16", "sq8", "global", "ivfpq"]
TARGET_SIZE, TARGET_MS, TARGET_RECALL, TARGET_INDEX_MIB = 1_000_000, 50.0, 0.95, 1024.0
PROTOCOL_TOLERANCE = 0.5  # RSUM points from the exact evaluation


def command_line(payload: dict[str, Any], output: Path) -> str:
    """The command that measured `payload`, rebuilt from its settings (flags at their defaults left out).

    A JSON written before the sweep flags were recorded gets them from its rows.
    """
    settings, rows = payload["settings"], [r for r in payload["results"] if r.get("status") != "extrapolated"]
    words: list[str] = []
    if payload["env"].get("device", "cpu") != "cpu":
        words += ["--device", payload["env"]["device"].split(":")[0]]
    if settings.get("checkpoint") not in (None, "None"):
        words += ["--checkpoint", settings["checkpoint"]]
        if settings.get("data") not in (None, stored_path(FLICKR8K_JSON)):
            words += ["--data", settings["data"]]
    elif settings.get("synthetic_dim"):
        words += ["--synthetic-dim", str(settings["synthetic_dim"])]
    words += ["--sizes", *map(str, settings["sizes"])]
    for flag, key, default in (("--queries", "queries", 200), ("--repeats", "repeats", 100)):
        if settings.get(key, default) != default:
            words += [flag, str(settings[key])]
    quick = settings.get("quick", False)
    defaults = {"types": ALL_TYPES, "probes": [8, 32] if quick else DEFAULT_PROBES,
                "factors": [10, 50] if quick else DEFAULT_FACTORS}  # fmt: skip
    seen = {
        "types": list(dict.fromkeys(r["index"] for r in rows)),
        "probes": sorted({r["nprobe"] for r in rows if r["nprobe"] is not None}),
        "factors": sorted({r["k_factor"] for r in rows if r["k_factor"] is not None}),
    }
    for key in ("types", "probes", "factors"):
        value = settings[key] if key in settings else (seen[key] if rows else None)
        if value and (set(value) != set(defaults[key])):
            words += [f"--{key}", *map(str, value)]
    if quick:
        words.append("--quick")
    if settings.get("protocol", "protocol" in payload):
        words.append("--protocol")
    return shlex.join(["python", "benchmarks/search_latency.py", *words, "--output", shown_path(output)])


def _gallery(size: int, status: str | None) -> str:
    label = (
        f"{size // 1_000_000}M"
        if size % 1_000_000 == 0
        else f"{size // 1000}k"
        if size % 1000 == 0
        else f"{size:,}"
    )
    return f"{label} (extrapolated)" if status == "extrapolated" else label


def results_table(rows: list[dict[str, Any]]) -> str:
    """Every measured (and extrapolated) sweep point of the JSON."""
    memory = any("RssAnon_growth_mib" in r for r in rows)
    cells = [{
        "gallery": _gallery(r["gallery"], r.get("status")), "index": f"{r['index']} (`{r['faiss']}`)",
        "nprobe": r["nprobe"], "k_factor": r["k_factor"], "ms": num(r["ms"]),
        "recall": None if r["recall_at_10"] is None else f"{r['recall_at_10']:.3f}",
        "ram": num(r["ram_bytes_per_image"]), "store": num(r["store_bytes_per_image"]) if r["store_bytes_per_image"] else None,
        "mib": num(r["index_mib"]), "build": None if r.get("build_s") is None else num(r["build_s"]),
        "anon": num(r.get("RssAnon_growth_mib")), "file": num(r.get("RssFile_growth_mib")),
    } for r in rows]  # fmt: skip
    columns = ["gallery", "index", "nprobe", "k_factor", "ms", "recall", "ram", "store", "mib", "build"]
    headers = ["gallery", "index (FAISS)", "nprobe", "k_factor", "ms", "recall@10", "RAM B/image",
               "re-rank store B/image (disk, mmap)", "index MiB", "build s"]  # fmt: skip
    if memory:
        columns += ["anon", "file"]
        headers += ["anonymous RSS growth MiB", "file-backed RSS growth MiB"]
    return format_table(cells, columns, headers)


def target_verdict(rows: list[dict[str, Any]]) -> str | None:
    """The 1M target per index type, from the measured rows (None when no 1M gallery was measured)."""
    at_size = [r for r in rows if r["gallery"] == TARGET_SIZE and r.get("status") != "extrapolated"]
    if not at_size:
        return None

    def meets(r: dict[str, Any]) -> bool:
        return (
            r["ms"] < TARGET_MS and r["recall_at_10"] >= TARGET_RECALL and r["index_mib"] <= TARGET_INDEX_MIB
        )

    parts = []
    for kind in dict.fromkeys(r["index"] for r in at_size):
        ok = sorted((r for r in at_size if r["index"] == kind and meets(r)), key=lambda r: r["ms"])
        if ok:
            r = ok[0]
            where = f"nprobe {r['nprobe']}, k_factor {r['k_factor']}: " if r["nprobe"] is not None else ""
            parts.append(f"**met by `{kind}`** ({len(ok)} of its sweep points; fastest: {where}{num(r['ms'])} ms, "
                         f"recall@10 {r['recall_at_10']:.3f}, {num(r['index_mib'])} MiB index, built in "
                         f"{num(r['build_s'])} s)")  # fmt: skip
        else:
            best = max((r for r in at_size if r["index"] == kind), key=lambda r: r["recall_at_10"])
            parts.append(f"not met by `{kind}` (best recall@10 {best['recall_at_10']:.3f} at {num(best['ms'])} ms, "
                         f"{num(best['index_mib'])} MiB)")  # fmt: skip
    return (f"Target ({_gallery(TARGET_SIZE, None)} gallery: top-10 < {TARGET_MS:g} ms, recall@10 ≥ {TARGET_RECALL}, "
            f"index ≤ {TARGET_INDEX_MIB:g} MiB in RAM, built through the sharded path): " + "; ".join(parts) + ".")  # fmt: skip


def protocol_section(protocol: list[dict[str, Any]]) -> str:
    """The test-split protocol through each index type, and which stay within tolerance of exact."""
    cells = [{**r, "faiss": f"{r['index']} (`{r['faiss']}`)" if r.get("faiss") else r["index"],
              "delta": None if "rsum_minus_exact" not in r else f"{r['rsum_minus_exact']:+.1f}"} for r in protocol]  # fmt: skip
    table = format_table(cells, ["faiss", "i2t_r1", "t2i_r1", "rsum", "delta"],
                         ["index", "i2t R@1", "t2i R@1", "RSUM", "vs exact"], ".1f")  # fmt: skip
    within = [r["index"] for r in protocol[1:] if abs(r["rsum_minus_exact"]) <= PROTOCOL_TOLERANCE]
    outside = [
        f"{r['index']} ({r['rsum_minus_exact']:+.1f})" for r in protocol[1:] if r["index"] not in within
    ]
    verdict = (f"Target (within {PROTOCOL_TOLERANCE} RSUM of the exact evaluation): met by "
               + (", ".join(f"`{k}`" for k in within) or "none") + "; not met by " + (", ".join(outside) or "none") + ".")  # fmt: skip
    return table + "\n\n" + verdict


def render(payload: dict[str, Any], output: Path) -> str:
    """The RESULTS.md section of a stored run: its command, what it measured on, tables and verdicts."""
    settings, env, rows = payload["settings"], payload["env"], payload["results"]
    report = shlex.join(
        ["python", "benchmarks/search_latency.py", "--report", "--output", shown_path(output)]
    )
    if settings.get("checkpoint") not in (None, "None"):
        summary = checkpoint_sentence(settings.get("model", {}))
        vectors = (f"checkpoint `{settings['checkpoint']}`" + (f" ({summary})" if summary else "")
                   + f", fused embedding {settings['dim']:,}-d"
                   + (f" of which the first {settings['global_dim']:,} are the global part" if settings.get("global_dim") else ""))  # fmt: skip
    else:
        vectors = f"synthetic clustered vectors, {settings['dim']}-d (no checkpoint)"
    loads = {"start": env.get("loadavg_at_start")}
    loads.update(
        {f"after {int(k.rsplit('_', 1)[1]):,}": v for k, v in env.items() if k.startswith("loadavg_after_")}
    )
    timing = (f"{settings['queries']} queries; ms = median of {settings['repeats']} one-query searches; recall@10 "
              f"against the exact fused top-{settings['k']} computed in float32; " if rows else "")  # fmt: skip
    lines = [f"    {command_line(payload, output)}", f"    {report}", "",
             f"Measured on {env_sentence(env)}" + (f", FAISS {env['faiss']}" if env.get("faiss") else "")
             + f", {env.get('faiss_threads', 1)} FAISS thread per query; {vectors}. "
             f"{timing}{load_sentence(loads)}."]  # fmt: skip
    if rows:
        lines += ["", results_table(rows)]
        verdict = target_verdict(rows)
        if verdict:
            lines += ["", verdict]
    if payload.get("protocol"):
        lines += ["", "Retrieval protocol on the test split through each index type:", "",
                  protocol_section(payload["protocol"])]  # fmt: skip
    return "\n".join(lines)


def _faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss.__version__


def write_report(payload: dict[str, Any], output: Path, trial: bool = False) -> str:
    """Render `payload` (stored at `output`) into its RESULTS.md section (named after the JSON)."""
    markdown = render(payload, output)
    write_section(results_doc(output, trial), Path(output).stem, markdown, HEADING)
    return markdown


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report:
        payload = load_report(args.output)
        print(write_report(payload, args.output))
        return payload
    device = resolve_device(args.device)  # asking for absent CUDA is an error, not a silent CPU run
    generator = torch.Generator().manual_seed(0)
    if args.checkpoint is not None:
        feats = real_features(args.checkpoint, args.data)
        model, tokens = feats["model"], feats["tokens"]
        global_dim = model.config.projection_dim if model.config.sketch_fusion == "concat" else None
        queries = feats["texts"][torch.randperm(len(feats["texts"]), generator=generator)[: args.queries]]

        def make_batch(size: int) -> torch.Tensor:
            return synthetic_batch(model, tokens, size, generator)

        args.checkpoint_for_fingerprint = args.checkpoint
    elif args.synthetic_dim:
        feats, global_dim = None, None
        centres = torch.nn.functional.normalize(
            torch.randn(64, args.synthetic_dim, generator=generator), dim=-1
        )

        def make_batch(size: int) -> torch.Tensor:
            picks = centres[torch.randint(0, 64, (size,), generator=generator)]
            return torch.nn.functional.normalize(
                picks + 0.3 * torch.randn(picks.shape, generator=generator), dim=-1
            )

        queries = make_batch(args.queries)
        args.checkpoint_for_fingerprint = save_tiny_checkpoint(args.work_dir / "fingerprint-model")
    else:
        raise SystemExit("pass --checkpoint CKPT (real structure) or --synthetic-dim D (smoke run)")
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "benchmark": "search_latency",
        "env": {**device_info(device), "faiss": _faiss_version(), "faiss_threads": 1, "loadavg_at_start": os.getloadavg()},
        "settings": {"sizes": args.sizes, "queries": args.queries, "repeats": args.repeats, "k": K,
                     "checkpoint": str(args.checkpoint), "data": stored_path(args.data) if args.checkpoint else None, "dim": int(queries.shape[1]), "global_dim": global_dim,
                     "model": checkpoint_summary(args.checkpoint) if args.checkpoint else {},
                     "synthetic_dim": args.synthetic_dim if args.checkpoint is None else None, "quick": args.quick,
                     "protocol": args.protocol, "types": args.types, "probes": args.probes, "factors": args.factors},
        "results": rows,
    }  # fmt: skip
    if args.protocol and feats is not None:  # short: first, so a cut long run still has it
        payload["protocol"] = protocol_through_index(feats, make_batch, global_dim)
        print(
            format_table(
                payload["protocol"], ["index", "faiss", "i2t_r1", "t2i_r1", "rsum", "rsum_minus_exact"]
            )
        )
        write_json(payload, args.output)
    for n in args.sizes:
        rows += bench_size(n, args.work_dir, make_batch, queries, args, global_dim)
        if device.type == "cuda":
            exact = write_gallery(args.work_dir / f"gallery-{n}", n, make_batch, queries)
            rows += gpu_exact_rows(args.work_dir, n, queries, exact, device)
        payload["env"]["loadavg_after_" + str(n)] = os.getloadavg()
        write_json(payload, args.output)  # after each size: a long run keeps what it measured
    rows += extrapolate_10m(rows)
    print(format_table(rows, [*COLUMNS, "status"]))
    path = write_json(payload, args.output)
    write_report(payload, path, args.quick)
    print(f"wrote {path} and its section of {results_doc(path, args.quick)}")
    return payload


if __name__ == "__main__":
    main()
