"""Retrieval metrics against a naive reference, hand-computed values, and the COCO fold slicing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from temde_hf.evaluation.folds import evaluate_embeddings, fold_indices
from temde_hf.evaluation.metrics import (
    KS,
    NonFiniteScoresError,
    captions_per_image_map,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)


def naive_metrics(sim: np.ndarray, owner: np.ndarray) -> dict[str, float]:
    """Loop reference: sort every row, look up the true item(s) by position (VSE++ style)."""
    n_images, n_captions = sim.shape
    i2t_ranks = []
    for i in range(n_images):
        order = list(np.argsort(-sim[i], kind="stable"))
        i2t_ranks.append(min(order.index(c) for c in range(n_captions) if owner[c] == i))
    t2i_ranks = []
    for c in range(n_captions):
        order = list(np.argsort(-sim[:, c], kind="stable"))
        t2i_ranks.append(order.index(owner[c]))
    out = {}
    for name, ranks in (("i2t", np.array(i2t_ranks)), ("t2i", np.array(t2i_ranks))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
        out[f"{name}_meanr"] = ranks.mean() + 1
    out["rsum"] = sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10))
    return out


@pytest.mark.parametrize("n_images,per_image,chunk", [(37, 5, 8), (20, 5, 1024), (30, None, 7)])
def test_metrics_match_naive_reference(n_images: int, per_image: int | None, chunk: int) -> None:
    gen = torch.Generator().manual_seed(n_images)
    if per_image is None:  # variable caption counts, shuffled order
        counts = torch.randint(1, 8, (n_images,), generator=gen)
        owner = torch.repeat_interleave(torch.arange(n_images), counts)
        owner = owner[torch.randperm(len(owner), generator=gen)]
    else:
        owner = captions_per_image_map(n_images, per_image)
    # correlated scores, so recalls are neither 0 nor 100
    images = torch.randn(n_images, 16, generator=gen)
    texts = images[owner] + 1.5 * torch.randn(len(owner), 16, generator=gen)
    sim = images @ texts.T
    expected = naive_metrics(sim.numpy(), owner.numpy())
    from_sim = retrieval_metrics(sim, owner, chunk_size=chunk)
    from_embeds = retrieval_metrics(
        caption_to_image=owner, image_embeds=images, text_embeds=texts, chunk_size=chunk
    )
    assert 0 < expected["i2t_r1"] < 100 and 0 < expected["t2i_r5"] < 100
    for key, value in expected.items():
        assert from_sim[key] == pytest.approx(value, abs=1e-9), key
        assert from_embeds[key] == pytest.approx(value, abs=1e-4), key


def test_hand_computed_small_case() -> None:
    # 3 images; image 0 has captions 0,1 ; image 1 has caption 2 ; image 2 has captions 3,4,5
    owner = torch.tensor([0, 0, 1, 2, 2, 2])
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.0, 0.2, 0.3],  # best own caption (1) is first -> rank 0
            [0.7, 0.1, 0.2, 0.9, 0.8, 0.6],  # own caption 2 (0.2) beaten by 0.7,0.9,0.8,0.6 -> rank 4
            [0.5, 0.6, 0.4, 0.3, 0.1, 0.2],  # best own (0.3) beaten by 0.5,0.6,0.4 -> rank 3
        ]
    )
    i2t, t2i = retrieval_ranks(sim, owner)
    assert i2t.tolist() == [0, 4, 3]
    # caption columns: c0 [0.1,0.7,0.5] true 0 -> 2; c1 [0.9,.1,.6] -> 0; c2 [.8,.2,.4] true 1 -> 2;
    # c3 [0,.9,.3] true 2 -> 1; c4 [.2,.8,.1] true 2 -> 2; c5 [.3,.6,.2] true 2 -> 2
    assert t2i.tolist() == [2, 0, 2, 1, 2, 2]
    m = metrics_from_ranks(i2t, t2i)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == pytest.approx(100.0)
    assert m["t2i_r1"] == pytest.approx(100 / 6)
    assert m["t2i_r5"] == pytest.approx(100.0)
    assert m["i2t_medr"] == 4.0  # median of [0,4,3] = 3 -> 4 (1-based)
    assert m["t2i_medr"] == 3.0  # median of [0,1,2,2,2,2] = 2 -> 3
    assert m["i2t_meanr"] == pytest.approx(7 / 3 + 1)
    assert m["t2i_meanr"] == pytest.approx(9 / 6 + 1)
    assert m["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 100 / 6 + 100 + 100)


def test_bad_caption_map_is_rejected() -> None:
    sim = torch.randn(3, 6)
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_ranks(sim, torch.tensor([0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_ranks(sim, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="pass caption_to_image"):
        retrieval_ranks(torch.randn(3, 7))


def test_fold_slicing_matches_coco_protocol() -> None:
    owner = captions_per_image_map(5000, 5)
    folds = fold_indices(owner, 5000, 1000)
    assert len(folds) == 5
    for k, (images, captions) in enumerate(folds):
        assert images.tolist() == list(range(1000 * k, 1000 * k + 1000))
        assert captions.tolist() == list(range(5000 * k, 5000 * k + 5000))


def test_folds_mean_equals_per_fold_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    n, fold = 60, 20
    owner = captions_per_image_map(n, 5)
    images = torch.randn(n, 8, generator=gen)
    texts = images[owner] + torch.randn(5 * n, 8, generator=gen)
    result = evaluate_embeddings(images, texts, owner, fold_size=fold, chunk_size=16)
    assert len(result["folds"]) == 3
    refs = [
        naive_metrics(
            (images[k * fold : (k + 1) * fold] @ texts[5 * k * fold : 5 * (k + 1) * fold].T).numpy(),
            captions_per_image_map(fold, 5).numpy(),
        )
        for k in range(3)
    ]
    for key in result["full"]:
        assert result["folds_mean"][key] == pytest.approx(sum(r[key] for r in refs) / 3, abs=1e-4)
    full_ref = naive_metrics((images @ texts.T).numpy(), owner.numpy())
    assert result["full"]["rsum"] == pytest.approx(full_ref["rsum"], abs=1e-4)
    # fewer images than two folds: no fold entries
    assert "folds" not in evaluate_embeddings(images[:20], texts[:100], owner[:100], fold_size=20)


class RecordingMatrix:
    """A similarity matrix that records the size of every block read from it."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values, self.shape, self.blocks = values, values.shape, []

    def __getitem__(self, index: object) -> torch.Tensor:
        block = self.values[index]
        self.blocks.append(tuple(block.shape))
        return block


def test_scores_are_read_one_chunk_of_queries_at_a_time() -> None:
    sim = torch.randn(40, 200)
    recording = RecordingMatrix(sim)
    i2t, t2i = retrieval_ranks(recording, chunk_size=16)
    ref_i2t, ref_t2i = retrieval_ranks(sim, chunk_size=1000)
    assert torch.equal(i2t, ref_i2t) and torch.equal(t2i, ref_t2i)
    assert max(rows * cols for rows, cols in recording.blocks) <= 16 * 200
    assert len(recording.blocks) == 3 + 13  # ceil(40/16) image chunks + ceil(200/16) caption chunks


def test_ties_rank_the_true_item_after_every_equal_score() -> None:
    # image 0 owns captions 0, 1; image 1 owns caption 2
    owner = torch.tensor([0, 0, 1])
    sim = torch.tensor(
        [
            [0.5, 0.5, 0.5],  # both own captions tie with caption 2 -> rank 1 (caption 2 first)
            [0.9, 0.2, 0.9],  # own caption 2 ties with caption 0 -> rank 1
        ]
    )
    i2t, t2i = retrieval_ranks(sim, owner)
    assert i2t.tolist() == [1, 1]
    # columns: c0 [0.5, 0.9] true 0 -> 1; c1 [0.5, 0.2] -> 0; c2 [0.5, 0.9] true 1 -> 0 (no tie)
    assert t2i.tolist() == [1, 0, 0]
    tied = torch.tensor([[0.3, 0.3, 0.3], [0.3, 0.3, 0.3]])
    i2t, t2i = retrieval_ranks(tied, owner)
    assert i2t.tolist() == [1, 2] and t2i.tolist() == [1, 1, 1]  # everyone else ranks above


def _chance_rsum(n_images: int, per_image: int) -> float:
    """Expected RSUM of scores in random order: R@K = K/n_images (t2i), about per_image*K/n_captions (i2t)."""
    t2i = sum(min(k / n_images, 1.0) for k in KS)
    i2t = sum(min(1.0, 1 - math.comb(n_images * per_image - per_image, k) / math.comb(n_images * per_image, k))
              for k in KS)  # fmt: skip
    return 100 * (t2i + i2t)


@pytest.mark.parametrize("kind", ["zeros", "constant", "one-direction"])
def test_degenerate_embeddings_score_no_better_than_chance(kind: str) -> None:
    n_images, per_image = 40, 5
    owner = captions_per_image_map(n_images, per_image)
    if kind == "zeros":
        images, texts = torch.zeros(n_images, 8), torch.zeros(n_images * per_image, 8)
    elif kind == "constant":
        images, texts = torch.full((n_images, 8), 0.25), torch.full((n_images * per_image, 8), 0.25)
    else:  # a collapsed model: every embedding is the same unit vector
        images = torch.nn.functional.normalize(torch.ones(n_images, 8), dim=-1)
        texts = torch.nn.functional.normalize(torch.ones(n_images * per_image, 8), dim=-1)
    result = retrieval_metrics(caption_to_image=owner, image_embeds=images, text_embeds=texts, chunk_size=16)
    assert result["rsum"] <= _chance_rsum(n_images, per_image)  # it was a perfect 600 when ties were hits
    assert result["t2i_medr"] == n_images and result["i2t_medr"] == n_images * per_image - per_image + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_an_error(bad: float) -> None:
    owner = captions_per_image_map(6, 5)
    images, texts = torch.randn(6, 8), torch.randn(30, 8)
    images[2, 3] = bad
    with pytest.raises(NonFiniteScoresError, match=r"NaN or infinite.*embeddings are not finite"):
        retrieval_metrics(caption_to_image=owner, image_embeds=images, text_embeds=texts)
    nan_everywhere = torch.full((6, 30), float("nan"))
    with pytest.raises(NonFiniteScoresError):
        retrieval_ranks(nan_everywhere, owner)  # a NaN compared false with all: it ranked first before


def test_evaluate_names_a_checkpoint_whose_weights_are_nan(tmp_path: Path, capsys) -> None:
    """`temde-hf evaluate` on a checkpoint with NaN projection weights: one line naming the folder and what
    to do; no metrics written."""
    from safetensors.torch import load_file, save_file

    from temde_hf.cli import main
    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.testing import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "nan-ckpt", seed=0)
    weights = load_file(checkpoint / "model.safetensors")
    projections = [key for key in weights if "projection" in key]
    assert projections
    for key in projections:
        weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    data = make_synthetic_karpathy(tmp_path / "syn", n_images=6, seed=0)
    out = tmp_path / "eval"
    assert (
        main(["evaluate", str(checkpoint), "--data", str(data), "--split", "all", "--output-dir", str(out)])
        == 1
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("temde-hf")]  # progress bars aside
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"temde-hf evaluate: error: {checkpoint}: cannot be evaluated")
    assert "NaN or infinite" in lines[0] and "earlier checkpoint" in lines[0]
    assert not (out / "metrics.json").exists()


def test_training_evaluation_of_a_diverged_model_names_the_run_and_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trainer's evaluation (and so its best-checkpoint rule) refuses NaN scores with the run folder
    and the step, instead of keeping a perfect-looking model as best."""
    from types import SimpleNamespace

    from temde_hf.training import loop
    from temde_hf.training.checkpointing import TrainerState

    def diverged_evaluate(*args, **kwargs) -> dict[str, float]:  # what `evaluate` scores for a NaN model
        embeds = torch.full((4, 8), float("nan"))
        return retrieval_metrics(caption_to_image=torch.arange(4), image_embeds=embeds, text_embeds=embeds)

    monkeypatch.setattr(loop, "evaluate", diverged_evaluate)
    args = SimpleNamespace(
        per_device_eval_batch_size=2, output_dir="runs/diverged", metric_for_best_model="rsum"
    )
    trained = loop.TrainingModel(model=None, processor=None, accelerator=None)
    state = TrainerState(global_step=12)
    with pytest.raises(
        NonFiniteScoresError,
        match=r"runs/diverged: the model at step 12 cannot be evaluated: .*NaN or infinite.*not kept as best.*--resume",
    ):
        loop._evaluate_and_track(trained, args, None, state, in_warmup=False)
    assert state.best_metric is None and state.log_history == []
