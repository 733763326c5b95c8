"""Stored joint-space tokens (`TokenSet`): what a second-stage reranker reads instead of re-running a tower.

`encode_with_tokens` encodes a dataset's embeddings and tokens in one pass of the one encode path
(`temde_hf.inference.encode`'s dataset pass), like a gallery that stores its tokens (``temde-hf index
--store-tokens``); `encode_token_sets` keeps only the tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import datasets
import torch
from torch.nn import functional as F

from ..data.pairs import caption_to_image
from .encode import EncodedBatch, encode_dataset_batches


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


def gather_encoded(
    batches: Iterable[EncodedBatch], with_tokens: bool
) -> tuple[list[int], torch.Tensor, TokenSet | None]:
    """Encoded batches as one item set: what a gallery (in memory or one shard) keeps of them.

    Args:
        batches: From `iter_image_features` (with `token_dtype` when `with_tokens`).
        with_tokens: Also collect the tokens (`token_set_of`).

    Returns:
        The rows encoded, `(n, E)` embeddings and their `TokenSet` (None without tokens); no batches
        give no rows, a `(0, 0)` tensor and, with tokens, an empty `TokenSet`.
    """
    batches = list(batches)
    rows = [row for batch in batches for row in batch.rows]
    if not batches:
        empty = TokenSet(torch.empty(0, 0, 0), torch.empty(0, 0, dtype=torch.bool)) if with_tokens else None
        return rows, torch.empty(0, 0), empty
    if with_tokens:
        embeds, tokens = token_set_of(batches)
        return rows, embeds, tokens
    return rows, torch.cat([batch.embeds for batch in batches]), None


class EncodedWithTokens(NamedTuple):
    """A dataset's stage-1 embeddings and its joint-space tokens, from one encode pass."""

    image_embeds: torch.Tensor  # (n_images, E)
    text_embeds: torch.Tensor  # (n_captions, E)
    caption_to_image: torch.Tensor  # (n_captions,)
    image_tokens: TokenSet  # (n_images, L_image, D)
    text_tokens: TokenSet  # (n_captions, L_text, D)


def encode_with_tokens(
    model: Any,
    processor: Any,
    dataset: datasets.Dataset,
    batch_size: int = 32,
    device: str | None = None,
    max_length: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> EncodedWithTokens:
    """A dataset's embeddings (what `encode_dataset` returns) and tokens (`get_*_features(...).token_embeds`)
    in one pass: a second stage needs both, and encoding twice would double its cost.

    Args:
        model: A `TemdeModel` (or subclass).
        processor: Its processor.
        dataset: Image-level dataset with ``image`` and ``captions`` (a `temde_hf.data` loader's).
        dtype: Storage dtype of the tokens (scoring upcasts to float32); the embeddings stay float32.
    """
    images, captions = encode_dataset_batches(
        model, processor, dataset, batch_size, device, max_length, token_dtype=dtype
    )
    image_embeds, image_tokens = token_set_of(images)
    text_embeds, text_tokens = token_set_of(captions)
    return EncodedWithTokens(image_embeds, text_embeds, caption_to_image(dataset), image_tokens, text_tokens)


def encode_token_sets(
    model: Any,
    processor: Any,
    dataset: datasets.Dataset,
    batch_size: int = 32,
    device: str | None = None,
    max_length: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> tuple[TokenSet, TokenSet]:
    """The joint-space tokens of a dataset's images and captions (arguments as `encode_with_tokens`).

    Returns:
        Image tokens `(n_images, L_image, D)` and caption tokens `(n_captions, L_text, D)`.
    """
    encoded = encode_with_tokens(model, processor, dataset, batch_size, device, max_length, dtype)
    return encoded.image_tokens, encoded.text_tokens
