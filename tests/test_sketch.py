"""TemdeSketch: shapes, mass, padding/order invariance, gradients, the hard-DLSH limit, init, chunking,
and the fast PyTorch paths against the log-space oracle."""

from __future__ import annotations

import math

import pytest
import torch

from temde_hf import SKETCH_CODERS, TemdeSketch
from temde_hf.models.temde.configuration_temde import MAX_HYPERPLANES
from temde_hf.models.temde.factored_sketch_temde import factored_soft_dlsh_histogram
from temde_hf.testing import tiny_config

D = 16


def make_sketch(coder: str, **overrides) -> TemdeSketch:
    settings = {"sketch_coder": coder, "projection_dim": D, "n_sketches": 5, "n_hyperplanes": 3, **overrides}
    return TemdeSketch(tiny_config(**settings))


@pytest.mark.parametrize("coder", sorted(SKETCH_CODERS))
def test_shapes_and_row_norms(coder: str) -> None:
    sketch = make_sketch(coder)
    tokens, mask = torch.randn(3, 7, D), torch.ones(3, 7)
    out = sketch(tokens, mask)
    assert out.shape == (3, 5, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 5))


@pytest.mark.parametrize("coder", sorted(SKETCH_CODERS))
def test_row_mass_equals_number_of_valid_tokens(coder: str) -> None:
    sketch = make_sketch(coder)
    tokens = torch.randn(4, 9, D)
    mask = torch.zeros(4, 9)
    lengths = torch.tensor([9, 1, 4, 6])
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    hist = sketch.histogram(tokens, mask)
    expected = lengths.float()[:, None].expand(4, 5)
    torch.testing.assert_close(hist.sum(-1), expected)


@pytest.mark.parametrize("coder", sorted(SKETCH_CODERS))
def test_padding_contributes_nothing_and_order_does_not_matter(coder: str) -> None:
    sketch = make_sketch(coder)
    tokens = torch.randn(2, 5, D)
    reference = sketch(tokens, torch.ones(2, 5))
    # Append 4 garbage padding tokens: the sketch must not move.
    padded = torch.cat([tokens, 100 * torch.randn(2, 4, D)], dim=1)
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 4)], dim=1)
    torch.testing.assert_close(sketch(padded, mask), reference)
    permuted = tokens[:, torch.randperm(5)]
    torch.testing.assert_close(sketch(permuted, torch.ones(2, 5)), reference)


@pytest.mark.parametrize("coder", sorted(SKETCH_CODERS))
def test_gradients_reach_every_sketch_parameter(coder: str) -> None:
    sketch = make_sketch(coder, learn_sketch_temperature=True)
    tokens = torch.randn(3, 6, D, requires_grad=True)
    (sketch(tokens, torch.ones(3, 6)) * torch.randn(3, 5, 8)).sum().backward()
    for name, param in sketch.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert tokens.grad.abs().sum() > 0


def test_fixed_temperature_is_a_persistent_buffer() -> None:
    sketch = make_sketch("soft_dlsh", learn_sketch_temperature=False, sketch_temperature=0.5)
    assert "log_temperature" in sketch.state_dict()
    assert not any(name == "log_temperature" for name, _ in sketch.named_parameters())
    assert math.isclose(sketch.temperature.item(), 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("coder", sorted(SKETCH_CODERS))
def test_small_temperature_gives_hard_buckets(coder: str, kernel: str) -> None:
    """As τ -> 0 the soft histogram becomes the hard DLSH (or nearest-anchor) bucket counts."""
    sketch = make_sketch(coder, sketch_temperature=1e-4, learn_sketch_temperature=False, sketch_kernel=kernel)
    sketch.initialize(torch.randn(200, D))
    tokens = torch.randn(3, 11, D)
    hist = sketch.histogram(tokens, torch.ones(3, 11))
    buckets = sketch.coder.hard_buckets(tokens)  # (3, 11, N)
    hard = torch.nn.functional.one_hot(buckets, 8).float().sum(1)  # (3, N, K)
    torch.testing.assert_close(hist, hard, atol=1e-3, rtol=0)


def test_hard_bucket_codes_follow_the_hyperplane_bits() -> None:
    sketch = make_sketch("soft_dlsh")
    x = torch.randn(50, D)
    z = sketch.coder.hyperplane_logits(x)  # (50, N, H)
    codes = sketch.coder.hard_buckets(x)
    for h in range(3):
        assert torch.equal((codes >> h) & 1, (z[..., h] > 0).long())


def test_dlsh_initialisation_halves_the_data() -> None:
    """Median thresholds: every hyperplane puts half of the warm-up tokens on each side."""
    sketch = make_sketch("soft_dlsh")
    data = torch.randn(1001, D) * 3 + 5  # off-centre, so a zero threshold would not halve it
    assert not bool(sketch.initialized)
    sketch.initialize(data)
    assert bool(sketch.initialized)
    above = (sketch.coder.hyperplane_logits(data) > 0).float().mean(0)
    torch.testing.assert_close(above, torch.full_like(above, 0.5), atol=2e-3, rtol=0)
    # ... so every bucket of the hard partition is used, and none holds most of the data.
    counts = torch.nn.functional.one_hot(sketch.coder.hard_buckets(data), 8).sum(0)
    assert (counts > 0).all() and counts.max() < 0.5 * len(data)


def test_initialise_rejects_bad_shapes() -> None:
    sketch = make_sketch("soft_dlsh")
    with pytest.raises(ValueError, match=r"\(M, 16\)"):
        sketch.initialize(torch.randn(4, 5, D))


@pytest.mark.parametrize("coder", sorted(SKETCH_CODERS))
def test_chunking_matches_one_pass_in_value_and_gradient(coder: str) -> None:
    small = make_sketch(coder, sketch_chunk_size=3)
    big = make_sketch(coder, sketch_chunk_size=1000)
    big.load_state_dict(small.state_dict())
    tokens = torch.randn(2, 10, D)
    mask = (torch.rand(2, 10) > 0.3).float()
    weights = torch.randn(2, 5, 8)
    grads = []
    for sketch in (small, big):
        x = tokens.clone().requires_grad_(True)
        (sketch(x, mask) * weights).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(small(tokens, mask), big(tokens, mask))
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------------
# The fast PyTorch paths against the log-space oracle (`TemdeSketch.reference_histogram`)
# ------------------------------------------------------------------------------------------------------
def _oracle_pair(coder: str, **overrides) -> tuple[TemdeSketch, TemdeSketch]:
    """The same weights twice: the default path (`sketch_kernel="auto"`) and the oracle."""
    fast = make_sketch(coder, learn_sketch_temperature=True, sketch_temperature=0.7, **overrides)
    oracle = make_sketch(coder, learn_sketch_temperature=True, sketch_kernel="reference", **overrides)
    oracle.load_state_dict(fast.state_dict())
    return fast, oracle


def _padded_mask(batch: int, tokens: int) -> torch.Tensor:
    """Row 0 full, the others shorter, the last row empty."""
    lengths = torch.linspace(tokens, 0, batch).round().long()
    return (torch.arange(tokens)[None, :] < lengths[:, None]).long()  # an attention_mask, as tokenizers give


def _value_and_grads(sketch: TemdeSketch, tokens: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor):
    """Unnormalised histogram and the gradients of `<histogram, weights>` to tokens and every parameter."""
    tokens = tokens.detach().clone().requires_grad_()
    hist = sketch.histogram(tokens, mask)
    params = dict(sketch.named_parameters())
    grads = torch.autograd.grad((hist * weights).sum(), [tokens, *params.values()])
    return hist.detach(), dict(zip(["tokens", *params], grads))


def _assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Equal within `rtol` of the largest entry (absolute terms near zero are judged on that scale)."""
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("coder", sorted(SKETCH_CODERS))
@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["soft", "saturated"])
def test_fast_path_equals_log_space_oracle(coder: str, scale: float) -> None:
    """Values and gradients (tokens, weights, thresholds/biases, temperature) with padding and an empty row;
    `saturated` scales the tokens so most logits are far beyond the sigmoid's range."""
    fast, oracle = _oracle_pair(coder)
    tokens = torch.randn(4, 11, D) * scale
    mask = _padded_mask(4, 11)
    weights = torch.randn(4, 5, 8)
    value, grads = _value_and_grads(fast, tokens, mask, weights)
    expected, expected_grads = _value_and_grads(oracle, tokens, mask, weights)
    _assert_close_relative(value, expected, 1e-5)
    assert torch.all(value[-1] == 0)  # the empty row holds no mass
    for name, grad in grads.items():
        _assert_close_relative(grad, expected_grads[name], 1e-4)
    assert torch.all(grads["tokens"][mask == 0] == 0)  # padding gets exactly no gradient


@pytest.mark.parametrize("n_hyperplanes", range(1, MAX_HYPERPLANES + 1))
def test_factored_path_equals_oracle_for_every_allowed_h(n_hyperplanes: int) -> None:
    fast, oracle = _oracle_pair("soft_dlsh", n_hyperplanes=n_hyperplanes, n_sketches=2)
    tokens, mask = torch.randn(3, 6, D), _padded_mask(3, 6)
    weights = torch.randn(3, 2, 2**n_hyperplanes)
    value, grads = _value_and_grads(fast, tokens, mask, weights)
    expected, expected_grads = _value_and_grads(oracle, tokens, mask, weights)
    _assert_close_relative(value, expected, 1e-5)
    for name, grad in grads.items():
        _assert_close_relative(grad, expected_grads[name], 1e-4)


@pytest.mark.parametrize("coder", sorted(SKETCH_CODERS))
def test_fast_path_bfloat16_tokens(coder: str) -> None:
    """bf16 tokens: the fast path accumulates in float32 and returns bf16 token gradients. The oracle
    would round its log-probabilities to bf16, so the fast path is compared with the oracle run in float32
    on the same (bf16-rounded) tokens, within the rounding of its bf16 projection."""
    fast, oracle = _oracle_pair(coder)
    tokens, mask = torch.randn(3, 9, D).bfloat16(), _padded_mask(3, 9)
    weights = torch.randn(3, 5, 8)
    value, grads = _value_and_grads(fast, tokens, mask, weights)
    expected, expected_grads = _value_and_grads(oracle, tokens.float(), mask, weights)
    assert value.dtype == torch.float32 and grads["tokens"].dtype == torch.bfloat16
    _assert_close_relative(value, expected, 3e-2)
    for name, grad in grads.items():
        _assert_close_relative(grad, expected_grads[name], 5e-2)


def test_factored_backward_passes_gradcheck() -> None:
    """The hand-written backward against finite differences (float64), odd H so the halves differ."""
    z = torch.randn(2, 5, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = _padded_mask(2, 5).double()
    assert torch.autograd.gradcheck(lambda z: factored_soft_dlsh_histogram(z, mask), (z,))


def _largest_saved_tensor(sketch: TemdeSketch, tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Elements of the largest tensor autograd saves for backward in `sketch.histogram`, and the output."""
    sizes = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hist = sketch.histogram(tokens.requires_grad_(), torch.ones(tokens.shape[:2]))
    return max(sizes), hist


def test_cpu_default_is_the_factored_path_and_saves_no_bucket_tensor() -> None:
    """`sketch_kernel="auto"` on CPU runs the factored path, which saves nothing of size B·L·N·K for
    backward; the oracle does (so the check can tell them apart)."""
    batch, tokens, n_sketches, n_hyperplanes = 2, 16, 3, 8
    fast = make_sketch("soft_dlsh", n_sketches=n_sketches, n_hyperplanes=n_hyperplanes)
    oracle = make_sketch(
        "soft_dlsh", n_sketches=n_sketches, n_hyperplanes=n_hyperplanes, sketch_kernel="reference"
    )
    fast_largest, hist = _largest_saved_tensor(fast, torch.randn(batch, tokens, D))
    oracle_largest, _ = _largest_saved_tensor(oracle, torch.randn(batch, tokens, D))
    assert "FactoredSoftDLSH" in type(hist.grad_fn).__name__
    bucket_tensor = batch * tokens * n_sketches * 2**n_hyperplanes
    assert fast_largest <= bucket_tensor // 8 < bucket_tensor <= oracle_largest


def test_empty_token_set_and_mask_with_gradient() -> None:
    sketch = make_sketch("soft_dlsh")
    assert torch.equal(sketch.histogram(torch.randn(2, 0, D), torch.ones(2, 0)), torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match="mask requires a gradient"):
        sketch.histogram(torch.randn(2, 3, D), torch.ones(2, 3, requires_grad=True))


def test_n_hyperplanes_above_the_bound_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=rf"n_hyperplanes=40 .*maximum of {MAX_HYPERPLANES}"):
        tiny_config(n_hyperplanes=40)
    with pytest.raises(ValueError, match="n_hyperplanes=13"):
        tiny_config(sketch_width=2**13, n_hyperplanes=None)
    assert tiny_config(n_hyperplanes=MAX_HYPERPLANES).sketch_width == 2**MAX_HYPERPLANES
