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


def _negatives(i: int, n: int, pair_ids: list[int] | None) -> list[int]:
    """Rows that are negatives of row i: every other row, except those of the same image."""
    return [j for j in range(n) if j != i and (pair_ids is None or pair_ids[j] != pair_ids[i])]


def info_nce_reference(images, texts, scale: float, pair_ids: list[int] | None = None) -> float:
    """Symmetric InfoNCE as a loop: each query's log-softmax over its positive and its negatives."""
    n = len(images)
    sim = [[scale * float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]

    def nll(logits: list[float]) -> float:  # the positive is logits[0]
        return -logits[0] + math.log(sum(math.exp(x) for x in logits))

    i2t = sum(nll([sim[i][i]] + [sim[i][j] for j in _negatives(i, n, pair_ids)]) for i in range(n)) / n
    t2i = sum(nll([sim[j][j]] + [sim[i][j] for i in _negatives(j, n, pair_ids)]) for j in range(n)) / n
    return (i2t + t2i) / 2


def vse_hinge_reference(images, texts, margin: float, max_violation: bool, pair_ids=None) -> float:
    """VSE++ hinge as a loop over image queries and caption queries, averaged over the batch."""
    n = len(images)
    s = [[float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):  # image queries: negatives are the other images' captions
        costs = [max(0.0, margin + s[i][j] - s[i][i]) for j in _negatives(i, n, pair_ids)]
        total += max(costs, default=0.0) if max_violation else sum(costs)
    for j in range(n):  # caption queries: negatives are the other images
        costs = [max(0.0, margin + s[i][j] - s[j][j]) for i in _negatives(j, n, pair_ids)]
        total += max(costs, default=0.0) if max_violation else sum(costs)
    return total / n


# rows 0 and 1 are two captions of one image, and so are rows 3, 4 and 5
PAIR_IDS = [0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize("pair_ids", [None, PAIR_IDS], ids=["no_pair_ids", "pair_ids"])
def test_info_nce_equals_loop_reference(pair_ids: list[int] | None) -> None:
    images, texts = random_pairs()
    scale = torch.tensor(7.5, dtype=torch.float64)
    ids = None if pair_ids is None else torch.tensor(pair_ids)
    got = info_nce_loss(images, texts, logit_scale=scale, pair_ids=ids)
    assert math.isclose(got.item(), info_nce_reference(images, texts, 7.5, pair_ids), rel_tol=1e-9)


@pytest.mark.parametrize("pair_ids", [None, PAIR_IDS], ids=["no_pair_ids", "pair_ids"])
@pytest.mark.parametrize("max_violation", [True, False])
def test_vse_hinge_equals_loop_reference(max_violation: bool, pair_ids: list[int] | None) -> None:
    images, texts = random_pairs()
    ids = None if pair_ids is None else torch.tensor(pair_ids)
    got = vse_hinge_loss(images, texts, margin=0.2, max_violation=max_violation, pair_ids=ids)
    expected = vse_hinge_reference(images, texts, 0.2, max_violation, pair_ids)
    assert math.isclose(got.item(), expected, rel_tol=1e-9)


def test_pair_ids_change_the_references() -> None:
    """The pair_ids cases above test something: on these inputs removing the negatives changes both losses."""
    images, texts = random_pairs()
    assert not math.isclose(
        info_nce_reference(images, texts, 7.5), info_nce_reference(images, texts, 7.5, PAIR_IDS)
    )
    assert not math.isclose(
        vse_hinge_reference(images, texts, 0.2, False),
        vse_hinge_reference(images, texts, 0.2, False, PAIR_IDS),
    )
    # Perfectly separated pairs with a duplicate image: no loss from the duplicate for the hinge.
    eye = torch.eye(4, dtype=torch.float64)
    imgs, txts = eye.clone(), eye.clone()
    imgs[1], txts[1] = imgs[0], txts[0]
    assert vse_hinge_loss(imgs, txts, margin=0.2, pair_ids=torch.tensor([0, 0, 1, 2])).item() == 0.0
    assert vse_hinge_loss(imgs, txts, margin=0.2).item() > 0.0  # without the ids the duplicate is a negative


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_have_gradients(name: str) -> None:
    images, texts = random_pairs()
    images.requires_grad_(True)
    LOSSES[name](images, texts, logit_scale=torch.tensor(5.0, dtype=torch.float64)).backward()
    assert images.grad.abs().sum() > 0
