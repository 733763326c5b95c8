"""Fused `soft_dlsh` sketch histogram: a Triton kernel pair plus the PyTorch oracle.

The `soft_dlsh` coder turns hyperplane logits `z` `(batch, tokens, n_sketches, n_hyperplanes)` into a
soft histogram `S` `(batch, n_sketches, 2**n_hyperplanes)`:

    p_h = sigmoid(z_h),  P_n(k | x_i) = prod_h p_h^bit_h(k) (1 - p_h)^(1 - bit_h(k)),
    S[b, n, k] = sum_i mask[b, i] * P_n(k | x_i).

Materialising `P` costs `B*L*N*K` floats (the naive path is memory-bound). The kernels below never
write `P`: the H bits of a bucket split into a low half (`j`) and a high half (`i`), so
`P(k = j + K_lo * i) = P_lo(j) * P_hi(i)` and, summed over a tile of tokens,

    S[j, i] = sum_l m_l P_lo[l, j] P_hi[l, i] = (m * P_lo)^T @ P_hi

which is one small matrix product per token tile, accumulated in fp32 registers. The backward pass
recomputes `P_lo` / `P_hi` and uses `dP/dz_h = P * (bit_h(k) - p_h)`:

    grad_z[b, l, n, h] = m_l * sum_k G[b, n, k] P(k) (bit_h(k) - p_h)
                       = m_l * ((1 - p_h) * sum_{k: bit_h=1} G P  -  p_h * sum_{k: bit_h=0} G P)

(the second form avoids cancelling two large sums). With `G` as a `(K_lo, K_hi)` matrix,
`sum_k G P` restricted to a high bit needs `A = P_lo @ G` `(tile, K_hi)`, and to a low bit
`C = P_hi @ G^T` `(tile, K_lo)`: two more small matrix products per tile.

Triton is optional: this module imports without it and exposes `HAS_TRITON`. The kernels are
decorated lazily on first use, so setting `TRITON_INTERPRET=1` before the first call (not before the
import) runs them on CPU tensors through Triton's interpreter, which is how CI checks them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

try:  # Triton is an optional extra (`kernels`); the torch path works without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "MAX_TRITON_HYPERPLANES",
    "SoftDLSHHistogram",
    "soft_dlsh_histogram",
    "soft_dlsh_histogram_reference",
    "triton_interpret_enabled",
    "triton_supported",
]

# K = 2**H buckets; the kernel keeps a (2**ceil(H/2), 2**floor(H/2)) fp32 tile per program, so H <= 12
# keeps it at most 64 x 64 registers-worth. Larger H falls back to the torch path.
MAX_TRITON_HYPERPLANES = 12
_BLOCK_L = 64  # tokens per tile; >= 16 because it is the inner dimension of `tl.dot`
_MIN_DOT = 16  # smallest dimension `tl.dot` accepts on GPU


def soft_dlsh_histogram_reference(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft DLSH histogram in plain PyTorch (the correctness oracle and the CPU path).

    Materialises every token's bucket probabilities `(batch, tokens, n_sketches, 2**H)`.

    Args:
        z: Hyperplane logits `(batch, tokens, n_sketches, n_hyperplanes)`, already divided by the
            temperature.
        mask: Token weights `(batch, tokens)`, 1 for real tokens and 0 for padding.

    Returns:
        The histogram `(batch, n_sketches, 2**n_hyperplanes)` in float32.
    """
    _check_inputs(z, mask)
    n_hyperplanes = z.shape[-1]
    zf = z.float()
    p, q = torch.sigmoid(zf), torch.sigmoid(-zf)  # q = 1 - p, accurate for large z
    buckets = torch.arange(2**n_hyperplanes, device=z.device)
    probs = torch.ones(*z.shape[:-1], 2**n_hyperplanes, device=z.device)  # (B, L, N, K)
    for h in range(n_hyperplanes):
        bit = ((buckets >> h) & 1).bool()  # (K,)
        probs = probs * torch.where(bit, p[..., h : h + 1], q[..., h : h + 1])
    return torch.einsum("bl,blnk->bnk", mask.to(probs.dtype), probs)


def _check_inputs(z: torch.Tensor, mask: torch.Tensor) -> None:
    if z.dim() != 4:
        raise ValueError(f"z must be (batch, tokens, n_sketches, n_hyperplanes), got shape {tuple(z.shape)}")
    if mask.shape != z.shape[:2]:
        raise ValueError(
            f"mask must be (batch, tokens) = {tuple(z.shape[:2])} to match z, got {tuple(mask.shape)}"
        )


def triton_interpret_enabled() -> bool:
    """Whether Triton kernels run in interpreter mode (`TRITON_INTERPRET=1`, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# The kernel bodies below are plain functions, decorated by `_kernels()` on first use. They use only
# Triton *builtins* (no `tl.zeros` / `tl.sum` / `tl.sigmoid`, which are themselves JIT functions of
# the mode triton was imported in, and would refuse to run if the mode is switched afterwards).


def _bucket_half_src(
    z_ptr,
    row,
    in_l,
    offs_k,
    H: tl.constexpr,
    H_START: tl.constexpr,
    H_COUNT: tl.constexpr,
    K_COUNT: tl.constexpr,
):
    """Probabilities of the 2**H_COUNT codes of hyperplanes [H_START, H_START + H_COUNT).

    `row` `(BLOCK_L,)` indexes (b, l, n) rows of the contiguous `z`; returns `(BLOCK_L, K_PAD)` fp32
    with the padded columns (code >= K_COUNT) zero.
    """
    probs = tl.full((row.shape[0], offs_k.shape[0]), 1.0, tl.float32)
    for h in tl.static_range(H_COUNT):
        # One logit column per load: strided, but the row's H logits share a cache sector.
        z_h = tl.load(z_ptr + row * H + H_START + h, mask=in_l, other=0.0).to(tl.float32)
        p_h = 1.0 / (1.0 + tl.exp(-z_h))
        q_h = 1.0 / (1.0 + tl.exp(z_h))  # 1 - p_h without the cancellation for large z
        bit = (offs_k >> h) & 1
        probs = probs * tl.where(bit[None, :] == 1, p_h[:, None], q_h[:, None])
    return tl.where(offs_k[None, :] < K_COUNT, probs, 0.0)


def _fwd_kernel(
    z_ptr,
    m_ptr,
    s_ptr,
    L,
    N,
    H: tl.constexpr,
    H_PAD: tl.constexpr,
    H_LO: tl.constexpr,
    K_LO_PAD: tl.constexpr,
    K_HI_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One program per (batch b, sketch n): loop over token tiles, accumulate `S[b, n]` in registers."""
    b = tl.program_id(0)
    n = tl.program_id(1)
    offs_j = tl.arange(0, K_LO_PAD)  # low-bit code
    offs_i = tl.arange(0, K_HI_PAD)  # high-bit code
    k_lo: tl.constexpr = 1 << H_LO
    k_hi: tl.constexpr = 1 << (H - H_LO)
    acc = tl.full((K_LO_PAD, K_HI_PAD), 0.0, tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        in_l = offs_l < L
        row = (b * L + offs_l) * N + n  # z is contiguous (B, L, N, H)
        m = tl.load(m_ptr + b * L + offs_l, mask=in_l, other=0.0)
        p_lo = _bucket_half(z_ptr, row, in_l, offs_j, H, 0, H_LO, k_lo) * m[:, None]
        p_hi = _bucket_half(z_ptr, row, in_l, offs_i, H, H_LO, H - H_LO, k_hi)
        # S[j, i] += sum_l m_l P_lo[l, j] P_hi[l, i]: the tile's histogram as one small matmul.
        acc += tl.dot(tl.trans(p_lo), p_hi, input_precision="ieee")  # (K_LO_PAD, K_HI_PAD)
    out = s_ptr + (b * N + n) * (k_lo * k_hi) + offs_j[:, None] + k_lo * offs_i[None, :]
    tl.store(out, acc, mask=(offs_j[:, None] < k_lo) & (offs_i[None, :] < k_hi))


def _bwd_kernel(
    z_ptr,
    m_ptr,
    g_ptr,
    dz_ptr,
    L,
    N,
    H: tl.constexpr,
    H_PAD: tl.constexpr,
    H_LO: tl.constexpr,
    K_LO_PAD: tl.constexpr,
    K_HI_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One program per (token tile, sketch n, batch b): recompute P, write `grad_z` for the tile."""
    tile = tl.program_id(0)
    n = tl.program_id(1)
    b = tl.program_id(2)
    offs_h = tl.arange(0, H_PAD)
    offs_j = tl.arange(0, K_LO_PAD)
    offs_i = tl.arange(0, K_HI_PAD)
    k_lo: tl.constexpr = 1 << H_LO
    k_hi: tl.constexpr = 1 << (H - H_LO)
    # G[b, n] as a (K_lo, K_hi) matrix: bucket k = j + K_lo * i; padded entries 0.
    g = tl.load(
        g_ptr + (b * N + n) * (k_lo * k_hi) + offs_j[:, None] + k_lo * offs_i[None, :],
        mask=(offs_j[:, None] < k_lo) & (offs_i[None, :] < k_hi),
        other=0.0,
    )
    offs_l = tile * BLOCK_L + tl.arange(0, BLOCK_L)
    in_l = offs_l < L
    row = (b * L + offs_l) * N + n
    m = tl.load(m_ptr + b * L + offs_l, mask=in_l, other=0.0)
    p_lo = _bucket_half(z_ptr, row, in_l, offs_j, H, 0, H_LO, k_lo)  # (BLOCK_L, K_LO_PAD)
    p_hi = _bucket_half(z_ptr, row, in_l, offs_i, H, H_LO, H - H_LO, k_hi)  # (BLOCK_L, K_HI_PAD)
    # x_lo[l, j] = P_lo[l, j] sum_i G[j, i] P_hi[l, i], x_hi[l, i] = P_hi[l, i] sum_j P_lo[l, j] G[j, i]:
    # summing x_lo over the codes j with bit h set gives sum_{k: bit_h(k) = 1} G_k P_k for a low bit h.
    x_lo = p_lo * tl.dot(p_hi, tl.trans(g), input_precision="ieee")
    x_hi = p_hi * tl.dot(p_lo, g, input_precision="ieee")
    # Those masked sums, for all h at once, are matmuls with 0/1 bit tables (K_PAD, H_PAD):
    # on_lo[j, h] = bit_h(j) for the low hyperplanes h < H_LO, on_hi[i, h] = bit_{h - H_LO}(i) above.
    is_lo = offs_h[None, :] < H_LO
    is_hi = (offs_h[None, :] >= H_LO) & (offs_h[None, :] < H)
    bit_lo = ((offs_j[:, None] >> offs_h[None, :]) & 1) == 1
    bit_hi = ((offs_i[:, None] >> tl.maximum(offs_h[None, :] - H_LO, 0)) & 1) == 1
    on = tl.dot(x_lo, tl.where(is_lo & bit_lo, 1.0, 0.0), input_precision="ieee")
    on += tl.dot(x_hi, tl.where(is_hi & bit_hi, 1.0, 0.0), input_precision="ieee")
    off = tl.dot(x_lo, tl.where(is_lo & ~bit_lo, 1.0, 0.0), input_precision="ieee")
    off += tl.dot(x_hi, tl.where(is_hi & ~bit_hi, 1.0, 0.0), input_precision="ieee")
    tile_mask = in_l[:, None] & (offs_h[None, :] < H)
    zt = tl.load(z_ptr + row[:, None] * H + offs_h[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    # dS/dz_h = m (sum_{bit=1} G P - p_h sum_k G P) = m ((1 - p_h) * on - p_h * off): no cancellation.
    grad = m[:, None] * (on / (1.0 + tl.exp(zt)) - off / (1.0 + tl.exp(-zt)))
    tl.store(dz_ptr + row[:, None] * H + offs_h[None, :], grad.to(dz_ptr.dtype.element_ty), mask=tile_mask)


_KERNELS: dict[bool, tuple[Callable, Callable, Callable]] = {}
_bucket_half: Callable | None = None  # the helper the kernels call by name, bound per mode below


def _kernels() -> tuple[Callable, Callable]:
    """The (forward, backward) kernels, decorated for the current mode (compiled or interpreted).

    `triton.jit` picks interpreter mode when it decorates, so decorating here (not at import) lets a
    caller switch `TRITON_INTERPRET` on after importing this module.
    """
    global _bucket_half
    interpret = triton_interpret_enabled()
    if interpret not in _KERNELS:
        _KERNELS[interpret] = (triton.jit(_fwd_kernel), triton.jit(_bwd_kernel), triton.jit(_bucket_half_src))
    fwd, bwd, helper = _KERNELS[interpret]
    # The kernels resolve `_bucket_half` through this module's globals: it must be the helper of the
    # same mode (and the same object each time, or compiled kernels would see a changed global).
    _bucket_half = helper
    return fwd, bwd


def _launch_meta(n_hyperplanes: int) -> dict[str, int]:
    h_lo = n_hyperplanes // 2
    return {
        "H": n_hyperplanes,
        "H_PAD": max(_MIN_DOT, triton.next_power_of_2(n_hyperplanes)),  # an output dim of `tl.dot`
        "H_LO": h_lo,
        "K_LO_PAD": max(_MIN_DOT, 2**h_lo),
        "K_HI_PAD": max(_MIN_DOT, 2 ** (n_hyperplanes - h_lo)),
        "BLOCK_L": _BLOCK_L,
    }


def _triton_forward(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: `z` `(B, L, N, H)` contiguous, `mask` `(B, L)` fp32 -> `(B, N, K)`."""
    batch, tokens, n_sketches, n_hyperplanes = z.shape
    out = torch.empty(batch, n_sketches, 2**n_hyperplanes, device=z.device, dtype=torch.float32)
    if tokens == 0:
        return out.zero_()
    fwd, _ = _kernels()
    fwd[(batch, n_sketches)](z, mask, out, tokens, n_sketches, **_launch_meta(n_hyperplanes))
    return out


def _triton_backward(z: torch.Tensor, mask: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel: returns `grad_z` `(B, L, N, H)` in `z`'s dtype."""
    batch, tokens, n_sketches, n_hyperplanes = z.shape
    grad_z = torch.empty_like(z)
    if tokens == 0:
        return grad_z
    _, bwd = _kernels()
    grid = (triton.cdiv(tokens, _BLOCK_L), n_sketches, batch)
    bwd[grid](z, mask, grad_out, grad_z, tokens, n_sketches, **_launch_meta(n_hyperplanes))
    return grad_z


class SoftDLSHHistogram(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; the mask receives no gradient (it is data, not a weight)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """`z` `(B, L, N, H)`, `mask` `(B, L)` -> histogram `(B, N, 2**H)` float32."""
        z = z.contiguous()
        mask = mask.to(device=z.device, dtype=torch.float32).contiguous()
        ctx.save_for_backward(z, mask)
        return _triton_forward(z, mask)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """`grad_out` `(B, N, 2**H)` -> (`grad_z` `(B, L, N, H)`, None)."""
        z, mask = ctx.saved_tensors
        grad_z = _triton_backward(z, mask, grad_out.float().contiguous())
        return grad_z, None


def triton_supported(z: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the fused kernels can run on these inputs (device, size, and no gradient to the mask)."""
    on_device = z.is_cuda or (triton_interpret_enabled() and z.device.type == "cpu")
    return (
        HAS_TRITON
        and on_device
        and 1 <= z.shape[-1] <= MAX_TRITON_HYPERPLANES
        and not mask.requires_grad
        and z.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


def soft_dlsh_histogram(z: torch.Tensor, mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Soft DLSH histogram `S[b, n, k] = sum_i mask[b, i] * P_n(k | x_i)`, fused on GPU.

    Args:
        z: Hyperplane logits `(batch, tokens, n_sketches, n_hyperplanes)` (already divided by the
            temperature); float32, float16 or bfloat16.
        mask: Token weights `(batch, tokens)`: 1 for real tokens, 0 for padding.
        backend: `"auto"` uses the Triton kernels when they can run (CUDA tensors, or CPU tensors under
            `TRITON_INTERPRET=1`; `n_hyperplanes <= 12`; mask without gradient) and PyTorch otherwise;
            `"triton"` insists on the kernels; `"torch"` always uses the PyTorch reference.

    Returns:
        The histogram `(batch, n_sketches, 2**n_hyperplanes)`, float32 (accumulated in float32).

    Raises:
        ValueError: On bad shapes, an unknown backend, or `backend="triton"` where it cannot run.
    """
    _check_inputs(z, mask)
    if backend == "torch":
        return soft_dlsh_histogram_reference(z, mask)
    if backend not in ("auto", "triton"):
        raise ValueError(f"sketch kernel backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if triton_supported(z, mask):
        return SoftDLSHHistogram.apply(z, mask)
    if backend == "triton":
        why = (
            "triton is not installed (pip install triton)"
            if not HAS_TRITON
            else (
                f"needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), 1 <= n_hyperplanes <= "
                f"{MAX_TRITON_HYPERPLANES} and a mask without gradient; got device={z.device}, "
                f"n_hyperplanes={z.shape[-1]}, dtype={z.dtype}, mask.requires_grad={mask.requires_grad}"
            )
        )
        raise ValueError(f"sketch kernel 'triton' cannot run: {why}")
    return soft_dlsh_histogram_reference(z, mask)
