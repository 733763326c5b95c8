"""Two-stage retrieval: the dual encoder's top-K by one inner product, re-scored by a second-stage scorer.

Stage 1 ranks the whole gallery by ``<query, item>``; stage 2 re-scores only each query's top-K with a
*reranker* and reorders them. The candidate set never changes, only its order: the K reranked items
stay ahead of the rest, which keep their stage-1 order. Rerankers read stored joint-space tokens
(`temde_hf.inference.tokens.TokenSet`), so a gallery that keeps its items' tokens is re-scored without
running its tower again.

Rerankers live in the `RERANKERS` registry (the tests loop over it, ``--rerank`` offers its names); a new one
is one `Reranker` subclass under ``@RERANKERS.register(name)``:

- ``"alignment"``: the token-level alignment score (TERAN; `alignment_temde`, with the model's
  `alignment_aggregation`), parameter-free;
- ``"itm"``: the matching head of a `TemdeForImageTextRetrieval` (a cross-encoder over both token sets).

A search over a gallery index wires in with `rerank_candidates` (the query's tokens, the gallery's
stored tokens, the stage-1 candidates); `temde_hf.evaluation.rerank.two_stage_metrics` reports R@K under
the standard protocol.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..models.temde.alignment_temde import PairScorer, paired_alignment_scores
from ..models.temde.registry_temde import Registry
from .tokens import TokenSet

# The second stage's defaults wherever a user reranks (`temde-hf evaluate` / `search`, `GalleryIndex.search`):
# re-score each query's top 20 and order them by z(stage 2) + 4·z(stage 1). Chosen on cross-validation by
# benchmarks/rerank.py: on every model measured, stage 2 alone ranked below stage 1, and CV picked the
# largest stage-1 weight searched (benchmarks/RESULTS.md, "Two-stage retrieval").
DEFAULT_RERANK_K = 20
DEFAULT_STAGE1_WEIGHT = 4.0


class Reranker:
    """Scores row-paired (image, caption) items from stored tokens; subclasses register in `RERANKERS`.

    The scoring itself is defined in the model folder (a `PairScorer`: the alignment score, the matching
    head); a subclass sets `scorer` to one, or overrides `score`.

    Args:
        model: The checkpoint's model (a `TemdeModel`; the ``"itm"`` reranker needs its matching head).
    """

    name = "base"
    scorer: PairScorer | None = None

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
        if self.scorer is None:
            raise NotImplementedError(f"{type(self).__name__} sets no scorer and does not override score")
        return self.scorer(image_tokens, image_mask, text_tokens, text_mask)

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
        self.scorer = partial(paired_alignment_scores, aggregation=self.aggregation)


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
        self.scorer = model.get_matching_logits  # moves the stored tokens to the head's device


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


__all__ = [
    "DEFAULT_RERANK_K",
    "DEFAULT_STAGE1_WEIGHT",
    "RERANKERS",
    "AlignmentReranker",
    "MatchingReranker",
    "Reranker",
    "build_reranker",
    "fuse_scores",
    "rerank_candidates",
    "score_candidates",
]
