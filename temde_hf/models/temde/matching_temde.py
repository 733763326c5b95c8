"""The image–text matching head (a cross-encoder) on top of the T-EMDE dual encoder.

"Retrieve fast, rerank smart" (Geigle et al., 2022): the dual encoder retrieves the top-K with one inner
product; a cross-encoder, joint attention over *both* token sequences and a binary match logit,
re-scores only those K. Here the cross-encoder reads the dual encoder's own joint-space tokens
(`token_embeds`, `(batch, tokens, projection_dim)`), so a gallery that keeps its images' tokens can be
re-scored without running the image tower again.

`TemdeForImageTextRetrieval` *is* a `TemdeModel` (same parameter names, so every dual-encoder
checkpoint loads into it, with a fresh `itm_head.*`) plus the head. Like BLIP-2's
`Blip2ForImageTextRetrieval`, its forward returns the dual encoder's outputs by default and the match
logit of each (image i, text i) row with `use_itm_head=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import can_return_tuple

from .configuration_temde import TemdeConfig
from .modeling_temde import TemdeModel, TemdeOutput


class TemdeMatchingHead(nn.Module):
    """Joint attention over `[CLS; image tokens; caption tokens]` (+ modality embeddings) -> a match logit.

    `config.itm_layers` pre-LN transformer layers of width `itm_hidden_size` (default `projection_dim`;
    `config.itm_heads` heads, MLP 4x wide, no dropout: the head is deterministic, so gradient caching
    replays it exactly). Padding
    is masked out of the attention, so a logit never depends on padded tokens. There is no position
    embedding: the towers' tokens are already contextual (and a CNN's grid size varies with resolution).
    """

    def __init__(self, config: TemdeConfig) -> None:
        super().__init__()
        d = config.itm_hidden_size or config.projection_dim
        # the dual encoder's tokens have no fixed scale (they are trained for inner products after pooling)
        self.input_norm = nn.LayerNorm(config.projection_dim)
        self.input_projection = nn.Linear(config.projection_dim, d) if d != config.projection_dim else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.modality_embeddings = nn.Embedding(2, d)  # 0: image token, 1: caption token
        layer = dict(dim_feedforward=4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, config.itm_heads, **layer) for _ in range(config.itm_layers)
        )
        self.final_norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, 1)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Match logits of row-paired token sets.

        Args:
            image_tokens: `(P, L_image, D)` joint-space image tokens.
            image_mask: `(P, L_image)`, nonzero for real tokens.
            text_tokens: `(P, L_text, D)`.
            text_mask: `(P, L_text)`.

        Returns:
            `(P,)` logits: > 0 means "this caption describes this image".
        """
        n = image_tokens.shape[0]
        images = self._embed(image_tokens) + self.modality_embeddings.weight[0]
        texts = self._embed(text_tokens) + self.modality_embeddings.weight[1]
        x = torch.cat([self.cls_token.expand(n, -1, -1), images, texts], dim=1)  # (P, 1 + Li + Lt, width)
        keep = torch.cat(
            [image_mask.new_ones(n, 1), image_mask, text_mask.to(image_mask.dtype)], dim=1
        ).bool()
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~keep)  # True marks padding, as nn.MultiheadAttention expects
        return self.classifier(self.final_norm(x[:, 0])).squeeze(-1)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(P, L, projection_dim)` joint-space tokens -> `(P, L, width)` head inputs."""
        x = self.input_norm(tokens.to(self.cls_token.dtype))
        return x if self.input_projection is None else self.input_projection(x)


@dataclass
class TemdeRetrievalOutput(TemdeOutput):
    r"""[`TemdeOutput`] plus the matching head's logits.

    itm_logits (`(n_pairs,)`): match logit of each (image i, text i) row (`use_itm_head=True`) or of each
        precomputed `pair_*` token pair.
    """

    itm_logits: torch.Tensor | None = None


class TemdeForImageTextRetrieval(TemdeModel):
    """The T-EMDE dual encoder (stage 1: retrieve) with an image–text matching head (stage 2: rerank).

    Example:
        ```python
        >>> model = TemdeForImageTextRetrieval.from_pretrained("outputs/demo")  # a fresh head if it had none
        >>> batch = processor(images=[image, image], text=["a dog on a beach", "two cats"])
        >>> model(**batch, use_itm_head=True).itm_logits  # (2,): image 0 with text 0, image 1 with text 1
        ```
    """

    def __init__(self, config: TemdeConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.itm_head = TemdeMatchingHead(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, TemdeMatchingHead):
            init.normal_(module.cls_token, std=self.config.initializer_range)
        else:
            super()._init_weights(module)

    def get_matching_logits(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Match logits `(P,)` of row-paired stored tokens (see `TemdeMatchingHead.forward`); a `PairScorer`.

        The tokens may sit on another device than the head (a gallery's, memory-mapped on the CPU):
        they are moved to the head's.
        """
        to = self.itm_head.cls_token.device
        return self.itm_head(image_tokens.to(to), image_mask.to(to), text_tokens.to(to), text_mask.to(to))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        vision_outputs: BaseModelOutputWithPooling | tuple[torch.Tensor, ...] | None = None,
        text_outputs: BaseModelOutputWithPooling | tuple[torch.Tensor, ...] | None = None,
        use_itm_head: bool = False,
        pair_image_tokens: torch.Tensor | None = None,
        pair_image_mask: torch.Tensor | None = None,
        pair_text_tokens: torch.Tensor | None = None,
        pair_text_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        sketch_weight: float | None = None,
    ) -> TemdeRetrievalOutput:
        """The dual encoder's outputs and, on request, match logits.

        Args:
            input_ids, pixel_values, attention_mask, ...: as in [`TemdeModel.forward`].
            use_itm_head: also score each row-paired (image i, text i) with the matching head (needs
                as many images as texts), into `itm_logits`.
            pair_image_tokens, pair_image_mask, pair_text_tokens, pair_text_mask: precomputed joint-space
                tokens `(P, L, D)` and masks `(P, L)` of pairs to score with the head instead (e.g. a
                trainer's mined hard negatives); may come without any images or texts.

        Returns:
            [`TemdeRetrievalOutput`]; `itm_logits` `(P,)` when asked for.
        """
        has_pairs = pair_image_tokens is not None
        if use_itm_head and has_pairs:
            raise ValueError(
                "pass either use_itm_head=True (score the inputs' pairs) or pair_* tokens, not both"
            )
        inputs = (input_ids, pixel_values, vision_outputs, text_outputs)
        out = None
        if any(v is not None for v in inputs) or not has_pairs:
            out = super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                position_ids=position_ids, token_type_ids=token_type_ids, vision_outputs=vision_outputs,
                text_outputs=text_outputs, return_loss=return_loss, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, sketch_weight=sketch_weight,
            )  # fmt: skip
        itm_logits = None
        if use_itm_head:
            vision, text = out.vision_model_output, out.text_model_output
            if vision is None or text is None or vision.token_embeds.shape[0] != text.token_embeds.shape[0]:
                raise ValueError(
                    "use_itm_head=True scores row-paired inputs: pass as many images as texts "
                    "(repeat an image to score it against several captions)."
                )
            itm_logits = self.itm_head(
                vision.token_embeds, vision.token_mask, text.token_embeds, text.token_mask
            )
        elif has_pairs:
            itm_logits = self.itm_head(pair_image_tokens, pair_image_mask, pair_text_tokens, pair_text_mask)
        fields = dict(out.items()) if out is not None else {"logit_scale": self.logit_scale.exp()}
        return TemdeRetrievalOutput(**fields, itm_logits=itm_logits)


__all__ = ["TemdeForImageTextRetrieval", "TemdeMatchingHead", "TemdeRetrievalOutput"]
