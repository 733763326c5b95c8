"""``temde-hf evaluate CHECKPOINT_DIR --data PATH``: retrieval metrics, a JSON, a plot and a table.

Example::

    temde-hf evaluate runs/temde-flickr8k --data ../shared/data/flickr8k-800/dataset_flickr8k.json \\
        --split test --output-dir runs/temde-flickr8k/eval

On COCO's 5K Karpathy test split the table shows COCO 5K (``full``) and COCO 1K (``folds_mean``, the
mean over five 1,000-image folds); on Flickr30k's 1,000 test images ``full`` is Flickr 1K.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..cli_args import add_rerank_arguments, check_device, check_rerank_arguments
from ..data.auto import DATA_FORMATS, load_image_captions
from ..data.errors import DataError, LoadReport
from ..inference.encode import encode_dataset
from ..inference.encoder import BACKENDS, load_encoder
from ..inference.tokens import encode_with_tokens
from ..loading import check_checkpoint_dir, load_checkpoint
from .folds import evaluate_embeddings
from .metrics import NonFiniteScoresError, retrieval_ranks
from .plots import plot_recall_at_k
from .rerank import rerank_report
from .tables import format_table

logger = logging.getLogger("temde_hf.evaluation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="temde-hf evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="folder saved with save_pretrained (model + processor)")
    parser.add_argument(
        "--data", required=True, help="Karpathy/COCO JSON, captions CSV, image folder, parquet or Hub id"
    )
    parser.add_argument("--format", default="auto", choices=("auto", *DATA_FORMATS))
    parser.add_argument("--image-root", default=None, help="image folder (default: images/ beside the file)")
    parser.add_argument("--split", default="test", help="split to evaluate ('all' for every row)")
    parser.add_argument("--output-dir", default=None, help="default: CHECKPOINT/eval-SPLIT")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing metrics.json in the output folder"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--n-captions", type=int, default=5, help="captions per image (first ones kept)")
    parser.add_argument("--fold-size", type=int, default=1000, help="images per fold (COCO 1K); 0: none")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--max-length", type=int, default=None, help="caption token limit")
    parser.add_argument(
        "--chunk-size", type=int, default=256, help="queries scored at once (memory: chunk x gallery scores)"
    )
    parser.add_argument(
        "--on-error",
        default="raise",
        choices=("raise", "skip"),
        help="bad images/entries: stop, or leave them out (every image is then decoded up front; the "
        "skipped ones are counted and listed in metrics.json)",
    )
    parser.add_argument("--splits-from", default=None, help="Karpathy JSON giving a captions CSV its splits")
    parser.add_argument("--image-column", default="image", help="parquet / Hub data: image column")
    parser.add_argument("--captions-column", default="captions", help="parquet / Hub data: captions column")
    parser.add_argument("--image-id-column", default=None, help="parquet / Hub data: image id column")
    parser.add_argument(
        "--caption-key", default="raw", help="parquet / Hub data: key of the text when captions are objects"
    )
    parser.add_argument("--split-column", default=None, help="parquet / Hub data: Karpathy split column")
    parser.add_argument(
        "--hf-split", default="train", help="parquet / Hub data: the `datasets` split to read"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="for checkpoints of other packages")
    add_rerank_arguments(
        parser,
        "also re-score each query's stage-1 top-K: alignment (token-level, any checkpoint) or itm (the "
        "matching head of a TemdeForImageTextRetrieval checkpoint); both stages are reported",
    )
    parser.add_argument(
        "--latency-queries",
        type=int,
        default=50,
        help="single queries timed per direction and stage (--rerank)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="encoder: eager torch or onnxruntime (export-onnx); --rerank needs the token embeddings, "
        "so it always runs eager torch",
    )
    return parser


# flag -> (smallest value, what it is): every count the command takes, checked before any work.
_MINIMUMS = {
    "batch_size": (1, "images encoded at once"),
    "n_captions": (1, "captions per image, e.g. 5 for COCO and Flickr"),
    "fold_size": (0, "images per fold; 0 for no folds"),
    "max_images": (2, "images evaluated; retrieval needs at least 2 candidates"),
    "max_length": (3, "caption tokens; [CLS] and [SEP] leave no room for a word below 3"),
    "chunk_size": (1, "queries scored at once"),
    "latency_queries": (0, "single queries timed; 0 for none"),
}


def check_arguments(args: argparse.Namespace) -> None:
    """One-line ValueErrors naming the flag, its value and the fix, for every number and the device.

    An out-of-range count otherwise runs quietly wrong (``--n-captions -1`` keeps 4 of 5 captions) or
    fails deep inside with a raw ``ZeroDivisionError``.
    """
    for name, (minimum, meaning) in _MINIMUMS.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {value}: must be >= {minimum} ({meaning}); pass {flag} {minimum} or more"
            )
    if args.fold_size == 1:
        raise ValueError(
            "--fold-size 1: a fold of one image ranks it first for every query (a perfect score from any "
            "model); pass --fold-size 0 (no folds) or 2 or more"
        )
    check_rerank_arguments(args)
    check_device(args.device, "--device")


def check_max_length(args: argparse.Namespace) -> None:
    """Refuse a ``--max-length`` beyond the checkpoint's text positions (read from its ``config.json``).

    Longer captions would otherwise fail inside the text tower with a raw tensor-size error.
    """
    if args.max_length is None:
        return
    try:
        text_config = json.loads((Path(args.checkpoint) / "config.json").read_text()).get("text_config", {})
    except (OSError, ValueError, AttributeError):
        return  # the loader names a missing or damaged config.json itself
    limit = text_config.get("max_position_embeddings") if isinstance(text_config, dict) else None
    if isinstance(limit, int) and args.max_length > limit:
        raise ValueError(
            f"--max-length {args.max_length}: the checkpoint's text tower reads at most {limit} tokens; "
            f"pass --max-length {limit} or less (or leave it out: captions are cut to the tokenizer's limit)"
        )


def _loader_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Format-specific loader arguments from the command line."""
    from ..data.auto import detect_format

    data_format = detect_format(args.data) if args.format == "auto" else args.format
    if data_format == "csv" and args.splits_from:
        return {"splits": args.splits_from}
    if data_format in ("parquet", "hub"):
        return {
            "image_column": args.image_column,
            "captions_column": args.captions_column,
            "image_id_column": args.image_id_column,
            "split_column": args.split_column,
            "caption_key": args.caption_key,
            "hf_split": args.hf_split,
        }
    return {}


METRIC_COLUMNS = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "rsum",
    "i2t_medr",
    "t2i_medr",
)


def metrics_table(result: dict[str, Any]) -> str:
    """A Markdown table of the ``full`` and ``folds_mean`` metrics (and the reranked ones, if any)."""
    rows = [{"set": f"all {result['n_images']} images", **result["full"]}]
    if "folds_mean" in result:  # COCO: 5K = all, 1K = mean of five 1,000-image folds
        rows.append(
            {"set": f"{result['fold_size']}-img folds (x{len(result['folds'])})", **result["folds_mean"]}
        )
    rerank = result.get("rerank")
    if rerank:  # stage 2 on the same sets
        label = f"+{rerank['reranker']} K={rerank['k']}"
        label += f" w={rerank['stage1_weight']:g}" if rerank.get("stage1_weight") else ""
        rows.append({"set": f"{label}, all images", **rerank["full"]})
        if "folds_mean" in rerank:
            rows.append({"set": f"{label}, folds", **rerank["folds_mean"]})
    text = format_table(rows, ["set", *METRIC_COLUMNS], float_format=".1f")
    if rerank and rerank.get("latency_ms"):
        ms = rerank["latency_ms"]
        text += (
            "\nper-query latency (ms, median): stage 1 i2t {stage1_i2t:.2f} / t2i {stage1_t2i:.2f}; stage 2 i2t "
            "{stage2_i2t:.2f} / t2i {stage2_t2i:.2f}".format(**ms)
        )
    return text


def evaluate_checkpoint(
    model: Any,
    processor: Any,
    dataset: Any,
    output_dir: str | Path,
    args: argparse.Namespace,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode, score, and write ``metrics.json`` and ``recall_at_k.png`` into `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = args.device or str(next(model.parameters()).device)
    encode = (args.batch_size, device, args.max_length)
    tokens = None
    if getattr(args, "rerank", None):  # stage 2 reads the tokens: one pass gives them with the embeddings
        image_embeds, text_embeds, caption_to_image, *tokens = encode_with_tokens(
            model, processor, dataset, *encode
        )
    else:
        image_embeds, text_embeds, caption_to_image = encode_dataset(model, processor, dataset, *encode)
    try:
        ranks = retrieval_ranks(
            caption_to_image=caption_to_image,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            chunk_size=args.chunk_size,
        )
        result = evaluate_embeddings(
            image_embeds, text_embeds, caption_to_image, args.fold_size or None, args.chunk_size, ranks=ranks
        )
    except NonFiniteScoresError as error:  # a broken model must not be scored: say which one and why
        raise NonFiniteScoresError(
            f"{args.checkpoint}: cannot be evaluated on {args.data}: {error}; evaluate an earlier checkpoint "
            "of the run, or retrain it (e.g. with a lower --learning_rate)"
        ) from error
    if tokens is not None:
        result["rerank"] = rerank_report(
            model, image_embeds, text_embeds, caption_to_image, *tokens, args.rerank, args.rerank_k,
            fold_size=args.fold_size or None, chunk_size=args.chunk_size, latency_queries=args.latency_queries,
            stage1_weight=args.rerank_fusion,
        )  # fmt: skip
    plot_recall_at_k(
        *ranks, output_dir / "recall_at_k.png", title=f"{Path(args.checkpoint).name} · {args.split}"
    )
    result.update(
        checkpoint=str(args.checkpoint),
        data=str(args.data),
        split=args.split,
        embed_dim=image_embeds.shape[1],
        **(extra or {}),
    )
    (output_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def check_evaluable(dataset: Any, report: LoadReport, args: argparse.Namespace) -> None:
    """Refuse (one line) a dataset with fewer than 2 images, saying why it has so few.

    With one image every query ranks it first: RSUM 600 from any model.
    """
    if len(dataset) >= 2:
        return
    where = f"split {args.split!r} in {args.data}"
    if len(dataset) == 1:
        raise DataError(
            f"only 1 image of {where}: retrieval needs at least 2 images (with one, "
            "every query ranks it first); pass a larger split or --max-images"
        )
    if report.n_skipped and not report.n_loaded:
        reasons = "; ".join(f"{entry}: {reason}" for entry, reason in report.skipped[:2])
        raise DataError(
            f"no images of {where}: all {report.n_skipped} entries were left out as bad "
            f"(e.g. {reasons}); fix them, or pass --on-error raise to stop at the first one"
        )
    others = f" (it has other splits: {report.other_splits})" if report.other_splits else ""
    fix = "pass --split NAME or 'all'"
    if Path(str(args.data)).suffix in (".csv", ".txt") and not args.splits_from:
        # a captions CSV has no split column: every image is in the default split "train"
        fix = "a captions CSV has no splits: pass --splits-from dataset_NAME.json (Karpathy), or --split all"
    raise DataError(f"no images of {where}{others}; {fix}")


def _output_dir(args: argparse.Namespace) -> Path:
    """The output folder; refuses to replace a finished evaluation unless ``--overwrite``."""
    output_dir = Path(args.output_dir or Path(args.checkpoint) / f"eval-{args.split}")
    if (output_dir / "metrics.json").exists() and not args.overwrite:
        raise ValueError(
            f"{output_dir / 'metrics.json'}: already exists (a finished evaluation); pass --output-dir "
            "NEW_FOLDER to keep it, or --overwrite to replace it"
        )
    return output_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the command; returns the metrics written to ``metrics.json``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_arguments(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    if args.rerank is not None and args.backend.startswith("onnx"):
        raise ValueError(
            f"--rerank {args.rerank} reads token embeddings, which the ONNX graphs do not return; "
            "drop --backend onnx (the default auto runs eager torch with --rerank)"
        )
    check_checkpoint_dir(args.checkpoint)  # both checked first: no work is done for a refused run
    check_max_length(args)
    output_dir = _output_dir(args)
    report = LoadReport()
    dataset = load_image_captions(
        args.data,
        format=args.format,
        image_root=args.image_root,
        split=None if args.split == "all" else args.split,
        n_captions=args.n_captions,
        # Skipping means decoding every image now: one that fails while encoding cannot be left out.
        verify_images=args.on_error == "skip",
        on_error=args.on_error,
        report=report,
        **_loader_kwargs(args),
    )
    if args.max_images is not None:
        dataset = dataset.select(range(min(args.max_images, len(dataset))))
    check_evaluable(dataset, report, args)
    if args.rerank is not None:  # the second stage reads token embeddings, which only eager torch returns
        model, processor = load_checkpoint(
            args.checkpoint, device, args.trust_remote_code, with_matching_head=args.rerank == "itm"
        )
    else:
        model, processor = load_encoder(args.checkpoint, args.backend, device, args.trust_remote_code)
    extra = {
        "n_skipped": report.n_skipped,
        "skipped": [f"{entry}: {reason}" for entry, reason in report.skipped],
        "unknown_splits": report.unknown_splits,
        "encoder_backend": getattr(model, "backend", "torch"),
    }
    result = evaluate_checkpoint(model, processor, dataset, output_dir, args, extra)
    print(metrics_table(result))
    if report.n_skipped:
        print(f"skipped {report.n_skipped} bad images/entries (listed in metrics.json)")
    print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'recall_at_k.png'}")
    return result
