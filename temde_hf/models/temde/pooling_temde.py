"""Global pooling heads: projected tokens -> one vector per item, selectable by `config.pooling`.

Every head is built from the config and has the same call signature, so the model, the ablation
benchmark and the tests loop over `POOLING_HEADS` without special cases; a new head is one class under
`@POOLING_HEADS.register(name)`. The T-EMDE sketch is fused on top of the chosen head (see
`TemdeConfig.sketch_fusion`), so "T-EMDE with each fusion" is a head × fusion combination.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .registry_temde import Registry

if TYPE_CHECKING:  # the config validates `pooling` against POOLING_HEADS, so it imports this module
    from .configuration_temde import TemdeConfig

POOLING_HEADS = Registry("pooling", "POOLING_HEADS")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, L, D)`, `(B, L)` -> `(B, D)`: mean over valid tokens (an all-padding row gives zeros)."""
    mask = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class PoolingHead(nn.Module):
    """Base class: `forward(tokens (B, L, D), mask (B, L), pooled (B, D) | None) -> (B, D)`."""

    def __init__(self, config: TemdeConfig) -> None:
        super().__init__()


@POOLING_HEADS.register("pooler")
class PoolerHead(PoolingHead):
    """The tower's own pooled output (e.g. BERT's pooler, CLIP's post-LN [CLS]), projected to D.

    Falls back to the first token for towers without a pooled output.
    """

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        return pooled if pooled is not None else tokens[:, 0]


@POOLING_HEADS.register("cls")
class ClsHead(PoolingHead):
    """The first token ([CLS] for BERT/ViT)."""

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        return tokens[:, 0]


@POOLING_HEADS.register("mean")
class MeanHead(PoolingHead):
    """Masked mean of the projected tokens."""

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        return masked_mean(tokens, mask)


@POOLING_HEADS.register("attention")
class AttentionHead(PoolingHead):
    """Self-attention pooling: one pre-LN transformer encoder layer over the tokens, then masked mean.

    This is the O(L²) head that T-EMDE is meant to replace.
    """

    def __init__(self, config: TemdeConfig) -> None:
        super().__init__(config)
        d = config.projection_dim
        self.layer = nn.TransformerEncoderLayer(
            d,
            config.attention_pooling_heads,
            dim_feedforward=4 * d,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        padding = ~mask.bool()  # True where the token is padding, as nn.MultiheadAttention expects
        return masked_mean(self.layer(tokens, src_key_padding_mask=padding), mask)
