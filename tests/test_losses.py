"""The losses equal brute-force references written as plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from temde_hf import LOSSES
from temde_hf.models.temde.loss_temde import info_nce_loss, vse_hinge_loss
from temde_hf.training.arguments import parse_args


def random_pairs(n: int = 6, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.nn.functional.normalize(torch.randn(n, dim, dtype=torch.float64), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(n, dim, dtype=torch.float64), dim=-1)
    return images, texts


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_is_a_training_choice(name: str) -> None:
    args = parse_args(["--model_config", "x", "--synthetic_images", "4", "--loss_type", name])[2]
    assert args.loss_type == name


def test_info_nce_equals_loop_reference() -> None:
    images, texts = random_pairs()
    scale = torch.tensor(7.5, dtype=torch.float64)
    n = len(images)
    sim = [[scale.item() * float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)) / n
    t2i = sum(-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)) / n
    got = info_nce_loss(images, texts, logit_scale=scale)
    assert math.isclose(got.item(), (i2t + t2i) / 2, rel_tol=1e-9)


@pytest.mark.parametrize("max_violation", [True, False])
def test_vse_hinge_equals_loop_reference(max_violation: bool) -> None:
    images, texts = random_pairs()
    margin, n = 0.2, len(images)
    s = [[float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):  # image queries: negatives are the other captions
        costs = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(n) if j != i]
        total += max(costs) if max_violation else sum(costs)
    for j in range(n):  # caption queries: negatives are the other images
        costs = [max(0.0, margin + s[i][j] - s[j][j]) for i in range(n) if i != j]
        total += max(costs) if max_violation else sum(costs)
    got = vse_hinge_loss(images, texts, margin=margin, max_violation=max_violation)
    assert math.isclose(got.item(), total / n, rel_tol=1e-9)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_pair_ids_remove_same_image_negatives(name: str) -> None:
    images, texts = random_pairs(4)
    images[1] = images[0]  # rows 0 and 1 are two captions of one image
    pair_ids = torch.tensor([0, 0, 1, 2])
    kwargs = {"logit_scale": torch.tensor(10.0, dtype=torch.float64), "margin": 0.2, "max_violation": True}
    with_ids = LOSSES[name](images, texts, pair_ids=pair_ids, **kwargs)
    # Reference: the same loss when the duplicate text is pushed far away from every image.
    without = LOSSES[name](images, texts, **kwargs)
    assert not torch.isclose(with_ids, without)
    # Perfectly separated pairs with a duplicate image: no loss from the duplicate for the hinge.
    if name == "vse_hinge":
        eye = torch.eye(4, dtype=torch.float64)
        imgs = eye.clone()
        imgs[1] = imgs[0]
        txts = eye.clone()
        txts[1] = txts[0]
        assert vse_hinge_loss(imgs, txts, margin=0.2, max_violation=True, pair_ids=pair_ids).item() == 0.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_have_gradients(name: str) -> None:
    images, texts = random_pairs()
    images.requires_grad_(True)
    LOSSES[name](images, texts, logit_scale=torch.tensor(5.0, dtype=torch.float64)).backward()
    assert images.grad.abs().sum() > 0
