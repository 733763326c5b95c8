"""``temde-hf index``: encode a gallery (sharded, resumable) and write a search index.

temde-hf index --model CKPT --images photos/ --out gallery_index/            # one process
accelerate launch -m temde_hf.cli index --model CKPT --images photos/ --out gallery_index/
temde-hf index ... --store-tokens      # also keep the images' tokens, for `temde-hf search --rerank`

Bad input raises a one-line `ValueError` / `OSError`; `temde_hf.cli` prints it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from ..cli_args import positive_int
from ..inference.encoder import BACKENDS
from .build import BuildSettings, build_gallery_sharded
from .index import GalleryIndex
from .sources import ImageList, from_dataset, from_file_list, from_folder
from .spec import DEFAULT_MEMORY_BUDGET, INDEX_TYPES, check_index_settings

_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """``"1GB"`` / ``"512MB"`` / ``"1073741824"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1GB or 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


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
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--shard-size", type=positive_int, default=10_000, help="images per resumable shard")
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


def main(argv: Sequence[str] | None = None) -> GalleryIndex | None:
    """``temde-hf index``: encode a gallery (sharded, resumable) and write a search index."""
    args = index_parser().parse_args(argv)
    overrides = {"nlist": args.nlist, "nprobe": args.nprobe, "pq_m": args.pq_m, "k_factor": args.k_factor}
    check_index_settings(overrides)  # before any image is encoded (and before FAISS sees them)
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
    gallery = build_gallery_sharded(args.model, _source(args), args.out, settings)
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
