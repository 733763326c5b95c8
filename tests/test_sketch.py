"""TemdeSketch: shapes, mass, padding/order invariance, gradients, the hard-DLSH limit, init, chunking."""

from __future__ import annotations

import math

import pytest
import torch

from temde_hf import SKETCH_CODERS, TemdeSketch
from temde_hf.models.temde.configuration_temde import CODER_CHOICES
from temde_hf.testing import tiny_config

D = 16


def make_sketch(coder: str, **overrides) -> TemdeSketch:
    config = tiny_config(sketch_coder=coder, projection_dim=D, n_sketches=5, n_hyperplanes=3, **overrides)
    return TemdeSketch(config)


def test_registry_matches_config_choices() -> None:
    assert set(SKETCH_CODERS) == set(CODER_CHOICES)


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


@pytest.mark.parametrize("coder", sorted(SKETCH_CODERS))
def test_small_temperature_gives_hard_buckets(coder: str) -> None:
    """As τ -> 0 the soft histogram becomes the hard DLSH (or nearest-anchor) bucket counts."""
    sketch = make_sketch(coder, sketch_temperature=1e-4, learn_sketch_temperature=False)
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
