"""Exact top-k search latency for one query over galleries of 10k / 100k / 1M unit vectors.

Backends (each an exact inner-product search, the retrieval rule of the fused embeddings):
- `faiss-flat-ip`: FAISS `IndexFlatIP` on CPU (`pip install faiss-cpu`), `--threads` OpenMP threads;
- `faiss-sq8-ip` / `faiss-fp16-ip` (opt-in, `--extra-faiss`): the same scan over 8-bit / fp16 codes;
- `torch-cpu`: `gallery @ query` + `topk` on CPU, `--threads` intra-op threads;
- `torch-cuda-fp32` / `torch-cuda-fp16`: the same on the GPU (gallery resident in GPU memory).

    python benchmarks/search_latency.py                         # 10k/100k/1M x dim 256, 2 CPU threads
    python benchmarks/search_latency.py --dims 256 2304         # also the concat width (D + N*K)
    python benchmarks/search_latency.py --quick --device cpu    # 1k / 10k smoke run

Timing: median milliseconds of single-query searches after warm-up (query already on the device; on
CUDA the time includes the device-to-host copy of the 10 results, which a server would need).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import device_info, format_table, resolve_device, time_fn, write_json

FAISS_KINDS = {"faiss-flat-ip": "flat", "faiss-sq8-ip": "sq8", "faiss-fp16-ip": "fp16"}
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "search_latency.json"


def make_gallery(size: int, dim: int, seed: int = 0) -> torch.Tensor:
    """`(size, dim)` float32 unit vectors, generated in chunks to keep the peak near the result's size."""
    generator = torch.Generator().manual_seed(seed)
    gallery = torch.empty(size, dim)
    for start in range(0, size, 100_000):
        chunk = torch.randn(min(100_000, size - start), dim, generator=generator)
        gallery[start : start + chunk.shape[0]] = torch.nn.functional.normalize(chunk, dim=-1)
    return gallery


def torch_searcher(gallery: torch.Tensor, query: torch.Tensor, k: int) -> Callable[[], Any]:
    """Top-k by `gallery @ query`; returns the indices on the host (a real search must hand them back)."""

    def search() -> Any:
        scores = gallery @ query  # (size,)
        return scores.topk(k).indices.cpu()

    return search


def faiss_searcher(gallery: torch.Tensor, query: torch.Tensor, k: int, kind: str) -> Callable[[], Any] | None:
    """FAISS inner-product search over the whole gallery, or None when faiss is not installed.

    `kind`: `"flat"` (exact, float32), `"sq8"` / `"fp16"` (scalar-quantised codes: the same scan over
    4x / 2x fewer bytes, near-exact ranking; recall is reported against the exact top-k).
    """
    try:
        import faiss
    except ImportError:
        return None
    dim = gallery.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        qtype = {"sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}[kind]
        index = faiss.IndexScalarQuantizer(dim, qtype, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery[: min(len(gallery), 100_000)].numpy())
    index.add(gallery.numpy())
    q = query[None].numpy()  # (1, dim)

    def search() -> Any:
        return index.search(q, k)[1]

    search.index = index  # keep the index alive (and free it with the closure)
    return search


def bench_one(
    size: int, dim: int, backends: list[str], device: torch.device, k: int, warmup: int, repeats: int
) -> list[dict[str, Any]]:
    gallery = make_gallery(size, dim)
    query = gallery[123] + 0.01 * torch.randn(dim)  # near a known row: the top-1 must be row 123
    exact = set((gallery @ query).topk(k).indices.tolist())
    rows = []
    for backend in backends:
        if backend.startswith("faiss-"):
            search = faiss_searcher(gallery, query, k, FAISS_KINDS[backend])
        elif backend == "torch-cpu":
            search = torch_searcher(gallery, query, k)
        else:
            dtype = torch.float16 if backend.endswith("fp16") else torch.float32
            search = torch_searcher(gallery.to(device, dtype), query.to(device, dtype), k)
        if search is None:
            rows.append(
                {"backend": backend, "gallery": size, "dim": dim, "ms": None, "status": "not installed"}
            )
            continue
        found = torch.as_tensor(search()).reshape(-1).tolist()
        timer_device = device if backend.startswith("torch-cuda") else torch.device("cpu")
        ms = time_fn(search, timer_device, warmup, repeats)
        recall = len(exact & set(found)) / k
        row = {"backend": backend, "gallery": size, "dim": dim, "ms": ms, "top1_ok": found[0] == 123}
        rows.append({**row, "recall_at_k": recall, "status": "ok"})
        del search
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def set_cpu_threads(threads: int) -> None:
    """Threads for torch's CPU ops and FAISS's OpenMP loops."""
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if present")
    parser.add_argument("--quick", action="store_true", help="galleries of 1k and 10k only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=[256])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="CPU thread counts to try")
    parser.add_argument(
        "--extra-faiss", nargs="*", default=[], choices=["faiss-sq8-ip", "faiss-fp16-ip"],
        help="also time scalar-quantised FAISS scans (fewer bytes per vector, recall reported)",
    )  # fmt: skip
    parser.add_argument("--max-gallery-gb", type=float, default=4.0, help="skip larger float32 galleries")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    repeats = args.repeats or (5 if args.quick else 30)
    backends = ["faiss-flat-ip", "torch-cpu", *args.extra_faiss]
    if device.type == "cuda":
        backends += ["torch-cuda-fp32", "torch-cuda-fp16"]
    rows = []
    for dim in args.dims:
        for size in sizes:
            if size * dim * 4 / 2**30 > args.max_gallery_gb:
                rows.append(
                    {"backend": "all", "gallery": size, "dim": dim, "ms": None, "status": "skipped (size)"}
                )
                continue
            for threads in args.threads:
                set_cpu_threads(threads)
                found = bench_one(
                    size,
                    dim,
                    backends if threads == args.threads[0] else backends[:2],
                    device,
                    args.k,
                    args.warmup,
                    repeats,
                )
                rows += [{**row, "threads": threads} for row in found]
    settings = {
        "sizes": list(sizes),
        "dims": args.dims,
        "k": args.k,
        "threads": args.threads,
        "repeats": repeats,
    }
    payload = {
        "benchmark": "search_latency",
        "env": device_info(device),
        "settings": settings,
        "results": rows,
    }
    path = write_json(payload, args.output)
    print(
        format_table(rows, ["backend", "gallery", "dim", "threads", "ms", "top1_ok", "recall_at_k", "status"])
    )
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
