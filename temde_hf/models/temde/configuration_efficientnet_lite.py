"""Configuration of EfficientNet-Lite, the mobile variant of EfficientNet used as a vision tower.

Why not transformers' own ``EfficientNetConfig``: its blocks always contain a squeeze-and-excitation
layer (there is no switch to drop it), its stem and head widths are always scaled by
``width_coefficient`` and its padding scheme is fixed per block. EfficientNet-Lite removes
squeeze-and-excitation, uses ReLU6 everywhere, keeps the stem (32 channels) and head (1280 channels)
fixed and keeps the first and last stage at their base depth, so it cannot be expressed by that config;
this small port describes it instead.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from transformers import PreTrainedConfig

# Stage layout of EfficientNet-B0 / Lite0 (seven stages of MBConv blocks).
_KERNEL_SIZES = (3, 3, 5, 3, 5, 5, 3)
_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_EXPAND_RATIOS = (1, 6, 6, 6, 6, 6, 6)
_OUT_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
_NUM_BLOCK_REPEATS = (1, 2, 2, 3, 3, 4, 1)

_ACTIVATIONS = ("relu6", "relu", "swish", "silu")


class EfficientNetLiteConfig(PreTrainedConfig):
    r"""Architecture of an EfficientNet-Lite image encoder (defaults: EfficientNet-Lite0, 224 px).

    Args:
        num_channels (`int`, defaults to 3): Channels of the input image.
        image_size (`int`, defaults to 224): Resolution the weights were trained at (the model itself
            accepts any size; the token count is `ceil(image_size / 32) ** 2`).
        width_coefficient (`float`, defaults to 1.0): Scales the channels of every stage (not stem/head).
        depth_coefficient (`float`, defaults to 1.0): Scales the repeats of the middle stages.
        depth_divisor (`int`, defaults to 8): Scaled channel counts are rounded to multiples of this.
        stem_channels (`int`, defaults to 32): Output channels of the stem convolution (never scaled).
        kernel_sizes (`tuple[int, ...]`): Depthwise kernel size of each stage.
        strides (`tuple[int, ...]`): Stride of the first block of each stage.
        expand_ratios (`tuple[int, ...]`): Inverted-bottleneck expansion of each stage.
        out_channels (`tuple[int, ...]`): Base output channels of each stage (before width scaling).
        num_block_repeats (`tuple[int, ...]`): Base number of blocks of each stage.
        hidden_dim (`int`, defaults to 1280): Channels of the head convolution, i.e. the feature (token)
            size; also readable as `hidden_size`.
        hidden_act (`str`, defaults to `"relu6"`): Activation after every batch norm except projections.
        batch_norm_eps (`float`, defaults to 1e-3): Batch-norm epsilon.
        batch_norm_momentum (`float`, defaults to 0.99): Batch-norm decay in the TensorFlow convention
            (moving average keeps this share); PyTorch's `momentum` is `1 - batch_norm_momentum`.
        dropout_rate (`float`, defaults to 0.2): Dropout before the classifier.
        drop_connect_rate (`float`, defaults to 0.2): Stochastic-depth rate of the last block; block `i`
            of `n` drops its residual branch with probability `drop_connect_rate * i / n` in training.
        initializer_range (`float`, defaults to 0.02): Unused by the convolutions (He init); kept for
            generic code that reads it.

    `num_labels` defaults to 1000 (the ImageNet classes of the pretrained weights).
    """

    model_type = "efficientnet_lite"
    attribute_map: ClassVar[dict[str, str]] = {"hidden_size": "hidden_dim"}

    num_channels: int = 3
    image_size: int = 224
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    depth_divisor: int = 8
    stem_channels: int = 32
    kernel_sizes: list[int] | tuple[int, ...] = _KERNEL_SIZES
    strides: list[int] | tuple[int, ...] = _STRIDES
    expand_ratios: list[int] | tuple[int, ...] = _EXPAND_RATIOS
    out_channels: list[int] | tuple[int, ...] = _OUT_CHANNELS
    num_block_repeats: list[int] | tuple[int, ...] = _NUM_BLOCK_REPEATS
    hidden_dim: int = 1280
    hidden_act: str = "relu6"
    batch_norm_eps: float = 1e-3
    batch_norm_momentum: float = 0.99
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        # The pretrained head classifies ImageNet; without this the base class would default to 2 labels.
        if self.id2label is None:
            kwargs.setdefault("num_labels", 1000)
        super().__post_init__(**kwargs)
        # JSON turns tuples into lists; keep one type so configs compare equal after a round-trip.
        for name in ("kernel_sizes", "strides", "expand_ratios", "out_channels", "num_block_repeats"):
            setattr(self, name, [int(v) for v in getattr(self, name)])
        self._check()

    def _check(self) -> None:
        """Raises `ValueError` naming the first invalid field."""
        n_stages = len(self.out_channels)
        if n_stages == 0:
            raise ValueError("EfficientNetLiteConfig.out_channels must list at least one stage")
        for name in ("kernel_sizes", "strides", "expand_ratios", "num_block_repeats"):
            values = getattr(self, name)
            if len(values) != n_stages:
                raise ValueError(
                    f"EfficientNetLiteConfig.{name} has {len(values)} entries but out_channels has "
                    f"{n_stages}: give one value per stage"
                )
            if any(v < 1 for v in values):
                raise ValueError(f"EfficientNetLiteConfig.{name} must be positive integers, got {values}")
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"EfficientNetLiteConfig.kernel_sizes must be odd, got {self.kernel_sizes}")
        for name in ("num_channels", "image_size", "depth_divisor", "stem_channels", "hidden_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EfficientNetLiteConfig.{name} must be >= 1, got {getattr(self, name)}")
        if any(c < 1 for c in self.out_channels):
            raise ValueError(f"EfficientNetLiteConfig.out_channels must be positive, got {self.out_channels}")
        for name in ("width_coefficient", "depth_coefficient"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"EfficientNetLiteConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("dropout_rate", "drop_connect_rate", "batch_norm_momentum"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(
                    f"EfficientNetLiteConfig.{name} must be in [0, 1), got {getattr(self, name)}"
                )
        if not float(self.batch_norm_eps) > 0:
            raise ValueError(f"EfficientNetLiteConfig.batch_norm_eps must be > 0, got {self.batch_norm_eps}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"EfficientNetLiteConfig.hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}"
            )

    def round_channels(self, channels: int) -> int:
        """Scales a stage's channel count by `width_coefficient`, rounded to `depth_divisor`.

        Rounds to the nearest multiple but never loses more than 10% (the EfficientNet rule). At width
        1.0 the count is kept as given, so tiny test configs may use any channel count.
        """
        if self.width_coefficient == 1.0:
            return int(channels)
        divisor = self.depth_divisor
        scaled = channels * self.width_coefficient
        rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        if rounded < 0.9 * scaled:
            rounded += divisor
        return int(rounded)

    def stage_repeats(self, stage: int) -> int:
        """Number of blocks of `stage`: Lite keeps the first and last stage at their base depth."""
        base = self.num_block_repeats[stage]
        if stage in (0, len(self.num_block_repeats) - 1):
            return int(base)
        return math.ceil(self.depth_coefficient * base)

    @property
    def num_blocks(self) -> int:
        """Total number of MBConv blocks over all stages."""
        return sum(self.stage_repeats(i) for i in range(len(self.num_block_repeats)))


__all__ = ["EfficientNetLiteConfig"]
