"""``temde-hf index`` and ``temde-hf search``: thin command lines over the gallery modules.

temde-hf index --model CKPT --images photos/ --out gallery_index/            # one process
accelerate launch -m temde_hf.cli index --model CKPT --images photos/ --out gallery_index/
temde-hf search --index gallery_index/ --text "a dog runs on the beach" -k 5
temde-hf index ... --store-tokens && temde-hf search ... --rerank alignment --rerank-k 20   # two stages
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

from ...data.text import text_problem
from ...evaluation.cli import add_rerank_arguments, check_rerank_arguments
from ...evaluation.encode import BACKENDS, load_encoder
from ...loading import load_checkpoint
from .api import SearchHit, search
from .build import BuildSettings, build_gallery_sharded
from .index import GalleryIndex
from .sources import ImageList, from_dataset, from_file_list, from_folder
from .spec import DEFAULT_MEMORY_BUDGET, INDEX_TYPES

_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """``"1GB"`` / ``"512MB"`` / ``"1073741824"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1GB or 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _source(args: argparse.Namespace) -> ImageList:
    if args.images:
        return from_folder(args.images)
    if args.image_list:
        return from_file_list(args.image_list, args.image_root)
    from datasets import load_from_disk

    if not Path(args.dataset).is_dir():
        raise ValueError(f"--dataset {args.dataset} is not a folder written by Dataset.save_to_disk")
    return from_dataset(
        load_from_disk(args.dataset), image_column=args.image_column, id_column=args.id_column
    )


def index_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="temde-hf index", description="encode a gallery and build an index")
    parser.add_argument("--model", required=True, help="checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (recursive)")
    source.add_argument("--image-list", help="text file, one image path per line")
    source.add_argument("--dataset", help="a `datasets` folder written by save_to_disk")
    parser.add_argument("--image-root", help="--image-list: folder relative paths start from")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--id-column")
    parser.add_argument("--out", required=True, help="index folder to write (shards are kept there)")
    parser.add_argument("--index-type", choices=("auto", *INDEX_TYPES), default="auto")
    parser.add_argument("--memory-budget", type=parse_bytes, default=DEFAULT_MEMORY_BUDGET, help="e.g. 1GB")
    parser.add_argument("--batch-size", type=_positive, default=32)
    parser.add_argument("--shard-size", type=_positive, default=10_000, help="images per resumable shard")
    parser.add_argument("--shard-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="encoder backend")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="skip", help="unreadable images")
    for name in ("nlist", "nprobe", "pq-m", "k-factor"):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the chosen index setting")
    parser.add_argument("--opq", action="store_true", default=None, help="ivfpq: learn an OPQ rotation")
    parser.add_argument(
        "--store-tokens",
        action="store_true",
        help="also keep every image's token embeddings (fp16) for `search --rerank` (eager torch encoder)",
    )
    return parser


def index_main(argv: Sequence[str] | None = None) -> GalleryIndex | None:
    """``temde-hf index``: encode a gallery (sharded, resumable) and write a search index."""
    args = index_parser().parse_args(argv)
    overrides = {"nlist": args.nlist, "nprobe": args.nprobe, "pq_m": args.pq_m, "k_factor": args.k_factor}
    if args.opq:
        overrides["opq"] = True
    settings = BuildSettings(
        index_type=args.index_type,
        memory_budget=args.memory_budget,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        backend=args.backend,
        shard_dtype=args.shard_dtype,
        on_error=args.on_error,
        spec_overrides={k: v for k, v in overrides.items() if v is not None},
        store_tokens=args.store_tokens,
    )
    try:
        gallery = build_gallery_sharded(args.model, _source(args), args.out, settings)
    except (ValueError, ImportError) as err:
        raise SystemExit(f"temde-hf index: {err}") from err
    if gallery is not None:
        info = gallery.metadata()
        print(
            f"indexed {len(gallery)} images ({gallery.embed_dim}-d, {gallery.index_type}: "
            f"{info['index']['faiss_factory']}), skipped {len(gallery.skipped)} unreadable"
            f"{' (listed in gallery.json)' if gallery.skipped else ''} -> {args.out}"
        )
        if info["tokens"]:
            tokens = info["tokens"]
            print(
                f"stored token embeddings: {tokens['bytes_per_image'] / 1024:.1f} KiB/image (fp16, up to "
                f"{tokens['max_tokens']} x {tokens['dim']}; {tokens['valid_bytes_per_image'] / 1024:.1f} KiB of "
                f"real tokens), {gallery.build_info['token_bytes'] / 2**20:.1f} MiB in all"
            )
    return gallery


def search_main(argv: Sequence[str] | None = None) -> list[list[SearchHit]]:
    """``temde-hf search``: top-k gallery items for text and/or image queries."""
    parser = argparse.ArgumentParser(prog="temde-hf search", description="query a gallery index")
    parser.add_argument("--index", required=True, help="folder written by `temde-hf index`")
    parser.add_argument("--text", action="append", default=[], help="text query (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="image query path (repeatable)")
    parser.add_argument("-k", "--top-k", type=int, default=5)
    parser.add_argument("--model", help="checkpoint (default: the one recorded in the index)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="encoder backend")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: saved)")
    parser.add_argument(
        "--k-factor", type=int, default=None, help="shortlist = k_factor x k (default: saved)"
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    add_rerank_arguments(
        parser,
        "re-score each text query's stage-1 top-K from the tokens the index stores (index --store-tokens): "
        "alignment (token-level, any checkpoint) or itm (the checkpoint's matching head)",
    )
    args = parser.parse_args(argv)
    _check_search_args(args)
    try:
        gallery = GalleryIndex.load(args.index)
        if args.rerank is not None:
            gallery.require_tokens(args.rerank)  # before the model is loaded
        model_path = args.model or gallery.model_path
        check_same_model(gallery, model_path, args.index)
        if args.rerank is None:
            model, processor = load_encoder(model_path, backend=args.backend, device="cpu")
        else:  # stage 2 reads token embeddings, which only the eager model returns
            model, processor = load_checkpoint(model_path, "cpu", with_matching_head=args.rerank == "itm")
        settings = {"nprobe": args.nprobe, "k_factor": args.k_factor}
        rerank = {"rerank": args.rerank, "rerank_k": args.rerank_k, "rerank_fusion": args.rerank_fusion}
        hits = search(
            gallery, model, processor, texts=args.text, images=args.image, k=args.top_k, **rerank, **settings
        )
    except (ValueError, ImportError) as err:
        raise SystemExit(f"temde-hf search: {err}") from err
    queries = [f"text: {t}" for t in args.text] + [f"image: {p}" for p in args.image]
    if args.json:
        rows = [{"query": q, "hits": [vars(h) for h in row]} for q, row in zip(queries, hits)]
        print(json.dumps(rows, indent=1))
    else:
        for query, row in zip(queries, hits):
            print(query)
            for hit in row:
                second = f"  {args.rerank} {hit.rerank_score:8.4f}" if hit.rerank_score is not None else ""
                print(f"  {hit.rank:>3}  {hit.score:8.4f}{second}  {hit.id}")
    return hits


def _check_search_args(args: argparse.Namespace) -> None:
    """One line per bad argument, before anything is loaded."""
    if args.top_k < 1:
        raise SystemExit(f"temde-hf search: -k must be a positive number of results, got {args.top_k}")
    if not args.text and not args.image:
        raise SystemExit("temde-hf search: give at least one --text or --image query")
    for text in args.text:  # a blank query is embedded as [CLS] [SEP] and returns confident nonsense
        problem = text_problem(text)
        if problem is not None:
            raise SystemExit(f"temde-hf search: --text {text!r}: {problem}; give the words to search for")
    if args.rerank is None:
        return
    try:
        check_rerank_arguments(args)
    except ValueError as err:
        raise SystemExit(f"temde-hf search: {err}") from err
    if args.image:
        raise SystemExit(
            f"temde-hf search: --rerank {args.rerank} re-scores caption -> image matches; search the --image "
            "queries in a separate call without --rerank"
        )
    if args.backend.startswith("onnx"):
        raise SystemExit(
            f"temde-hf search: --rerank reads token embeddings, which --backend {args.backend} does not return; "
            "drop --backend (auto runs eager torch with --rerank)"
        )


def check_same_model(gallery: GalleryIndex, model_path: str | Path | None, index_dir: str | Path) -> None:
    """Raise a one-line ValueError when the query model is not the one that built the index."""
    from ...export.fingerprint import checkpoint_fingerprint

    if model_path is None or not Path(model_path).is_dir():
        raise ValueError(f"the checkpoint {model_path} recorded in {index_dir} is not there; pass --model")
    if gallery.model_fingerprint is None:
        return
    fingerprint = checkpoint_fingerprint(model_path)
    if fingerprint != gallery.model_fingerprint:
        raise ValueError(
            f"{index_dir} was built by another model ({gallery.model_path}, fingerprint "
            f"{gallery.model_fingerprint}) than {model_path} (fingerprint {fingerprint}): its embeddings are "
            "not comparable; search with that checkpoint or rebuild the index with temde-hf index --model"
        )
