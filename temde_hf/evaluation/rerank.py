"""Two-stage retrieval, measured: R@K after re-scoring each query's stage-1 top-K (``temde-hf evaluate --rerank``).

The rerankers, their defaults and the scoring of candidates are inference (`temde_hf.inference.rerank`,
shared with the gallery's search); this module reports them under the standard protocol, on the whole
set and on COCO 1K folds, with per-stage latencies.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..inference.rerank import Reranker, build_reranker, fuse_scores, score_candidates
from ..inference.tokens import TokenSet
from .folds import fold_indices
from .metrics import metrics_from_ranks


def two_stage_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    is_true: Callable[[torch.Tensor], torch.Tensor],
    rerank: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    k: int,
    chunk_size: int = 256,
    stage1_weight: float = 0.0,
) -> torch.Tensor:
    """0-based rank of each query's best true item after stage 1 (inner product) + stage 2 (top-K).

    The K candidates come first, ordered by the reranker (or `fuse_scores` with `stage1_weight`); every
    other item follows in stage-1 order. Ties count against the query (every other item with an equal
    score ranks above the true one), as in `metrics.retrieval_ranks`; with `k` = gallery size and no
    fusion the ranks are those of the reranker's scores alone.

    Args:
        queries: `(Q, E)` stage-1 embeddings of the queries.
        gallery: `(G, E)`.
        is_true: Query rows `(c,)` -> `(c, G)` bool, True for the items that answer the query.
        rerank: (query rows `(c,)`, candidates `(c, K)`) -> reranker scores `(c, K)`.
        k: Candidates per query (clipped to the gallery size).
        chunk_size: Queries per block.
        stage1_weight: See `fuse_scores`.

    Returns:
        `(Q,)` int64 ranks.
    """
    k = min(k, gallery.shape[0])
    ranks = torch.empty(queries.shape[0], dtype=torch.long)
    for start in range(0, queries.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, queries.shape[0]))
        block = (queries[rows] @ gallery.T).float()  # (c, G)
        candidates = block.topk(k, dim=1).indices  # (c, K)
        scores = fuse_scores(rerank(rows, candidates).float(), block.gather(1, candidates), stage1_weight)
        truth = is_true(rows)
        true_candidate = truth.gather(1, candidates)  # (c, K)
        best = scores.masked_fill(~true_candidate, float("-inf")).amax(dim=1, keepdim=True)
        # pessimistic, as in `metrics.retrieval_ranks`: every other item with an equal score ranks above
        rank_inside = ((scores >= best) & ~true_candidate).sum(dim=1)
        rest = block.scatter(1, candidates, float("-inf"))  # stage-1 scores of the non-candidates
        best_rest = rest.masked_fill(~truth, float("-inf")).amax(dim=1, keepdim=True)
        rank_outside = k + ((rest >= best_rest) & ~truth).sum(dim=1)
        ranks[rows] = torch.where(true_candidate.any(dim=1), rank_inside, rank_outside)
    return ranks


def _median_ms(fn: Callable[[int], Any], queries: list[int]) -> float:
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _memoised(rerank: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    """`rerank` that scores a block of queries once (stage 1 picks the same candidates every time)."""
    seen: dict[tuple[int, ...], torch.Tensor] = {}

    def scores(rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        key = (int(rows[0]), len(rows), candidates.shape[1])
        if key not in seen:
            seen[key] = rerank(rows, candidates)
        return seen[key]

    return scores


def two_stage_metrics(
    reranker: Reranker,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_to_image: torch.Tensor,
    images: TokenSet,
    texts: TokenSet,
    k: int,
    chunk_size: int = 256,
    latency_queries: int = 0,
    stage1_weights: Sequence[float] = (0.0,),
) -> dict[str, Any]:
    """R@K both ways after reranking each query's stage-1 top-`k`, and per-query latencies.

    Args:
        reranker: From `build_reranker`.
        image_embeds: `(n_images, E)` stage-1 embeddings; text_embeds `(n_captions, E)`.
        caption_to_image: `(n_captions,)` the image of every caption.
        images: The images' tokens; texts: the captions' tokens.
        k: Candidates per query re-scored.
        chunk_size: Queries per block.
        latency_queries: If > 0, time this many single queries per direction: stage 1 (scores over the
            gallery + top-K, embeddings given) and stage 2 (the reranker on the K candidates), median ms.
        stage1_weights: Fusion weights to report (`fuse_scores`); the reranker scores each pair once.

    Returns:
        ``{"k", "reranked": {weight: metrics}, "latency_ms": {...}}`` (latencies only when asked for).
    """
    caption_to_image = torch.as_tensor(caption_to_image, dtype=torch.long)
    image_rows = torch.arange(len(images))

    def i2t_rerank(rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return score_candidates(reranker, images, rows, texts, candidates, query_is_image=True)

    def t2i_rerank(rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return score_candidates(reranker, texts, rows, images, candidates, query_is_image=False)

    i2t_scores, t2i_scores = _memoised(i2t_rerank), _memoised(t2i_rerank)
    reranked = {}
    for weight in stage1_weights:
        i2t = two_stage_ranks(
            image_embeds, text_embeds, lambda rows: caption_to_image[None, :] == rows[:, None], i2t_scores,
            k, chunk_size, weight,
        )  # fmt: skip
        t2i = two_stage_ranks(
            text_embeds, image_embeds, lambda rows: caption_to_image[rows][:, None] == image_rows[None, :],
            t2i_scores, k, chunk_size, weight,
        )  # fmt: skip
        reranked[weight] = metrics_from_ranks(i2t, t2i)
    result: dict[str, Any] = {"k": min(k, len(texts)), "reranked": reranked}
    if latency_queries > 0:
        result["latency_ms"] = _latencies(
            image_embeds, text_embeds, i2t_rerank, t2i_rerank, k, latency_queries
        )
    return result


def _latencies(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    i2t_rerank: Callable,
    t2i_rerank: Callable,
    k: int,
    n: int,
) -> dict[str, float]:
    """Median single-query milliseconds of each stage, each direction (stage-1 embeddings precomputed)."""
    out = {}
    for name, queries, gallery, rerank in (
        ("i2t", image_embeds, text_embeds, i2t_rerank),
        ("t2i", text_embeds, image_embeds, t2i_rerank),
    ):
        kk = min(k, gallery.shape[0])

        def stage1(q: int, queries: torch.Tensor = queries, gallery: torch.Tensor = gallery, kk: int = kk):
            return (queries[q : q + 1] @ gallery.T).topk(kk, dim=1).indices

        picked = list(range(min(n, queries.shape[0])))
        top = {q: stage1(q) for q in picked}
        out[f"stage1_{name}"] = _median_ms(stage1, picked)
        out[f"stage2_{name}"] = _median_ms(
            lambda q, rerank=rerank, top=top: rerank(torch.tensor([q]), top[q]), picked
        )
    return out


def rerank_report(
    model: Any,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_to_image: torch.Tensor,
    images: TokenSet,
    texts: TokenSet,
    name: str,
    k: int,
    *,
    fold_size: int | None = None,
    chunk_size: int = 256,
    latency_queries: int = 50,
    stage1_weight: float = 0.0,
) -> dict[str, Any]:
    """`temde-hf evaluate --rerank NAME --rerank-k K`: stage 2 on top of the stage-1 embeddings.

    Reranks each query's top-`k` (i2t and t2i) with the dataset's tokens (`inference.tokens.encode_with_tokens`
    gives them with the embeddings, in one pass) on the whole set and, like `folds.evaluate_embeddings`, on
    each `fold_size`-image fold when the set holds several (COCO 1K), and times single queries of each stage.

    Args:
        model: The checkpoint's model (the reranker's weights, e.g. the matching head).
        image_embeds: `(n_images, E)` stage-1 embeddings.
        text_embeds: `(n_captions, E)`.
        caption_to_image: `(n_captions,)`.
        images: The images' tokens `(n_images, L_image, D)`.
        texts: The captions' tokens `(n_captions, L_text, D)`.

    Returns:
        ``{"reranker", "k", "stage1_weight", "full", "folds"?, "folds_mean"?, "latency_ms",
        "token_bytes_per_image", "token_bytes_per_caption", "token_dtype"}``.
    """
    reranker = build_reranker(name, model)
    caption_to_image = torch.as_tensor(caption_to_image, dtype=torch.long)
    weights = (stage1_weight,)
    whole = two_stage_metrics(
        reranker,
        image_embeds,
        text_embeds,
        caption_to_image,
        images,
        texts,
        k,
        chunk_size,
        latency_queries,
        weights,
    )
    report: dict[str, Any] = {
        "reranker": name, "k": whole["k"], "stage1_weight": stage1_weight, "full": whole["reranked"][stage1_weight],
        "latency_ms": whole.get("latency_ms", {}),
        "token_bytes_per_image": images.bytes_per_item(), "token_bytes_per_caption": texts.bytes_per_item(),
        "token_dtype": str(images.tokens.dtype).removeprefix("torch."),
    }  # fmt: skip
    n_images = image_embeds.shape[0]
    if fold_size and n_images > fold_size and n_images % fold_size == 0:
        folds = []
        for image_ids, caption_ids in fold_indices(caption_to_image, n_images, fold_size):
            fold = two_stage_metrics(
                reranker, image_embeds[image_ids], text_embeds[caption_ids],
                caption_to_image[caption_ids] - image_ids[0], images.subset(image_ids), texts.subset(caption_ids),
                k, chunk_size, stage1_weights=weights,
            )  # fmt: skip
            folds.append(fold["reranked"][stage1_weight])
        report["folds"] = folds
        report["folds_mean"] = {key: sum(f[key] for f in folds) / len(folds) for key in folds[0]}
    return report


__all__ = ["rerank_report", "two_stage_metrics", "two_stage_ranks"]
