"""Two-stage retrieval: a reranker only reorders the stage-1 candidates, and `temde-hf evaluate --rerank`
with K = the gallery size equals ranking by the reranker's scores over every pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from temde_hf.data import caption_to_image, load_karpathy, make_synthetic_karpathy
from temde_hf.evaluation.cli import main as evaluate_main
from temde_hf.evaluation.metrics import metrics_from_ranks, retrieval_ranks
from temde_hf.evaluation.rerank import two_stage_ranks
from temde_hf.inference.rerank import RERANKERS, build_reranker, fuse_scores, rerank_candidates
from temde_hf.inference.tokens import TokenSet, encode_token_sets
from temde_hf.loading import load_checkpoint
from temde_hf.testing import save_tiny_checkpoint, tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "retrieval", matching_head=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_karpathy(tmp_path_factory.mktemp("syn"), n_images=12, seed=5)


def _token_set(lengths: list[int], width: int, seed: int) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return TokenSet(torch.randn(len(lengths), width, 16, generator=g).half(), mask)


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_rerank_keeps_the_candidates_and_orders_them_by_score(name: str) -> None:
    from temde_hf import TemdeForImageTextRetrieval

    torch.manual_seed(0)
    reranker = build_reranker(name, TemdeForImageTextRetrieval(tiny_config()).eval())
    images = _token_set([4, 6, 5], width=6, seed=0)
    texts = _token_set([3, 7, 2, 5, 4, 6, 1], width=7, seed=1)
    candidates = torch.stack(
        [torch.randperm(7, generator=torch.Generator().manual_seed(q))[:5] for q in range(3)]
    )
    reordered, scores = rerank_candidates(
        reranker, images, torch.arange(3), texts, candidates, query_is_image=True
    )
    for q in range(3):
        assert sorted(reordered[q].tolist()) == sorted(candidates[q].tolist())  # the set never changes
        assert torch.all(scores[q, :-1] >= scores[q, 1:])
        direct = reranker.score_pairs(images, torch.full((5,), q), texts, reordered[q])
        torch.testing.assert_close(scores[q], direct)
    assert not torch.equal(reordered, candidates)  # it does reorder
    # caption -> image queries go through the same scores with the roles swapped
    back, back_scores = rerank_candidates(
        reranker, texts, torch.tensor([2]), images, torch.tensor([[2, 0, 1]]), False
    )
    assert sorted(back[0].tolist()) == [0, 1, 2]
    torch.testing.assert_close(
        back_scores[0], reranker.score_pairs(images, back[0], texts, torch.full((3,), 2))
    )


def test_fusion_with_a_large_stage_one_weight_keeps_the_stage_one_order() -> None:
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(8, 5, generator=g), torch.randn(24, 5, generator=g)
    c2i = torch.arange(8).repeat_interleave(3)
    random_scores = lambda rows, candidates: torch.randn(candidates.shape, generator=g)  # noqa: E731
    expected_i2t, _ = retrieval_ranks(caption_to_image=c2i, image_embeds=images, text_embeds=texts)
    truth = lambda r: c2i[None, :] == r[:, None]  # noqa: E731
    fused = two_stage_ranks(images, texts, truth, random_scores, k=10, stage1_weight=1e6)
    alone = two_stage_ranks(images, texts, truth, random_scores, k=10)
    assert torch.equal(fused, expected_i2t) and not torch.equal(alone, expected_i2t)
    # the search-side helper: same candidates, reordered by the fused score
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    stage1 = torch.tensor([[3.0, 1.0, 2.0]])
    z = lambda x: (x - x.mean()) / x.std(correction=0)  # noqa: E731
    torch.testing.assert_close(fuse_scores(scores, stage1, 0.5), z(scores) + 0.5 * z(stage1))
    assert torch.equal(fuse_scores(scores, stage1, 0.0), scores)


def test_two_stage_with_one_candidate_is_stage_one() -> None:
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(8, 5, generator=g), torch.randn(24, 5, generator=g)
    c2i = torch.arange(8).repeat_interleave(3)
    random_scores = lambda rows, candidates: torch.randn(candidates.shape, generator=g)  # noqa: E731
    i2t = two_stage_ranks(
        images, texts, lambda r: c2i[None, :] == r[:, None], random_scores, k=1, chunk_size=3
    )
    t2i = two_stage_ranks(
        texts, images, lambda r: c2i[r][:, None] == torch.arange(8)[None, :], random_scores, k=1
    )
    expected_i2t, expected_t2i = retrieval_ranks(caption_to_image=c2i, image_embeds=images, text_embeds=texts)
    assert torch.equal(i2t, expected_i2t) and torch.equal(t2i, expected_t2i)


def test_token_sets_are_the_dataset_pass_of_encode_dataset_in_eval_mode(synthetic: Path) -> None:
    # one dataset pass (`encode_dataset_batches`) for embeddings and tokens: same embeddings, dropout
    # off while encoding (the model comes in training mode), and the mode given back
    from temde_hf.inference.encode import encode_dataset
    from temde_hf.testing import tiny_model, tiny_processor

    torch.manual_seed(0)
    model, processor, dataset = tiny_model(dropout=0.5), tiny_processor(), load_karpathy(synthetic)
    expected_images, expected_texts = encode_token_sets(model, processor, dataset, batch_size=5)
    image_embeds, text_embeds, _ = encode_dataset(model, processor, dataset, batch_size=5)
    model.train()
    images, texts = encode_token_sets(model, processor, dataset, batch_size=5)
    assert model.training
    assert torch.equal(images.tokens, expected_images.tokens) and torch.equal(texts.mask, expected_texts.mask)
    assert torch.equal(texts.tokens, expected_texts.tokens)
    pixel_values = processor.image_processor(images=[dataset[7]["image"]], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.inference_mode():
        out = model.eval().get_image_features(pixel_values=pixel_values)
    torch.testing.assert_close(image_embeds[7], out.pooler_output[0], rtol=1e-4, atol=1e-5)
    length = int(images.mask[7].sum())
    torch.testing.assert_close(
        images.tokens[7, :length].float(), out.token_embeds[0, :length], rtol=2e-3, atol=2e-3
    )
    assert text_embeds.shape[0] == len(texts)


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_evaluate_with_k_equal_to_the_gallery_is_full_rescoring(
    name: str, checkpoint: Path, synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [
        str(checkpoint),
        "--data",
        str(synthetic),
        "--split",
        "all",
        "--rerank",
        name,
        "--latency-queries",
        "3",
        "--rerank-fusion",
        "0",  # stage 2 alone (the default fuses it with stage 1)
    ]
    from temde_hf.inference import encode

    passes = []  # the image passes over the dataset: stage 1 and stage 2 share one
    iter_image_features = encode.iter_image_features
    monkeypatch.setattr(
        encode, "iter_image_features", lambda *a, **k: passes.append(1) or iter_image_features(*a, **k)
    )
    result = evaluate_main([*argv, "--rerank-k", "60", "--output-dir", str(tmp_path / "all")])  # 60 captions
    assert len(passes) == 1
    monkeypatch.undo()
    plain = evaluate_main([*argv[:-6], "--output-dir", str(tmp_path / "plain")])  # no --rerank: stage 1 alone
    assert result["full"] == plain["full"]  # the pass that keeps the tokens gives the same embeddings
    # the reference: the reranker's score of every (image, caption), ranked as usual
    model, processor = load_checkpoint(checkpoint, with_matching_head=True)
    dataset = load_karpathy(synthetic)
    images, texts = encode_token_sets(model, processor, dataset)
    reranker = build_reranker(name, model)
    rows, cols = torch.meshgrid(torch.arange(12), torch.arange(60), indexing="ij")
    full = reranker.score_pairs(images, rows.flatten(), texts, cols.flatten()).reshape(12, 60)
    i2t, t2i = retrieval_ranks(full, caption_to_image(dataset))
    expected = metrics_from_ranks(i2t, t2i)
    assert result["rerank"]["k"] == 60
    assert result["rerank"]["full"] == pytest.approx(expected, abs=1e-9)
    assert result["rerank"]["full"]["rsum"] != pytest.approx(
        result["full"]["rsum"]
    )  # stage 2 changed the order
    written = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert set(written["rerank"]["latency_ms"]) == {"stage1_i2t", "stage2_i2t", "stage1_t2i", "stage2_t2i"}
    assert (
        written["rerank"]["token_dtype"] == "float16"
        and written["rerank"]["token_bytes_per_image"] == 17 * 16 * 2
    )


def test_itm_rerank_refuses_a_checkpoint_without_a_head(synthetic: Path, tmp_path: Path) -> None:
    plain = save_tiny_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="has no trained matching head"):
        evaluate_main(
            [str(plain), "--data", str(synthetic), "--rerank", "itm", "--output-dir", str(tmp_path / "e")]
        )
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_a_reranker_is_a_scorer_of_the_model_folder() -> None:
    # the scoring is defined once, in the model folder (it ships as remote code); a reranker wraps it
    from temde_hf import TemdeForImageTextRetrieval
    from temde_hf.inference.rerank import Reranker
    from temde_hf.models.temde.alignment_temde import paired_alignment_scores

    torch.manual_seed(0)
    model = TemdeForImageTextRetrieval(tiny_config(alignment_aggregation="symmetric")).eval()
    images = _token_set([4, 6, 5], width=6, seed=0)
    texts = _token_set([3, 7, 2], width=7, seed=1)
    ids = torch.arange(3)
    image_tokens, image_mask = images.take(ids)
    text_tokens, text_mask = texts.take(ids)
    with torch.inference_mode():
        expected = {
            "alignment": paired_alignment_scores(
                image_tokens, image_mask, text_tokens, text_mask, "symmetric"
            ),
            "itm": model.get_matching_logits(image_tokens, image_mask, text_tokens, text_mask),
        }
    for name, scores in expected.items():
        torch.testing.assert_close(build_reranker(name, model).score_pairs(images, ids, texts, ids), scores)

    class SetsAScorer(Reranker):  # no score method of its own
        scorer = staticmethod(paired_alignment_scores)

    torch.testing.assert_close(
        SetsAScorer(model).score_pairs(images, ids, texts, ids),
        paired_alignment_scores(image_tokens, image_mask, text_tokens, text_mask),
    )
    with pytest.raises(NotImplementedError, match="sets no scorer"):
        Reranker(model).score(image_tokens, image_mask, text_tokens, text_mask)


@pytest.fixture
def mean_token_reranker():
    from temde_hf.inference.rerank import Reranker

    @RERANKERS.register("mean_token_test")
    class MeanTokenReranker(Reranker):
        """Cosine of the masked mean tokens: one decorated class, registered from outside the package."""

        def score(self, image_tokens, image_mask, text_tokens, text_mask) -> torch.Tensor:
            return torch.nn.functional.cosine_similarity(
                _masked_mean(image_tokens, image_mask), _masked_mean(text_tokens, text_mask), dim=-1
            )

    yield MeanTokenReranker
    del RERANKERS["mean_token_test"]


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()[..., None]
    return (tokens.float() * mask).sum(-2) / mask.sum(-2)


def test_a_registered_reranker_is_offered_by_evaluate(
    mean_token_reranker, checkpoint: Path, synthetic: Path, tmp_path: Path
) -> None:
    result = evaluate_main([
        str(checkpoint), "--data", str(synthetic), "--split", "all", "--rerank", "mean_token_test",
        "--rerank-k", "60", "--rerank-fusion", "0", "--latency-queries", "2", "--output-dir", str(tmp_path / "e"),
    ])  # fmt: skip
    model, processor = load_checkpoint(checkpoint)
    dataset = load_karpathy(synthetic)
    images, texts = encode_token_sets(model, processor, dataset)
    image_means = _masked_mean(images.tokens, images.mask)  # (12, D)
    text_means = _masked_mean(texts.tokens, texts.mask)  # (60, D)
    full = (
        torch.nn.functional.normalize(image_means, dim=-1)
        @ torch.nn.functional.normalize(text_means, dim=-1).T
    )
    expected = metrics_from_ranks(*retrieval_ranks(full, caption_to_image(dataset)))
    assert result["rerank"]["full"] == pytest.approx(expected, abs=1e-9)
    with pytest.raises(
        ValueError, match=r"--rerank 'nope' is not supported; choose one of .*mean_token_test"
    ):
        build_reranker("nope", model)
