"""The fused soft_dlsh kernels against their PyTorch oracle.

On CPU the Triton kernels run through Triton's interpreter: `TRITON_INTERPRET=1` is set per test (the
module decorates its kernels lazily, at first use, so the variable only has to be set before the call).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from temde_hf.models.temde import triton_sketch_temde as tsk
from temde_hf.testing import run_python

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not tsk.HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run Triton kernels on CPU tensors (a no-op for CUDA tensors' correctness)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _padded_mask(batch: int, tokens: int) -> torch.Tensor:
    """`(batch, tokens)` 0/1 mask: row 0 full, the others padded to fewer tokens (one row empty if B > 2)."""
    mask = torch.ones(batch, tokens)
    for b in range(1, batch):
        mask[b, (tokens * (batch - b)) // (batch + 1) :] = 0
    if batch > 2:
        mask[-1] = 0
    return mask


def _fwd_bwd(z: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, backend: str):
    z = z.detach().clone().requires_grad_()
    out = tsk.soft_dlsh_histogram(z, mask, backend=backend)
    (out * grad).sum().backward()
    return out.detach(), z.grad


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(30+) = inf -> sigmoid 0, as on GPU
@pytest.mark.parametrize(
    ("batch", "tokens", "n_sketches", "n_hyperplanes", "scale"),
    [
        (2, 70, 3, 1, 2.0),  # L not a multiple of the 64-token tile; K = 2
        (3, 130, 2, 3, 2.0),  # three tiles, one fully padded row
        (2, 65, 2, 6, 1.0),  # the default config's K = 64
        (2, 19, 2, 8, 3.0),  # K = 256, fewer tokens than one tile
        (1, 33, 1, 8, 30.0),  # saturated sigmoids (the small-temperature regime)
    ],
)
def test_kernel_matches_reference(interpret, batch, tokens, n_sketches, n_hyperplanes, scale) -> None:
    z = torch.randn(batch, tokens, n_sketches, n_hyperplanes) * scale
    mask = _padded_mask(batch, tokens)
    grad = torch.randn(batch, n_sketches, 2**n_hyperplanes)
    out, dz = _fwd_bwd(z, mask, grad, "triton")
    ref, ref_dz = _fwd_bwd(z, mask, grad, "torch")
    assert out.shape == (batch, n_sketches, 2**n_hyperplanes) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(dz, ref_dz, rtol=1e-5, atol=1e-5 * ref_dz.abs().max().item())
    # Padding gets exactly zero gradient; each histogram row holds one unit of mass per valid token.
    assert torch.all(dz[mask == 0] == 0)
    torch.testing.assert_close(
        out.sum(-1), mask.sum(1, keepdim=True).expand(-1, n_sketches), rtol=1e-5, atol=1e-4
    )


@needs_triton
def test_kernel_bfloat16_accumulates_in_float32(interpret) -> None:
    z = (torch.randn(2, 40, 3, 6) * 2).bfloat16()
    mask = torch.ones(2, 40, dtype=torch.long)  # an attention_mask as the tokenizer returns it
    mask[1, 25:] = 0
    grad = torch.randn(2, 3, 64)
    out, dz = _fwd_bwd(z, mask, grad, "triton")
    ref, ref_dz = _fwd_bwd(z, mask, grad, "torch")
    assert out.dtype == torch.float32 and dz.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dz.float(), ref_dz.float(), rtol=2e-2, atol=1e-2)


def test_reference_gradient_is_the_closed_form() -> None:
    """dS/dz from autograd equals m · Σ_k G_k P_k (bit_h(k) − p_h), the formula the kernel implements."""
    z = torch.randn(2, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = _padded_mask(2, 9).double()
    grad = torch.randn(2, 3, 16, dtype=torch.float64)
    p = torch.sigmoid(z)
    bits = ((torch.arange(16)[:, None] >> torch.arange(4)[None, :]) & 1).double()  # (K, H)
    probs = torch.prod(torch.where(bits.bool(), p[..., None, :], 1 - p[..., None, :]), dim=-1)  # (B, L, N, K)
    hist = torch.einsum("bl,blnk->bnk", mask, probs)
    (hist * grad).sum().backward()
    gp = grad[:, None] * probs  # (B, L, N, K): G_k P_k
    closed = mask[..., None, None] * (gp @ bits - p * gp.sum(-1, keepdim=True))
    torch.testing.assert_close(z.grad, closed.detach())
    with torch.no_grad():
        torch.testing.assert_close(tsk.soft_dlsh_histogram_reference(z.float(), mask.float()), hist.float())


def test_reference_matches_model_log_space_coder() -> None:
    """The oracle agrees with the model's own (log-space) soft_dlsh probabilities."""
    sketch_temde = pytest.importorskip("temde_hf.models.temde.sketch_temde")
    z = torch.randn(2, 11, 4, 6) * 2
    mask = _padded_mask(2, 11)
    probs = sketch_temde.soft_dlsh_log_probs(z).exp()  # (B, L, N, K)
    expected = torch.einsum("bl,blnk->bnk", mask, probs)
    torch.testing.assert_close(tsk.soft_dlsh_histogram_reference(z, mask), expected, rtol=1e-5, atol=1e-5)


def test_dispatch_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, mask = torch.randn(2, 5, 3, 4, requires_grad=True), torch.ones(2, 5)
    out = tsk.soft_dlsh_histogram(z, mask)  # CPU without the interpreter: the torch path
    assert "SoftDLSHHistogram" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, tsk.soft_dlsh_histogram_reference(z, mask))
    with pytest.raises(ValueError, match="cannot run"):
        tsk.soft_dlsh_histogram(z, mask, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        tsk.soft_dlsh_histogram(z, mask, backend="cuda")
    with pytest.raises(ValueError, match="mask must be"):
        tsk.soft_dlsh_histogram(z, torch.ones(2, 4))
    with pytest.raises(ValueError, match="z must be"):
        tsk.soft_dlsh_histogram(z[0], mask)


@needs_triton
def test_dispatch_uses_kernel_when_it_can(interpret) -> None:
    z, mask = torch.randn(1, 20, 2, 3, requires_grad=True), torch.ones(1, 20)
    assert "SoftDLSHHistogram" in type(tsk.soft_dlsh_histogram(z, mask).grad_fn).__name__
    # Too many hyperplanes for the register tile, or a mask that wants a gradient: torch fallback.
    big = torch.randn(1, 2, 1, tsk.MAX_TRITON_HYPERPLANES + 1)
    assert not tsk.triton_supported(big, torch.ones(1, 2))
    assert not tsk.triton_supported(z, mask.clone().requires_grad_())
    with pytest.raises(ValueError, match="n_hyperplanes"):
        tsk.soft_dlsh_histogram(big, torch.ones(1, 2), backend="triton")


def test_module_imports_without_triton() -> None:
    """Hub remote code must load where triton is absent: HAS_TRITON is False and torch still works."""
    path = REPO_ROOT / "temde_hf" / "models" / "temde" / "triton_sketch_temde.py"
    code = f"""
    import importlib.util, torch
    spec = importlib.util.spec_from_file_location("tsk", {str(path)!r})
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HAS_TRITON is False
    out = mod.soft_dlsh_histogram(torch.randn(1, 3, 2, 2), torch.ones(1, 3))
    assert out.shape == (1, 2, 4)
    """
    run_python(code, blocked=("triton",), timeout=120)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_matches_reference_on_cuda(dtype: torch.dtype) -> None:
    """The compiled kernel (no interpreter) at L = 577, N = 64, H = 8, forward and backward; bf16 inputs
    (as under autocast) still accumulate in float32, and their gradient comes back in bf16."""
    z = torch.randn(4, 577, 64, 8, device="cuda").to(dtype)
    mask = _padded_mask(4, 577).cuda()
    grad = torch.randn(4, 64, 256, device="cuda")
    out, dz = _fwd_bwd(z, mask, grad, "triton")
    ref, ref_dz = _fwd_bwd(z, mask, grad, "torch")
    assert out.dtype == torch.float32 and dz.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if dtype == torch.float32:
        torch.testing.assert_close(dz, ref_dz, rtol=1e-5, atol=1e-5 * ref_dz.abs().max().item())
    else:  # both round a float32 gradient to bf16 (8 bits of mantissa): a few ulps apart at most
        torch.testing.assert_close(
            dz.float(), ref_dz.float(), rtol=2e-2, atol=1e-2 * ref_dz.abs().max().item()
        )
    assert torch.all(dz[mask == 0] == 0)


@pytest.mark.gpu
@needs_triton
def test_model_sketch_under_bf16_autocast_on_cuda() -> None:
    """`TemdeSketch` under bf16 autocast (how the benchmarks and `--mixed_precision bf16` run it): the
    fused kernel's forward and every gradient agree with the torch path's."""
    from temde_hf.models.temde import TemdeConfig, TemdeSketch

    results = []
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        sketch = TemdeSketch(
            TemdeConfig(projection_dim=256, n_sketches=32, n_hyperplanes=6, sketch_kernel=kernel)
        ).cuda()
        tokens = torch.randn(8, 197, 256, device="cuda", requires_grad=True)
        mask = _padded_mask(8, 197).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sketch(tokens, mask)
        out.pow(3).sum().backward()  # not pow(2): the rows have unit norm, so that gradient is zero
        results.append((out.detach(), tokens.grad, sketch.coder.weight.grad))
    # The two paths round bf16 logits and products at different points: under CPU autocast through
    # the interpreter they differ by up to 1.6% of the largest value; a wrong kernel is off by O(1).
    for torch_value, triton_value in zip(*results):
        scale = torch_value.abs().max().item()
        torch.testing.assert_close(triton_value, torch_value, rtol=5e-2, atol=5e-2 * scale)


@needs_triton
def test_model_sketch_with_triton_kernel_matches_torch(interpret) -> None:
    """`TemdeSketch` with `sketch_kernel="triton"` (as wired in the model) equals its torch path, grads too."""
    from temde_hf.models.temde import TemdeConfig, TemdeSketch

    results = []
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        sketch = TemdeSketch(
            TemdeConfig(projection_dim=8, n_sketches=3, n_hyperplanes=4, sketch_kernel=kernel)
        )
        tokens = torch.randn(2, 70, 8, requires_grad=True)
        mask = _padded_mask(2, 70)
        out = sketch(tokens, mask)
        out.pow(3).sum().backward()
        results.append((out.detach(), tokens.grad, sketch.coder.weight.grad, sketch.log_temperature.grad))
    for torch_value, triton_value in zip(*results):
        torch.testing.assert_close(triton_value, torch_value, rtol=1e-4, atol=1e-5)


def test_every_configurable_h_fits_the_kernel() -> None:
    """The config's bound on n_hyperplanes is within the kernel's tile, so `sketch_kernel="triton"` never
    meets a valid config it cannot run."""
    from temde_hf.models.temde.configuration_temde import MAX_HYPERPLANES

    assert MAX_HYPERPLANES <= tsk.MAX_TRITON_HYPERPLANES
