"""Two-stage retrieval: the dual encoder's top-K by one inner product, re-scored by a second-stage scorer.

Stage 1 ranks the whole gallery by ``<query, item>``; stage 2 re-scores only each query's top-K with a
*reranker* and reorders them. The candidate set never changes, only its order: the K reranked items
stay ahead of the rest, which keep their stage-1 order. Rerankers read stored joint-space tokens
(`TokenSet`), so a gallery that keeps its items' tokens is re-scored without running its tower again.

Rerankers live in the `RERANKERS` registry (the tests loop over it, ``--rerank`` offers its names); a new one
is one `Reranker` subclass under ``@RERANKERS.register(name)``:

- ``"alignment"``: the token-level alignment score (TERAN; `alignment_temde`, with the model's
  `alignment_aggregation`), parameter-free;
- ``"itm"``: the matching head of a `TemdeForImageTextRetrieval` (a cross-encoder over both token sets).

A search over a gallery index wires in with `rerank_candidates` (the query's tokens, the gallery's
stored tokens, the stage-1 candidates); `two_stage_metrics` reports R@K under the standard protocol.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch.nn import functional as F

from ..data.pairs import flat_captions
from ..models.temde.alignment_temde import paired_alignment_scores
from ..models.temde.registry_temde import Registry
from .encode import EncodedBatch, iter_image_features, iter_text_features
from .metrics import metrics_from_ranks

# The second stage's defaults wherever a user reranks (`temde-hf evaluate` / `search`, `GalleryIndex.search`):
# re-score each query's top 20 and order them by z(stage 2) + 4·z(stage 1). Chosen on cross-validation by
# benchmarks/rerank.py: on every model measured, stage 2 alone ranked below stage 1, and CV picked the
# largest stage-1 weight searched (benchmarks/RESULTS.md, "Two-stage retrieval").
DEFAULT_RERANK_K = 20
DEFAULT_STAGE1_WEIGHT = 4.0


@dataclass
class TokenSet:
    """Joint-space tokens of `n` items, zero-padded to a common length.

    Attributes:
        tokens: `(n, L, D)`, stored in any float dtype (float16 halves a gallery's memory).
        mask: `(n, L)` bool, True for real tokens.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def take(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items `ids` `(m,)` as float32 `(m, L', D)` tokens and `(m, L')` mask, trimmed to their longest."""
        mask = self.mask[ids]
        length = max(1, int(mask.sum(dim=1).max())) if len(ids) else 1
        return self.tokens[ids, :length].float(), mask[:, :length]

    def subset(self, ids: torch.Tensor) -> TokenSet:
        """A `TokenSet` of items `ids` (e.g. one COCO 1K fold)."""
        return TokenSet(self.tokens[ids], self.mask[ids])

    def bytes_per_item(self) -> float:
        """Mean storage of one item's *valid* tokens (what a gallery that stores them unpadded keeps)."""
        per_token = self.tokens.shape[-1] * self.tokens.element_size()
        return float(self.mask.sum()) * per_token / max(1, len(self))


class Reranker:
    """Scores row-paired (image, caption) items from stored tokens; subclasses register in `RERANKERS`.

    Args:
        model: The checkpoint's model (a `TemdeModel`; the ``"itm"`` reranker needs its matching head).
    """

    name = "base"

    def __init__(self, model: Any) -> None:
        self.model = model

    def score(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """`(P, Li, D)`, `(P, Li)`, `(P, Lt, D)`, `(P, Lt)` -> `(P,)` scores (higher: better match)."""
        raise NotImplementedError

    @torch.inference_mode()
    def score_pairs(
        self,
        images: TokenSet,
        image_ids: torch.Tensor,
        texts: TokenSet,
        text_ids: torch.Tensor,
        batch_size: int = 512,
    ) -> torch.Tensor:
        """Scores `(P,)` float32 of the pairs (image `image_ids[p]`, caption `text_ids[p]`), in batches."""
        out = []
        for start in range(0, len(image_ids), batch_size):
            rows = slice(start, start + batch_size)
            image_tokens, image_mask = images.take(image_ids[rows])
            text_tokens, text_mask = texts.take(text_ids[rows])
            out.append(self.score(image_tokens, image_mask, text_tokens, text_mask).float().cpu())
        return torch.cat(out) if out else torch.empty(0)


# Name -> `Reranker` subclass, built for a model by `build_reranker`.
RERANKERS = Registry("rerank", "RERANKERS")


@RERANKERS.register("alignment")
class AlignmentReranker(Reranker):
    """TERAN's token-level alignment score, aggregated as the model's config says."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.aggregation = getattr(model.config, "alignment_aggregation", "max_mean")

    def score(self, image_tokens, image_mask, text_tokens, text_mask) -> torch.Tensor:
        return paired_alignment_scores(image_tokens, image_mask, text_tokens, text_mask, self.aggregation)


@RERANKERS.register("itm")
class MatchingReranker(Reranker):
    """The matching head's logit (a cross-encoder over both token sets)."""

    def __init__(self, model: Any) -> None:
        if not hasattr(model, "get_matching_logits"):
            raise ValueError(
                f"--rerank itm needs a model with a matching head, got {type(model).__name__}: train one with "
                "`temde-hf train ... --itm_weight 1` (it saves a TemdeForImageTextRetrieval), or use --rerank alignment"
            )
        super().__init__(model)
        self.device = next(model.parameters()).device

    def score(self, image_tokens, image_mask, text_tokens, text_mask) -> torch.Tensor:
        to = self.device
        return self.model.get_matching_logits(
            image_tokens.to(to), image_mask.to(to), text_tokens.to(to), text_mask.to(to)
        )


def build_reranker(name: str, model: Any) -> Reranker:
    """The reranker `name` of `RERANKERS` for `model`."""
    RERANKERS.check(name, label=f"--rerank {name!r}")
    return RERANKERS[name](model)


def score_candidates(
    reranker: Reranker,
    queries: TokenSet,
    query_ids: torch.Tensor,
    gallery: TokenSet,
    candidates: torch.Tensor,
    query_is_image: bool,
) -> torch.Tensor:
    """The reranker's score `(Q, K)` of every (query, candidate).

    Args:
        reranker: From `build_reranker`.
        queries: Tokens of the queries (images or captions).
        query_ids: `(Q,)` the queries' rows in `queries`.
        gallery: Tokens of the gallery (the other modality).
        candidates: `(Q, K)` gallery rows, e.g. stage 1's top-K of each query.
        query_is_image: Image -> caption search (else caption -> image).
    """
    n_queries, k = candidates.shape
    query_rows = query_ids.repeat_interleave(k)
    gallery_rows = candidates.reshape(-1)
    if query_is_image:
        scores = reranker.score_pairs(queries, query_rows, gallery, gallery_rows)
    else:
        scores = reranker.score_pairs(gallery, gallery_rows, queries, query_rows)
    return scores.reshape(n_queries, k)


def fuse_scores(stage2: torch.Tensor, stage1: torch.Tensor, stage1_weight: float) -> torch.Tensor:
    """The score that orders each query's K candidates: stage 2 alone, or fused with stage 1.

    With a weight, both scores are standardised over each query's candidates first (a matching logit,
    an alignment score and an inner product live on unrelated scales): `z(stage2) + w·z(stage1)`.

    Args:
        stage2: `(Q, K)` reranker scores.
        stage1: `(Q, K)` stage-1 scores of the same candidates.
        stage1_weight: w; 0 gives `stage2` unchanged.
    """
    if stage1_weight == 0:
        return stage2

    def z(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True, correction=0).clamp_min(1e-6)

    return z(stage2.float()) + stage1_weight * z(stage1.float())


def rerank_candidates(
    reranker: Reranker,
    queries: TokenSet,
    query_ids: torch.Tensor,
    gallery: TokenSet,
    candidates: torch.Tensor,
    query_is_image: bool,
    stage1_scores: torch.Tensor | None = None,
    stage1_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each query's stage-1 candidates by the reranker's score (arguments as `score_candidates`).

    Args:
        stage1_scores: `(Q, K)` the candidates' stage-1 scores (needed when `stage1_weight` is not 0).
        stage1_weight: Fuse with stage 1 (`fuse_scores`); 0: the reranker alone.

    Returns:
        `(Q, K)` the same candidates, best first, and `(Q, K)` the scores that ordered them.
    """
    scores = score_candidates(reranker, queries, query_ids, gallery, candidates, query_is_image)
    if stage1_weight:
        if stage1_scores is None:
            raise ValueError("stage1_weight needs the candidates' stage1_scores")
        scores = fuse_scores(scores, stage1_scores, stage1_weight)
    order = scores.argsort(dim=1, descending=True, stable=True)  # ties keep the stage-1 order
    return candidates.gather(1, order), scores.gather(1, order)


def token_set_of(batches: Iterable[EncodedBatch]) -> tuple[torch.Tensor, TokenSet]:
    """Concatenate encoded batches (with tokens): `(n, E)` embeddings and their `TokenSet`.

    Batches may hold different token lengths (captions are padded per batch); shorter ones are
    zero-padded to the longest, with the mask marking the padding.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("nothing was encoded: no tokens to collect")
    if any(batch.tokens is None for batch in batches):
        raise ValueError("token_set_of needs batches encoded with token_dtype (tokens requested)")
    length = max(batch.tokens.shape[1] for batch in batches)
    tokens = [F.pad(batch.tokens, (0, 0, 0, length - batch.tokens.shape[1])) for batch in batches]
    masks = [F.pad(batch.token_mask, (0, length - batch.token_mask.shape[1])) for batch in batches]
    embeds = torch.cat([batch.embeds for batch in batches])
    return embeds, TokenSet(torch.cat(tokens), torch.cat(masks))


def encode_token_sets(
    model: Any,
    processor: Any,
    dataset: datasets.Dataset,
    batch_size: int = 32,
    device: str | None = None,
    max_length: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> tuple[TokenSet, TokenSet]:
    """The joint-space tokens of a dataset's images and captions (`get_*_features(...).token_embeds`).

    Encodes through `temde_hf.evaluation.encode` (the one encode path), like a gallery that stores
    its tokens (``temde-hf index --store-tokens``).

    Args:
        model: A `TemdeModel` (or subclass).
        processor: Its processor.
        dataset: Image-level dataset with ``image`` and ``captions`` (a `temde_hf.data` loader's).
        dtype: Storage dtype of the tokens (scoring upcasts to float32).

    Returns:
        Image tokens `(n_images, L_image, D)` and caption tokens `(n_captions, L_text, D)`.
    """
    image_batches = iter_image_features(
        model,
        processor,
        dataset,
        token_dtype=dtype,
        batch_size=batch_size,
        device=device,
        desc="image tokens",
    )
    text_batches = iter_text_features(
        model, processor, flat_captions(dataset), 4 * batch_size, device, max_length, token_dtype=dtype
    )
    return token_set_of(image_batches)[1], token_set_of(text_batches)[1]


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
    processor: Any,
    dataset: datasets.Dataset,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_to_image: torch.Tensor,
    name: str,
    k: int,
    *,
    batch_size: int = 32,
    device: str | None = None,
    max_length: int | None = None,
    fold_size: int | None = None,
    chunk_size: int = 256,
    latency_queries: int = 50,
    stage1_weight: float = 0.0,
) -> dict[str, Any]:
    """`temde-hf evaluate --rerank NAME --rerank-k K`: stage 2 on top of the stage-1 embeddings.

    Encodes the dataset's tokens, reranks each query's top-`k` (i2t and t2i) on the whole set and, like
    `folds.evaluate_embeddings`, on each `fold_size`-image fold when the set holds several (COCO 1K),
    and times single queries of each stage.

    Returns:
        ``{"reranker", "k", "stage1_weight", "full", "folds"?, "folds_mean"?, "latency_ms",
        "token_bytes_per_image", "token_bytes_per_caption", "token_dtype"}``.
    """
    from .folds import fold_indices

    reranker = build_reranker(name, model)
    images, texts = encode_token_sets(model, processor, dataset, batch_size, device, max_length)
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


__all__ = [
    "RERANKERS",
    "AlignmentReranker",
    "MatchingReranker",
    "Reranker",
    "TokenSet",
    "build_reranker",
    "encode_token_sets",
    "fuse_scores",
    "rerank_candidates",
    "rerank_report",
    "score_candidates",
    "token_set_of",
    "two_stage_metrics",
    "two_stage_ranks",
]
