"""``temde-hf search``: top-k gallery items for text and/or image queries.

temde-hf search --index gallery_index/ --text "a dog runs on the beach" -k 5
temde-hf search ... --rerank alignment --rerank-k 20   # two stages (index built with --store-tokens)

Bad input raises a one-line `ValueError` / `OSError`; `temde_hf.cli` prints it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..cli_args import add_rerank_arguments, check_rerank_arguments
from ..data.text import text_problem
from ..inference.encoder import BACKENDS, load_encoder
from ..inference.fingerprint import checkpoint_fingerprint
from ..loading import load_checkpoint
from .api import SearchHit, search
from .index import GalleryIndex
from .spec import check_index_settings


def main(argv: Sequence[str] | None = None) -> list[list[SearchHit]]:
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
        raise ValueError(f"-k must be a positive number of results, got {args.top_k}")
    if not args.text and not args.image:
        raise ValueError("give at least one --text or --image query")
    for text in args.text:  # a blank query is embedded as [CLS] [SEP] and returns confident nonsense
        problem = text_problem(text)
        if problem is not None:
            raise ValueError(f"--text {text!r}: {problem}; give the words to search for")
    check_index_settings({"nprobe": args.nprobe, "k_factor": args.k_factor})
    if args.rerank is None:
        return
    check_rerank_arguments(args)
    if args.image:
        raise ValueError(
            f"--rerank {args.rerank} re-scores caption -> image matches; search the --image "
            "queries in a separate call without --rerank"
        )
    if args.backend.startswith("onnx"):
        raise ValueError(
            f"--rerank reads token embeddings, which --backend {args.backend} does not return; "
            "drop --backend (auto runs eager torch with --rerank)"
        )


def check_same_model(gallery: GalleryIndex, model_path: str | Path | None, index_dir: str | Path) -> None:
    """Raise a one-line ValueError when the query model is not the one that built the index."""
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
