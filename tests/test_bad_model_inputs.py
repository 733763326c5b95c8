"""Bad model inputs and config numbers give one clear `ValueError`, not a reshape/einsum error or NaNs."""

from __future__ import annotations

import pytest
import torch

from temde_hf.testing import TINY_IMAGE_SIZE, tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize(
    ("pixel_values", "message"),
    [
        (torch.zeros(3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), r"shape \(3, 32, 32\).*unsqueeze\(0\)"),
        (torch.zeros(0, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), r"got shape \(0, 3, 32, 32\)"),
        ([[0.0]], r"got list"),
    ],
)
def test_bad_pixel_values(model, pixel_values, message: str) -> None:
    with pytest.raises(ValueError, match=rf"pixel_values must be a non-empty tensor of shape .*{message}"):
        model.get_image_features(pixel_values=pixel_values)


def test_bad_text_inputs(model) -> None:
    ids = torch.tensor([[2, 5, 29, 3], [2, 30, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"input_ids must be a non-empty tensor of shape \(batch, seq_len\)"):
        model.get_text_features(input_ids=ids[0])
    with pytest.raises(ValueError, match=r"input_ids must be a non-empty tensor.*\(0, 4\)"):
        model.get_text_features(input_ids=ids[:0], attention_mask=mask[:0])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\) but input_ids \(2, 4\)"):
        model.get_text_features(input_ids=ids, attention_mask=mask[:, :3])
    # an all-padding row would silently embed to zeros (a constant score against every image)
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] are all padding"):
        model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    assert model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.shape[0] == 2


@pytest.mark.parametrize("field", ["sketch_temperature", "sketch_weight", "initializer_range"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_config_numbers_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"TemdeConfig\.{field}={value!r} must be a number .* and finite"):
        tiny_config(**{field: value})


def test_non_finite_logit_scale_is_refused() -> None:
    with pytest.raises(ValueError, match=r"logit_scale_init_value=nan must be a finite number"):
        tiny_config(logit_scale_init_value=float("nan"))
