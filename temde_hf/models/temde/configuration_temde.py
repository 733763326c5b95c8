"""Configuration of the T-EMDE vision-text dual encoder.

The config is the whole architecture: two tower sub-configs of any registered transformers
architecture, the joint projection, the global pooling head and the T-EMDE sketch. Training settings
(learning rates, schedules, batch sizes) live in the training arguments, not here.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .alignment_temde import ALIGNMENT_AGGREGATIONS
from .configuration_efficientnet_lite import EfficientNetLiteConfig
from .pooling_temde import POOLING_HEADS
from .sketch_temde import SKETCH_CODERS

# Pooling heads and sketch coders are checked against their registries (a registered part is a valid
# choice with no other edit); the loss is a training setting (`temde_hf.training.arguments`).
FUSION_CHOICES = ("concat", "replace", "none")
KERNEL_CHOICES = ("auto", "torch", "triton", "reference")
# K = 2^H buckets per sketch, and a `concat` embedding stores N·2^H sketch values per item: at H = 12
# (K = 4,096) that is already 131,072 floats per item at N = 32, and the fused kernel's tile tops out
# there too (`triton_sketch_temde.MAX_TRITON_HYPERPLANES`). Beyond it a sketch fits no retrieval index
# (H = 40 would ask for terabytes), so larger H is a configuration error, not a slow run.
MAX_HYPERPLANES = 12
# Towers whose first token is no summary of the input, by `model_type`: the `cls` head would pool it
# (`pooler` takes the tower's pooled output instead, which all of these have).
_CAUSAL_TEXT = (
    "its summary is the end-of-text token (the pooled output); under causal attention the first token "
    "sees only itself, so every caption would get the same embedding"
)
_FEATURE_MAP = "a convolutional feature map: its first token is the top-left cell of the image, not a summary"
NO_SUMMARY_TOKEN = {
    "clip_text_model": _CAUSAL_TEXT,
    "siglip_text_model": "it has no [CLS]: its summary is the last token (the pooled output)",
    "siglip_vision_model": "it has no [CLS]: its tokens are patches, summarised by its attention-pooling head",
    "siglip2_vision_model": "it has no [CLS]: its tokens are patches, summarised by its attention-pooling head",
    **{
        name: _FEATURE_MAP
        for name in ("convnext", "convnextv2", "resnet", "efficientnet", "efficientnet_lite", "regnet", "bit")
    },
}


# Tower configs that ship inside this folder, so remote code resolves them without registration.
LOCAL_TOWER_CONFIGS: dict[str, type[PreTrainedConfig]] = {
    EfficientNetLiteConfig.model_type: EfficientNetLiteConfig
}


def _resolve_tower_config(name: str, value: Any) -> PreTrainedConfig | None:
    """Turn a sub-config given as a dict (as read from `config.json`) into its config class."""
    if value is None or isinstance(value, PreTrainedConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f"TemdeConfig.{name} must be a PreTrainedConfig or a dict with a 'model_type', got {type(value).__name__}."
        )
    model_type = value.get("model_type")
    if not model_type:
        raise ValueError(
            f"TemdeConfig.{name} has no 'model_type': pass e.g. {{'model_type': 'vit', ...}} or a config object "
            "such as ViTConfig(...) / BertConfig(...)."
        )
    if model_type in LOCAL_TOWER_CONFIGS:
        return LOCAL_TOWER_CONFIGS[model_type](**value)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"TemdeConfig.{name} has model_type={model_type!r}, which transformers does not know. Register its "
            "config with AutoConfig.register(...) or use a built-in architecture (vit, clip_vision_model, "
            "convnext, bert, clip_text_model, ...)."
        )
    return CONFIG_MAPPING[model_type](**value)


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"TemdeConfig.{field}={value!r} is not supported; choose one of {', '.join(allowed)}."
        )


def _check_positive(field: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    kind = int if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kind)
    # NaN compares False with everything, so it would pass a plain sign test: check finiteness first.
    bad = bad or not math.isfinite(value) or (value < 0 if allow_zero else value <= 0)
    if bad:
        what = "an integer" if integer else "a number"
        sign = (">= 0" if allow_zero else "> 0") + ("" if integer else " and finite")
        raise ValueError(f"TemdeConfig.{field}={value!r} must be {what} {sign}.")


class TemdeConfig(PreTrainedConfig):
    r"""Configuration of a [`TemdeModel`]: two towers, a joint space, a pooling head and a T-EMDE sketch.

    Args:
        vision_config (`dict` or `PreTrainedConfig`):
            Config of the image tower: any registered architecture (ViT, CLIP vision, ConvNeXt,
            EfficientNet-Lite, ...). Its `last_hidden_state` provides the image tokens.
        text_config (`dict` or `PreTrainedConfig`):
            Config of the text tower (BERT, MiniLM, CLIP text, ...).
        projection_dim (`int`, defaults to 256):
            D, the joint space both towers' tokens are projected into.
        pooling (`str`, defaults to `"mean"`):
            Global head on the projected tokens: `"pooler"` (the tower's pooled output, projected),
            `"cls"` (the first token), `"mean"` (masked mean) or `"attention"` (one transformer layer, then
            masked mean: the self-attention pooling that T-EMDE replaces).
        attention_pooling_heads (`int`, defaults to 4): heads of the `"attention"` pooling layer.
        sketch_fusion (`str`, defaults to `"concat"`):
            `"concat"`: the embedding is `[ê ; sqrt(λ/N)·vec(Ŝ)]` so that the inner product is
            `<ê_I, ê_T> + λ·s_sketch`; `"replace"`: a linear map of `vec(Ŝ)` replaces the pooled vector;
            `"none"`: plain pooling, no sketch.
        sketch_coder (`str`, defaults to `"soft_dlsh"`): `"soft_dlsh"` (H learned hyperplanes per sketch,
            product of sigmoids) or `"anchor"` (softmax over K learned anchors).
        n_sketches (`int`, defaults to 32): N, independent partitions of the joint space.
        n_hyperplanes (`int`, *optional*): H hyperplanes per sketch, so K = 2^H (default 6 when
            `sketch_width` is not given either).
        sketch_width (`int`, *optional*): K, buckets per sketch. For `soft_dlsh` it must equal 2^H.
        sketch_temperature (`float`, defaults to 1.0): τ of the soft bucket assignment; as τ → 0
            `soft_dlsh` becomes hard DLSH bucketing.
        learn_sketch_temperature (`bool`, defaults to `True`): learn log τ, or keep τ fixed.
        sketch_weight (`float`, defaults to 1.0): λ, the weight of the sketch similarity in `concat`.
        sketch_chunk_size (`int`, defaults to 64): tokens per chunk when the `anchor` coder or the
            `"reference"` path accumulates histograms, which bounds memory at `batch × chunk × N × K`
            instead of `batch × tokens × N × K` (`soft_dlsh` holds `2H + 2^⌊H/2⌋ + 2^⌈H/2⌉` values per
            token and sketch instead of K, unchunked).
        sketch_kernel (`str`, defaults to `"auto"`): `"auto"` uses the fused Triton kernel on CUDA when
            available and PyTorch elsewhere; `"torch"` / `"triton"` force one; `"reference"` is the slow
            log-space PyTorch path the others are tested against.
        sketch_vision_feature_layers (`list[int]`, *optional*): indices into the vision tower's
            `hidden_states` (as transformers' LLaVA `vision_feature_layer`; negative ones count from the end)
            whose maps ALSO feed the sketch: each gets its own linear projection to `projection_dim`, and its
            tokens join the last map's tokens in the set the sketch reads. The global head (pooling) and the
            token-level heads keep the last map's tokens only, so the option changes nothing of a model
            without a sketch (refused with `sketch_fusion="none"`). For EfficientNet-Lite the hidden states
            are (stem, every block, head): in Lite0 at 224 px index 11 is the last block of the 14 × 14
            stage (112 channels, 196 tokens beside the 7 × 7 head map's 49). Supported for EfficientNet-Lite
            and towers whose hidden states all have `hidden_size` channels (ViT, CLIP, DeiT, ...). `None`
            (default): the sketch reads the last map only.
        token_layer_norm (`bool`, defaults to `False`): a LayerNorm (per tower) on every tower token before
            the projection, so tokens of towers with very different feature scales (a CNN's post-activation
            map, a transformer's last layer) enter the joint space on a common footing.
        alignment_aggregation (`str`, defaults to `"max_mean"`): how the token-level (TERAN) alignment
            score aggregates the word–region cosine similarities of a pair: `"max_mean"` (every word's best
            region, averaged over words), `"max_sum"` (summed over words: TERAN's MrSw) or `"symmetric"`
            (the mean of `"max_mean"` and its region-to-word mirror). Parameter-free; it says how this
            model's tokens are compared by the alignment reranker and the alignment training objective.
        itm_layers (`int`, defaults to 2): joint-attention transformer layers of the image–text matching
            head (`TemdeForImageTextRetrieval`); the dual encoder `TemdeModel` ignores it.
        itm_heads (`int`, defaults to 4): attention heads of those layers (their width must divide).
        itm_hidden_size (`int`, *optional*): width of the matching head's layers; the joint-space tokens
            are mapped to it by a linear layer. Defaults to `projection_dim` (no map). A narrower head
            costs quadratically less per pair.
        logit_scale_init_value (`float`, defaults to 2.6592): initial log of the logit scale (ln(1/0.07)).
        initializer_range (`float`, defaults to 0.02): std of the head's linear layers at init.

    Example:
        ```python
        >>> from transformers import BertConfig, ViTConfig
        >>> from temde_hf import TemdeConfig, TemdeModel
        >>> config = TemdeConfig(vision_config=ViTConfig(), text_config=BertConfig(), n_sketches=32)
        >>> model = TemdeModel(config)
        ```
    """

    model_type = "temde"
    # optional=True: a missing tower stays None here and TemdeModel raises a clear error, while
    # transformers can still build a default TemdeConfig() internally (e.g. to diff configs on save).
    sub_configs_defaults: ClassVar = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    projection_dim: int = 256
    pooling: str = "mean"
    attention_pooling_heads: int = 4
    sketch_fusion: str = "concat"
    sketch_coder: str = "soft_dlsh"
    n_sketches: int = 32
    n_hyperplanes: int | None = None
    sketch_width: int | None = None
    sketch_temperature: float = 1.0
    learn_sketch_temperature: bool = True
    sketch_weight: float = 1.0
    sketch_chunk_size: int = 64
    sketch_kernel: str = "auto"
    sketch_vision_feature_layers: list[int] | None = None
    token_layer_norm: bool = False
    alignment_aggregation: str = "max_mean"
    itm_layers: int = 2
    itm_heads: int = 4
    itm_hidden_size: int | None = None
    logit_scale_init_value: float = 2.6592
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        self.vision_config = _resolve_tower_config("vision_config", self.vision_config)
        self.text_config = _resolve_tower_config("text_config", self.text_config)
        self._resolve_sketch_shape()
        super().__post_init__(**kwargs)
        self._validate_temde()

    def _resolve_sketch_shape(self) -> None:
        """Fill in whichever of H and K is missing: K = 2^H for a coder whose class declares
        `width_is_power_of_two` (see `SketchCoder`), else K defaults to 2^H and H to log2(K) when K is a
        power of two."""
        h, k = self.n_hyperplanes, self.sketch_width
        coder = self.sketch_coder
        # An unknown name is refused by `_validate_temde`, with the registered choices.
        power_of_two = getattr(SKETCH_CODERS.get(coder), "width_is_power_of_two", False)
        if h is None and k is None:
            h = 6
        if h is not None:
            _check_positive("n_hyperplanes", h, integer=True)
        if k is not None:
            _check_positive("sketch_width", k, integer=True)
        if k is None:
            k = 2**h
        elif h is None and power_of_two:
            if k & (k - 1):
                raise ValueError(
                    f"TemdeConfig.sketch_width={k} must be a power of two for sketch_coder={coder!r} "
                    "(K = 2^n_hyperplanes); use sketch_coder='anchor' for other widths."
                )
            h = int(math.log2(k))
        if power_of_two and h is not None and k != 2**h:
            raise ValueError(
                f"TemdeConfig: sketch_width={k} does not match n_hyperplanes={h} ({coder} needs K = 2^H = "
                f"{2**h}); give only one of them."
            )
        if h is not None and h > MAX_HYPERPLANES:
            raise ValueError(
                f"TemdeConfig.n_hyperplanes={h} (sketch_width 2^{h}) is above the maximum of {MAX_HYPERPLANES}: "
                f"each sketch has 2^H buckets and the embedding holds n_sketches·2^H of them per item. Use "
                f"n_hyperplanes <= {MAX_HYPERPLANES} (sketch_width <= {2**MAX_HYPERPLANES})."
            )
        self.n_hyperplanes, self.sketch_width = h, k

    def _validate_temde(self) -> None:
        POOLING_HEADS.check(self.pooling)
        _check_choice("sketch_fusion", self.sketch_fusion, FUSION_CHOICES)
        SKETCH_CODERS.check(self.sketch_coder)
        _check_choice("sketch_kernel", self.sketch_kernel, KERNEL_CHOICES)
        ALIGNMENT_AGGREGATIONS.check(self.alignment_aggregation)
        for field in ("projection_dim", "n_sketches", "sketch_chunk_size", "attention_pooling_heads"):
            _check_positive(field, getattr(self, field), integer=True)
        for field in ("itm_layers", "itm_heads"):
            _check_positive(field, getattr(self, field), integer=True)
        for field in ("sketch_temperature", "initializer_range"):
            _check_positive(field, getattr(self, field))
        _check_positive("sketch_weight", self.sketch_weight, allow_zero=True)
        scale = self.logit_scale_init_value
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ValueError(f"TemdeConfig.logit_scale_init_value={scale!r} must be a finite number.")
        self._check_summary_tokens()
        self._check_feature_layers()
        if self.pooling == "attention" and self.projection_dim % self.attention_pooling_heads:
            raise ValueError(
                f"TemdeConfig.projection_dim={self.projection_dim} must be divisible by "
                f"attention_pooling_heads={self.attention_pooling_heads} for pooling='attention'."
            )
        if self.itm_hidden_size is not None:
            _check_positive("itm_hidden_size", self.itm_hidden_size, integer=True)
        itm_width = self.itm_hidden_size or self.projection_dim
        if itm_width % self.itm_heads:
            raise ValueError(
                f"TemdeConfig: the matching head's width {itm_width} (itm_hidden_size, else projection_dim) must "
                f"be divisible by itm_heads={self.itm_heads}."
            )

    def _check_feature_layers(self) -> None:
        """`sketch_vision_feature_layers`: `None`, or a non-empty list of distinct integers (one integer is
        taken as a list of one, as LLaVA's `vision_feature_layer`); the range is checked by the model,
        which knows how many hidden states its tower has."""
        layers = self.sketch_vision_feature_layers
        if layers is None:
            return
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        ok = isinstance(layers, (list, tuple)) and len(layers) > 0
        ok = ok and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        if not ok or len(set(layers)) != len(layers):
            raise ValueError(
                f"TemdeConfig.sketch_vision_feature_layers={self.sketch_vision_feature_layers!r} must be None or "
                "a non-empty list of distinct integers (indices into the vision tower's hidden_states)."
            )
        if self.sketch_fusion == "none":
            raise ValueError(
                "TemdeConfig.sketch_vision_feature_layers feeds extra image tokens to the sketch, but "
                "sketch_fusion='none' has no sketch: drop sketch_vision_feature_layers or use a sketch fusion."
            )
        self.sketch_vision_feature_layers = list(layers)

    def _check_summary_tokens(self) -> None:
        """Refuse a head that reads the first token (`cls`, or `pooler` without a pooled output) of a tower
        whose first token summarises nothing (see `NO_SUMMARY_TOKEN`)."""
        for side in ("vision", "text"):
            tower = getattr(self, f"{side}_config")
            model_type = getattr(tower, "model_type", None)
            reason = NO_SUMMARY_TOKEN.get(model_type)
            # A SigLIP vision tower without its attention-pooling head returns no pooled output, so the
            # `pooler` head would fall back to the first patch.
            headless = model_type in ("siglip_vision_model", "siglip2_vision_model") and not getattr(
                tower, "vision_use_head", True
            )
            if reason and (self.pooling == "cls" or (self.pooling == "pooler" and headless)):
                fix = "'mean', 'attention'" + (
                    "" if headless else " or 'pooler' (the tower's own pooled output)"
                )
                raise ValueError(
                    f"TemdeConfig.pooling={self.pooling!r} reads the first token of the {side} tower "
                    f"({model_type}), but {reason}; use pooling={fix}."
                )

    @property
    def embed_dim(self) -> int:
        """E, the size of `image_embeds` / `text_embeds` (what a retrieval index stores)."""
        if self.sketch_fusion == "concat":
            return self.projection_dim + self.n_sketches * self.sketch_width
        return self.projection_dim

    @classmethod
    def from_vision_text_configs(
        cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs: Any
    ) -> TemdeConfig:
        """Build a config from two tower configs plus any T-EMDE overrides."""
        return cls(vision_config=vision_config, text_config=text_config, **kwargs)


__all__ = ["TemdeConfig"]
