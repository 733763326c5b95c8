"""Soft-DLSH histograms without per-token N×K intermediates: the bucket distribution in two halves.

A soft-DLSH bucket probability is a product of one factor per hyperplane,
`P(k|x) = Π_h p_h^bit_h(k) · (1 − p_h)^(1 − bit_h(k))` with `p_h = σ(z_h)`. Split the H bits into the
low `H1 = ⌊H/2⌋` and the high `H2 = H − H1`; with `k = j + 2^H1 · i`,

    P(k|x) = A(j|x) · B(i|x)      A over the 2^H1 low codes, B over the 2^H2 high codes

and the masked histogram of a token set is one small matrix product per (batch row, sketch):

    S[i, j] = Σ_l B[i, l] · m_l A[j, l] = (B (m·A)ᵀ)[i, j]      `(2^H2 × L) @ (L × 2^H1)`

Per token and sketch only `2^H1 + 2^H2` values exist (16 instead of 64 at H = 6), and each half is
built by doubling (`[q0, p0]`, then an outer product with `[q1, p1]`, ...): multiplies, no `exp` per
bucket. The backward is hand-written: with `G = ∂loss/∂S` as a `(2^H2, 2^H1)` matrix,

    X_A = m·A ⊙ (Gᵀ B),   X_B = B ⊙ (G (m·A))      (`X = A · ∂loss/∂A`, two more small products)

and, because `∂A/∂z_h = A · (bit_h − p_h)` for a hyperplane h of the low half,

    ∂loss/∂z_h = (1 − p_h) · Σ_{j: bit_h(j)=1} X_A[j] − p_h · Σ_{j: bit_h(j)=0} X_A[j]

(two sums, so no large terms cancel when a logit saturates); the same holds for the high half with X_B.
Both sums, for every hyperplane of a half at once, are one small product with a ±1 table of code bits.

Layout. Every per-token tensor is `(batch · n_sketches, ·, tokens)` with the tokens innermost, so each
elementwise step runs over long contiguous rows rather than over the 2–8 codes of one token. Reading
the logits is a row copy, and their gradient goes back without a gather, when the projection writes
`zᵀ` with the tokens innermost (`SoftDLSHCoder.tempered_logits` does); any other layout is read
correctly, only more slowly.

This is the PyTorch path of `TemdeSketch` (its default on CPU); the log-space path that materialises
every bucket (`TemdeSketch.reference_histogram`) is its oracle in the tests.
"""

from __future__ import annotations

import torch


def _bit_factors(z: torch.Tensor) -> torch.Tensor:
    """Logits `(B, L, N, H)` -> factors `(B·N, H, 2, L)` = `[σ(−z_h), σ(z_h)]`, float32 (float64 kept).

    Both entries are sigmoids (not `1 − p`), so a saturated logit keeps a tiny but exact `1 − p`, as
    the log-space oracle does.
    """
    batch, tokens, n_sketches, n_hyperplanes = z.shape
    dtype = torch.promote_types(z.dtype, torch.float32)
    factors = torch.empty(batch, n_sketches, n_hyperplanes, 2, tokens, dtype=dtype, device=z.device)
    # (B, N, H, L): rows of L contiguous tokens when z holds `zᵀ` (as `tempered_logits` writes it).
    factors[:, :, :, 1].copy_(z.permute(0, 2, 3, 1))  # (also the cast to float32)
    torch.neg(factors[:, :, :, 1], out=factors[:, :, :, 0])
    return factors.sigmoid_().view(batch * n_sketches, n_hyperplanes, 2, tokens)


def _half_probs(factors: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """Bucket probabilities of one half of the bits, by doubling.

    Args:
        factors: `(X, h, 2, L)` the half's `[σ(−z), σ(z)]`, lowest bit first.
        first: `(X, 1, L)` token weights folded into the first factor (cheaper than scaling the result).

    Returns:
        `(X, 2**h, L)` with code `c = Σ_h bit_h 2^h`; a half of 0 bits is the single code 0 of
        probability 1 (times `first`).
    """
    n_bits = factors.shape[1]
    if n_bits == 0:
        ones = factors.new_ones(factors.shape[0], 1, factors.shape[-1])
        return ones if first is None else ones * first
    probs = factors[:, 0] if first is None else factors[:, 0] * first  # (X, 2, L)
    for h in range(1, n_bits):
        # (X, 2, 1, L) * (X, 1, 2^h, L) -> (X, 2, 2^h, L): the new bit h is the most significant.
        probs = (factors[:, h, :, None] * probs[:, None]).flatten(1, 2)
    return probs


def _bit_table(n_bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`(2 * n_bits, 2**n_bits)`: row `2h` is 1 where bit h of the code is set, row `2h + 1` is −1 where
    it is clear, so `table @ X` gives `[Σ_{bit=1} X, −Σ_{bit=0} X]` for every bit at once."""
    codes = torch.arange(2**n_bits, device=device)
    bits = ((codes[None, :] >> torch.arange(n_bits, device=device)[:, None]) & 1).to(dtype)  # (h, 2^h)
    return torch.stack([bits, bits - 1], dim=1).reshape(2 * n_bits, 2**n_bits)


class FactoredSoftDLSH(torch.autograd.Function):
    """`S[b, n, k] = Σ_l mask[b, l] · P_n(k | z[b, l, n])` with a hand-written backward (module doc).

    Saves the factors (`2H`) and the two halves (`2^H1 + 2^H2` values) per token and sketch, never the
    `2^H` bucket probabilities. The mask is data: it receives no gradient.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """`z` `(B, L, N, H)` tempered logits, `mask` `(B, L)` -> histogram `(B, N, 2**H)`."""
        batch, tokens, n_sketches, n_hyperplanes = z.shape
        low = n_hyperplanes // 2
        factors = _bit_factors(z)  # (B·N, H, 2, L)
        weights = mask.to(factors.dtype)[:, None, None, :].expand(batch, n_sketches, 1, tokens)
        masked_a = _half_probs(factors[:, :low], weights.reshape(batch * n_sketches, 1, tokens))
        high_b = _half_probs(factors[:, low:])  # (B·N, 2^H2, L)
        # (B·N, 2^H2, L) @ (B·N, L, 2^H1): flattened, index i·2^H1 + j is the bucket k.
        hist = torch.bmm(high_b, masked_a.transpose(1, 2))
        ctx.save_for_backward(factors, masked_a, high_b)
        ctx.shape = z.shape
        ctx.z_dtype = z.dtype
        return hist.view(batch, n_sketches, 2**n_hyperplanes)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """`grad` `(B, N, 2**H)` -> (`grad_z` `(B, L, N, H)`, None)."""
        factors, masked_a, high_b = ctx.saved_tensors
        batch, tokens, n_sketches, n_hyperplanes = ctx.shape
        low = n_hyperplanes // 2
        g = grad.to(factors.dtype).reshape(batch * n_sketches, high_b.shape[1], masked_a.shape[1])
        x_a = torch.bmm(g.transpose(1, 2), high_b).mul_(masked_a)  # (B·N, 2^H1, L)
        x_b = torch.bmm(g, masked_a).mul_(high_b)  # (B·N, 2^H2, L)
        factors = factors.view(batch, n_sketches, n_hyperplanes, 2, tokens)
        q, p = factors[:, :, :, 0], factors[:, :, :, 1]  # σ(−z), σ(z): (B, N, H, L)
        # Stored as (N, H, B, L), the layout of the `zᵀ` logits, so their gradient needs no gather.
        grad_z = factors.new_empty(n_sketches, n_hyperplanes, batch, tokens).permute(2, 0, 1, 3)
        for terms, bits in ((x_a, slice(0, low)), (x_b, slice(low, n_hyperplanes))):
            n_bits = bits.stop - bits.start
            # Per hyperplane of this half: [Σ_{bit=1} X, −Σ_{bit=0} X], (B, N, h, 2, L).
            sums = torch.matmul(_bit_table(n_bits, terms.dtype, terms.device), terms)
            sums = sums.view(batch, n_sketches, n_bits, 2, tokens)
            # (1 − p)·on − p·off
            torch.addcmul(
                q[:, :, bits] * sums[:, :, :, 0], p[:, :, bits], sums[:, :, :, 1], out=grad_z[:, :, bits]
            )
        grad_z = grad_z.permute(0, 3, 1, 2)  # (B, N, H, L) -> the logical (B, L, N, H)
        return grad_z.to(ctx.z_dtype), None


def factored_soft_dlsh_histogram(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft-DLSH histogram `S[b, n, k] = Σ_l mask[b, l] · P_n(k | x_l)` through the two-half product.

    Args:
        z: `(batch, tokens, n_sketches, n_hyperplanes)` hyperplane logits already divided by τ; any
            float dtype (computed in float32, or float64 for float64 input), fastest with the tokens
            innermost in memory (as `SoftDLSHCoder.tempered_logits` returns them).
        mask: `(batch, tokens)` token weights (1 real, 0 padding; any numeric dtype). No gradient flows
            to it.

    Returns:
        `(batch, n_sketches, 2**n_hyperplanes)`, float32 (float64 for float64 `z`).

    Raises:
        ValueError: On mismatched shapes or a mask that requires a gradient.
    """
    if z.dim() != 4 or mask.shape != z.shape[:2]:
        raise ValueError(
            f"factored_soft_dlsh_histogram: z must be (batch, tokens, n_sketches, n_hyperplanes) and mask "
            f"(batch, tokens); got z {tuple(z.shape)} and mask {tuple(mask.shape)}."
        )
    if mask.requires_grad:
        raise ValueError(
            "factored_soft_dlsh_histogram: the mask requires a gradient, which this path does not give; "
            "detach it, or use sketch_kernel='reference' for gradients with respect to token weights."
        )
    return FactoredSoftDLSH.apply(z, mask)


__all__ = ["FactoredSoftDLSH", "factored_soft_dlsh_histogram"]
