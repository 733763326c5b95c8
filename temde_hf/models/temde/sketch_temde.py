"""The T-EMDE sketch: a set of token features -> N soft histograms over K buckets.

Each coder maps a token `x` (D,) to N bucket distributions `P_n(·|x)` over K buckets; the sketch of a
token set is the masked sum of those distributions (linear in the number of tokens), each of its N rows
then L2-normalised as EMDE does for network inputs. One sketch module is shared by both modalities, so
images and captions land in the same sketch space.

A coder is a `SketchCoder` subclass under `@SKETCH_CODERS.register(name)`; `SketchCoder` writes down
what the sketch, the model's `_init_weights` and the trainer's data-dependent initialisation call, and
the capabilities (`supports_triton`, `width_is_power_of_two`) the config and the sketch read from the
class instead of from the coder's name.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init

from .factored_sketch_temde import factored_soft_dlsh_histogram
from .registry_temde import Registry

if TYPE_CHECKING:  # the config validates `sketch_coder` against SKETCH_CODERS, so it imports this module
    from .configuration_temde import TemdeConfig

# A coder maps tokens to N bucket distributions; built from the config, `@SKETCH_CODERS.register(name)`.
SKETCH_CODERS = Registry("sketch_coder", "SKETCH_CODERS")

# τ is kept inside these bounds: below, the sigmoids saturate to exact 0/1 in float32 and gradients die;
# above, every bucket gets the same mass and the sketch carries no information.
_MIN_TEMPERATURE, _MAX_TEMPERATURE = 1e-4, 1e2


def bucket_bits(n_hyperplanes: int, device: torch.device | None = None) -> torch.Tensor:
    """The code of every bucket: `bits[k, h] = (k >> h) & 1`, shape `(2**H, H)`, float32."""
    k = torch.arange(2**n_hyperplanes, device=device)
    h = torch.arange(n_hyperplanes, device=device)
    return ((k[:, None] >> h[None, :]) & 1).float()


def soft_dlsh_log_probs(z: torch.Tensor) -> torch.Tensor:
    """Log bucket probabilities from hyperplane logits.

    `log P(k|x) = Σ_h bit_h(k)·log σ(z_h) + (1 − bit_h(k))·log σ(−z_h)`, computed in log space so that
    small temperatures do not underflow.

    Args:
        z: `(..., N, H)` tempered hyperplane logits `(w·x − t) / τ`.

    Returns:
        `(..., N, 2**H)` log-probabilities; `exp` sums to 1 over the last dim.
    """
    bits = bucket_bits(z.shape[-1], z.device).to(z.dtype)  # (K, H)
    # (..., N, H) x (K, H) -> (..., N, K): each bucket picks log σ(z) or log σ(−z) per hyperplane.
    return F.logsigmoid(z) @ bits.T + F.logsigmoid(-z) @ (1 - bits).T


class SketchCoder(nn.Module, metaclass=abc.ABCMeta):
    """Base class of the sketch coders: token features -> N bucket distributions over K buckets each.

    Shapes: D = `config.projection_dim`, N = `config.n_sketches`, K = `config.sketch_width`, H =
    `config.n_hyperplanes`. A coder is built as `coder_class(config)`, so its parameter shapes come from the
    config alone (the model is rebuilt from its config on load, then the saved tensors are restored).

    What a subclass implements:

    - `log_probs(x, temperature)`: the definition of the coder, `(..., D)` -> `(..., N, K)`.
    - `reset_parameters()`: the data-independent initialisation. `__init__` runs it and the model's
      `_init_weights` calls it for every coder, so write it with `transformers.initialization` (whose
      functions leave alone a tensor already loaded from a checkpoint).
    - `initialize(x, generator)`: the data-dependent initialisation from token features `(M, D)`, run by
      the trainer before the first step (`TemdeSketch.initialize`).

    What it may override:

    - `histogram(tokens, mask, temperature, chunk_size)`: a faster path to the same sums; the default is
      `reference_histogram`, which every path is tested against.
    - `hard_buckets(x)`: hard codes `(..., D)` -> `(..., N)` (the τ → 0 limit), for analysis.

    Capabilities, declared on the class:

    - `width_is_power_of_two`: K is 2^H (the coder splits each sketch by H binary tests); the config
      then derives whichever of `n_hyperplanes` / `sketch_width` is missing and refuses a mismatch.
      Otherwise K is `sketch_width` (default 2^H, H = 6).
    - `supports_triton`: `tempered_logits(x, temperature)` returns hyperplane logits `(..., N, H)` with
      `P(k|x) = Π_h σ(z_h)^bit_h(k) σ(−z_h)^(1 − bit_h(k))`, the form the fused Triton kernel of
      `triton_sketch_temde` sums; `sketch_kernel="auto"` then uses it on CUDA.
    """

    width_is_power_of_two: ClassVar[bool] = False
    supports_triton: ClassVar[bool] = False

    def __init__(self, config: TemdeConfig) -> None:
        super().__init__()
        self.n_sketches, self.sketch_width = config.n_sketches, config.sketch_width

    @abc.abstractmethod
    def log_probs(self, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Log bucket probabilities.

        Args:
            x: `(..., D)` token features.
            temperature: `(1,)` τ of the soft assignment.

        Returns:
            `(..., N, K)`; `exp` sums to 1 over the last dim.
        """

    @abc.abstractmethod
    def reset_parameters(self) -> None:
        """Data-independent initialisation of the coder's parameters (see the class docstring)."""

    @abc.abstractmethod
    def initialize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent initialisation from token features `x` `(M, D)` of both modalities (M >= 2)."""

    def tempered_logits(self, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """`(..., D)` -> `(..., N, H)` tempered hyperplane logits; required when `supports_triton`."""
        raise NotImplementedError(f"{type(self).__name__} declares no Triton path (supports_triton=False)")

    def _log_space_chunk(
        self, x: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor
    ) -> torch.Tensor:
        """`x` `(B, C, D)`, `mask` `(B, C)` -> this chunk's masked bucket mass `(B, N, K)`."""
        probs = self.log_probs(x, temperature).float().exp()  # (B, C, N, K)
        return torch.einsum("bc,bcnk->bnk", mask.float(), probs)

    def reference_histogram(
        self, tokens: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        """The log-space oracle: every token's `(N, K)` bucket probabilities, exponentiated, then summed.

        Slow (it writes `B·L·N·K` values in forward and backward) but transparently correct; the fast
        paths are tested against it.

        Args:
            tokens: `(B, L, D)`.
            mask: `(B, L)` token weights (1 for real tokens, 0 for padding).
            temperature: `(1,)` τ.
            chunk_size: tokens per chunk (recomputed in backward while training).

        Returns:
            `(B, N, K)` float32.
        """
        return chunked_histogram(
            partial(self._log_space_chunk, temperature=temperature), tokens, mask, chunk_size
        )

    def histogram(
        self, tokens: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        """Soft histograms `(B, N, K)` float32 of tokens `(B, L, D)` with weights `mask` `(B, L)`: the
        coder's own PyTorch path (`sketch_kernel="torch"`); by default `reference_histogram`."""
        return self.reference_histogram(tokens, mask, temperature, chunk_size)

    def hard_buckets(self, x: torch.Tensor) -> torch.Tensor:
        """Hard codes `(..., D)` -> bucket ids `(..., N)` in `[0, K)`: by default the most likely bucket."""
        return self.log_probs(x, torch.ones(1, device=x.device)).argmax(-1)


@SKETCH_CODERS.register("soft_dlsh")
class SoftDLSHCoder(SketchCoder):
    """Coder A: H learned hyperplanes per sketch, `P_n(k|x) = Π_h p_h^bit_h(k) (1 − p_h)^(1 − bit_h(k))`.

    With the data-dependent initialisation (`initialize`) each threshold is the median of its
    projection, so every hyperplane halves the data, as in density-dependent LSH.
    """

    width_is_power_of_two = True
    supports_triton = True

    def __init__(self, config: TemdeConfig) -> None:
        super().__init__(config)
        dim, n_sketches, n_hyperplanes = config.projection_dim, config.n_sketches, config.n_hyperplanes
        self.n_hyperplanes = n_hyperplanes
        self.weight = nn.Parameter(torch.empty(dim, n_sketches * n_hyperplanes))  # hyperplane normals
        self.threshold = nn.Parameter(torch.zeros(n_sketches * n_hyperplanes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Unit-variance projections for unit-variance inputs: (w·x) ~ N(0, 1), so τ = 1 is a soft cut.
        init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.shape[0]))
        init.zeros_(self.threshold)

    def hyperplane_logits(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., D)` -> untempered `w·x − t` of shape `(..., N, H)`."""
        z = x @ self.weight.to(x.dtype) - self.threshold.to(x.dtype)
        return z.unflatten(-1, (self.n_sketches, self.n_hyperplanes))

    def log_probs(self, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """`(..., D)` -> `(..., N, K)` log bucket probabilities."""
        return soft_dlsh_log_probs(self.hyperplane_logits(x) / temperature)

    def tempered_logits(self, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """`(..., D)` -> `(w·x − t) / τ` of shape `(..., N, H)`, in `x`'s dtype.

        One fused matmul (τ folded into the `(D, N·H)` weights, the threshold as its bias) that writes
        `zᵀ` `(N·H, tokens)`: the returned tensor is a view with the tokens innermost, the layout the
        factored histogram reads fastest (and hands its gradient back in).
        """
        weight = (self.weight / temperature).to(x.dtype)
        bias = -(self.threshold / temperature).to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])  # (M, D)
        z_t = torch.addmm(bias[:, None], weight.T, flat.T)  # (N·H, M)
        z_t = z_t.view(self.n_sketches, self.n_hyperplanes, *x.shape[:-1])
        return torch.movedim(z_t, (0, 1), (-2, -1))  # (..., N, H), a view

    def histogram(
        self, tokens: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        """Soft histograms `(B, N, K)` of tokens `(B, L, D)` with weights `mask` `(B, L)`.

        One projection over all tokens, then the two-half product of `factored_sketch_temde`.
        `chunk_size` is not used: what this path saves for backward is `2H + 2^⌊H/2⌋ + 2^⌈H/2⌉` floats
        per token and sketch (28 at H = 6, fewer than the `2^H` a materialising path holds per token of
        one chunk), and recomputing chunks in backward measured about a third slower at 197 tokens.
        """
        z = self.tempered_logits(tokens, temperature)  # (B, L, N, H), tokens innermost in memory
        return factored_soft_dlsh_histogram(z, mask)

    def hard_buckets(self, x: torch.Tensor) -> torch.Tensor:
        """Hard DLSH codes (the τ → 0 limit): `(..., D)` -> bucket ids `(..., N)` in `[0, 2**H)`."""
        bits = (self.hyperplane_logits(x) > 0).long()  # (..., N, H)
        return (bits << torch.arange(self.n_hyperplanes, device=x.device)).sum(-1)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """DLSH initialisation from token features `x` of shape `(M, D)`.

        Normals are Gaussian, rescaled so each projection has unit spread over the data (τ then has
        the same meaning for every hyperplane); thresholds are the medians of the projections.
        """
        x = x.float()
        w = torch.randn(self.weight.shape, generator=generator, device="cpu").to(x.device)
        proj = x @ w  # (M, N·H)
        scale = proj.std(dim=0).clamp_min(1e-6)
        self.weight.copy_(w / scale)
        self.threshold.copy_(proj.median(dim=0).values / scale)


@SKETCH_CODERS.register("anchor")
class AnchorCoder(SketchCoder):
    """Coder B: `P_n(k|x) = softmax_k((a_nk·x + c_nk) / τ)` over K learned anchors per sketch.

    Initialised from data as a soft nearest-anchor assignment: anchors are data tokens and
    `c = −½‖a‖²`, so the logit is `−½‖x − a‖²` up to a term constant in k.
    """

    def __init__(self, config: TemdeConfig) -> None:
        super().__init__(config)
        dim, n_sketches, sketch_width = config.projection_dim, config.n_sketches, config.sketch_width
        self.weight = nn.Parameter(torch.empty(dim, n_sketches * sketch_width))
        self.bias = nn.Parameter(torch.zeros(n_sketches * sketch_width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.shape[0]))
        init.zeros_(self.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., D)` -> untempered anchor scores `(..., N, K)`."""
        scores = x @ self.weight.to(x.dtype) + self.bias.to(x.dtype)
        return scores.unflatten(-1, (self.n_sketches, self.sketch_width))

    def log_probs(self, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.logits(x) / temperature, dim=-1)

    def tempered_logits(self, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """`(..., D)` -> `(a·x + c) / τ` of shape `(..., N, K)`; τ folded into the weights (one matmul)."""
        weight = (self.weight / temperature).to(x.dtype)
        bias = (self.bias / temperature).to(x.dtype)
        return F.linear(x, weight.T, bias).unflatten(-1, (self.n_sketches, self.sketch_width))

    def _chunk_histogram(
        self, tokens: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor
    ) -> torch.Tensor:
        """`(B, C, D)`, `(B, C)` -> `(B, N, K)`: softmax in float32, then the masked sum as one bmm."""
        probs = self.tempered_logits(tokens, temperature).float().softmax(-1)  # (B, C, N, K)
        # (B, 1, C) @ (B, C, N·K): the sum over tokens without an (B, C, N, K) product.
        summed = torch.bmm(mask.to(probs.dtype)[:, None, :], probs.flatten(2))
        return summed.view(tokens.shape[0], self.n_sketches, self.sketch_width)

    def histogram(
        self, tokens: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        """Soft histograms `(B, N, K)` of tokens `(B, L, D)` with weights `mask` `(B, L)`.

        Every anchor score is a matmul output, so the `(B, L, N, K)` logits cannot be avoided; chunks of
        `chunk_size` tokens (recomputed in backward) bound their memory, as in the reference path.
        """
        return chunked_histogram(
            partial(self._chunk_histogram, temperature=temperature), tokens, mask, chunk_size
        )

    def hard_buckets(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest anchor per sketch: `(..., D)` -> `(..., N)`."""
        return self.logits(x).argmax(-1)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Anchors = random data tokens `x` `(M, D)`, scaled so the logits have unit spread."""
        x = x.float()
        n_anchors = self.n_sketches * self.sketch_width
        # Distinct tokens where there are enough: duplicate anchors would tie and split their bucket mass.
        if x.shape[0] >= n_anchors:
            idx = torch.randperm(x.shape[0], generator=generator, device="cpu")[:n_anchors]
        else:
            idx = torch.randint(0, x.shape[0], (n_anchors,), generator=generator, device="cpu")
        idx = idx.to(x.device)
        anchors = x[idx].T  # (D, N·K)
        bias = -0.5 * anchors.pow(2).sum(0)
        scale = (x @ anchors + bias).std(dim=0).clamp_min(1e-6)
        self.weight.copy_(anchors / scale)
        self.bias.copy_(bias / scale)


def chunked_histogram(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """`Σ_chunks fn(inputs[:, chunk], mask[:, chunk])` over chunks of `chunk_size` tokens.

    While training with more than one chunk, each chunk is recomputed in backward instead of keeping its
    intermediates alive (memory per chunk, not per token set).

    Args:
        fn: `(inputs (B, C, ...), mask (B, C))` -> that chunk's histogram `(B, N, K)`.
        inputs: `(B, L, ...)`, chunked along dim 1.
        mask: `(B, L)` token weights.
        chunk_size: tokens per chunk.
    """
    tokens = inputs.shape[1]
    recompute = torch.is_grad_enabled() and tokens > chunk_size
    total = None
    for start in range(0, max(tokens, 1), chunk_size):
        args = (inputs[:, start : start + chunk_size], mask[:, start : start + chunk_size])
        part = checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)
        total = part if total is None else total + part
    return total


class TemdeSketch(nn.Module):
    """Token set -> row-L2-normalised sketch `(batch, n_sketches, sketch_width)`, shared by both modalities."""

    def __init__(self, config: TemdeConfig) -> None:
        super().__init__()
        self.config = config
        self.n_sketches, self.sketch_width = config.n_sketches, config.sketch_width
        self.coder: SketchCoder = SKETCH_CODERS[config.sketch_coder](config)
        log_tau = torch.full((1,), math.log(config.sketch_temperature))  # (1,): FSDP2 shards no 0-dim
        if config.learn_sketch_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:  # persistent: v5 builds models on the meta device and only restores saved tensors
            self.register_buffer("log_temperature", log_tau, persistent=True)
        # Whether `initialize` ran (saved with the checkpoint, so a loaded model is not re-initialised).
        self.register_buffer("initialized", torch.tensor(False), persistent=True)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(_MIN_TEMPERATURE, _MAX_TEMPERATURE)

    def reference_histogram(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The coder's log-space oracle (`SketchCoder.reference_histogram`), selected in the model by
        `sketch_kernel="reference"`.

        Args:
            tokens: `(batch, tokens, dim)`.
            mask: `(batch, tokens)`, 1 for real tokens and 0 for padding (default: all real).

        Returns:
            `(batch, n_sketches, sketch_width)` float32.
        """
        if mask is None:
            mask = tokens.new_ones(tokens.shape[:2])
        return self.coder.reference_histogram(tokens, mask, self.temperature, self.config.sketch_chunk_size)

    def histogram(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised soft histograms `S_n(X) = Σ_i m_i · P_n(·|x_i)`.

        `sketch_kernel` picks the path: the fused Triton kernel (`"triton"`, or `"auto"` on CUDA, for a coder
        with `supports_triton`), the
        coder's own PyTorch path (`"torch"`, or `"auto"` elsewhere: for `soft_dlsh` the two-half product
        of `factored_sketch_temde`), or the log-space oracle (`"reference"`).

        Args:
            tokens: `(batch, tokens, dim)` token features in the joint space.
            mask: `(batch, tokens)`, 1 for real tokens and 0 for padding (default: all real).

        Returns:
            `(batch, n_sketches, sketch_width)` float32; each row sums to the number of valid tokens.
        """
        if mask is None:
            mask = tokens.new_ones(tokens.shape[:2])
        if self.config.sketch_kernel == "reference":
            return self.reference_histogram(tokens, mask)
        temperature = self.temperature
        if self._use_triton(tokens):
            from .triton_sketch_temde import soft_dlsh_histogram

            z = self.coder.tempered_logits(tokens, temperature)  # (B, L, N, H)
            # "triton" means the kernel or an error, never a silent fallback to PyTorch.
            backend = "triton" if self.config.sketch_kernel == "triton" else "auto"
            return soft_dlsh_histogram(z, mask, backend=backend)
        return self.coder.histogram(tokens, mask, temperature, self.config.sketch_chunk_size)

    def _use_triton(self, tokens: torch.Tensor) -> bool:
        kernel = self.config.sketch_kernel
        if kernel in ("torch", "reference") or not self.coder.supports_triton:
            return False
        if kernel == "auto" and not tokens.is_cuda:
            return False
        try:
            from .triton_sketch_temde import HAS_TRITON
        except ImportError:
            HAS_TRITON = False
        if not HAS_TRITON and kernel == "triton":
            raise RuntimeError("sketch_kernel='triton' needs the `triton` package: pip install triton")
        return HAS_TRITON

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Row-normalised sketch `Ŝ = S / ‖S‖₂` (per sketch row).

        Args:
            tokens: `(batch, tokens, dim)`.
            mask: `(batch, tokens)` of 0/1 (or bool).

        Returns:
            `(batch, n_sketches, sketch_width)`, every row of unit L2 norm (zero rows stay zero).
        """
        return F.normalize(self.histogram(tokens, mask), dim=-1, eps=1e-12)

    @torch.no_grad()
    def initialize(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent (DLSH) initialisation from valid token features of both modalities.

        Args:
            tokens: `(M, dim)`, e.g. the unpadded tokens of a batch of images and a batch of captions.
        """
        if tokens.ndim != 2 or tokens.shape[-1] != self.config.projection_dim:
            raise ValueError(
                f"TemdeSketch.initialize expects token features of shape (M, {self.config.projection_dim}), "
                f"got {tuple(tokens.shape)}; pass the projected tokens with padding removed."
            )
        if tokens.shape[0] < 2:
            raise ValueError("TemdeSketch.initialize needs at least 2 token features to estimate medians.")
        self.coder.initialize(tokens, generator=generator)
        self.initialized.fill_(True)
