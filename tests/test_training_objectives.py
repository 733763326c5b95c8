"""The trainer's second-stage objectives (alignment, matching head with mined hard negatives,
distillation): exact under gradient caching and across two processes, and trained by the real `main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForPreTraining

from temde_hf import TemdeForImageTextRetrieval
from temde_hf.testing import launch_ddp_worker, tiny_batch, tiny_config
from temde_hf.training.accumulation import encode_batch, forward_backward
from temde_hf.training.arguments import parse_args
from temde_hf.training.batches import split_micro_batches
from temde_hf.training.initialization import freeze_unused_parameters
from temde_hf.training.losses import contrastive_loss
from temde_hf.training.objectives import TrainingObjective, mine_hard_negatives

# name -> objective settings (weights of the terms on top of InfoNCE)
OPTIONS = {
    "alignment_hinge": {"alignment_weight": 0.5},
    "alignment_info_nce_sum": {"alignment_weight": 0.5, "alignment_loss_type": "info_nce"},
    "itm_sampled": {"itm_weight": 1.0},
    "itm_hardest_detached": {"itm_weight": 1.0, "itm_negatives": "hardest", "itm_detach_tokens": True},
    "distill_alignment": {"distill_weight": 1.0},
    "distill_itm": {"distill_weight": 1.0, "distill_teacher": "itm", "distill_topk": 4},
    "all": {"alignment_weight": 0.3, "itm_weight": 1.0, "distill_weight": 0.5, "distill_teacher": "itm"},
}


def objective(negatives: str = "global", **options: object) -> TrainingObjective:
    base = lambda i, t, s, p: contrastive_loss(i, t, s, p, negatives="local")  # noqa: E731
    return TrainingObjective(base, negatives=negatives, seed=11, **options)


def prepare_case(name: str) -> tuple[torch.nn.Module, dict]:
    """The same model and batch in every process (and in the single-process reference)."""
    torch.manual_seed(0)
    aggregation = "max_sum" if name == "alignment_info_nce_sum" else "max_mean"
    model = TemdeForImageTextRetrieval(tiny_config(alignment_aggregation=aggregation)).train()
    batch = tiny_batch(16, seed=1, n_images=12)  # some images have two captions: pair_ids in play
    freeze_unused_parameters(model, batch, objective("local", **OPTIONS[name]))
    return model, batch


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_gradient_caching_equals_direct_backward_on_the_whole_batch(name: str) -> None:
    torch.set_num_threads(1)
    model, batch = prepare_case(name)
    obj = objective(**OPTIONS[name], aggregation=model.config.alignment_aggregation)
    # reference: one plain forward of all 16 pairs, the live head, one backward (no caching at all)
    model.zero_grad(set_to_none=True)
    enc, _ = encode_batch(model, batch, tokens=True)
    result = obj(enc, batch["pair_ids"], model.get_matching_logits)
    result.loss.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = forward_backward(model, split_micro_batches(batch, 4), obj, Accelerator(cpu=True))
    cached = _grads(model)
    assert float(loss) == pytest.approx(float(result.value), abs=1e-5)
    assert cached.keys() == expected.keys()
    trains_head = OPTIONS[name].get("itm_weight", 0) > 0
    assert any(k.startswith("itm_head.") for k in expected) == trains_head  # a teacher-only head is frozen
    for key, value in expected.items():
        torch.testing.assert_close(cached[key], value, atol=2e-5, rtol=1e-4, msg=key)
    # the term is not vacuous: without it the gradients differ
    model.zero_grad(set_to_none=True)
    forward_backward(model, split_micro_batches(batch, 4), objective(), Accelerator(cpu=True))
    plain = _grads(model)
    assert max((plain.get(k, 0) - expected[k]).abs().max() for k in expected) > 1e-4


def test_head_on_top_leaves_the_dual_encoder_untouched() -> None:
    """``itm_detach_tokens``: the head trains, the dual encoder gets exactly the contrastive gradient."""
    torch.set_num_threads(1)
    model, batch = prepare_case("itm_hardest_detached")
    micro = split_micro_batches(batch, 2)
    model.zero_grad(set_to_none=True)
    forward_backward(model, micro, objective(**OPTIONS["itm_hardest_detached"]), Accelerator(cpu=True))
    with_head = _grads(model)
    model.zero_grad(set_to_none=True)
    forward_backward(model, micro, objective(), Accelerator(cpu=True))
    alone = _grads(model)
    assert any(k.startswith("itm_head.") for k in with_head)
    for key, value in alone.items():
        torch.testing.assert_close(with_head[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_mined_negatives_are_never_positives() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6, generator=g)
    pair_ids = torch.tensor([0, 0, 1, 2, 3, 3])
    positives = pair_ids[:, None] == pair_ids[None, :]
    hardest_text, hardest_image = mine_hard_negatives(logits, positives, "hardest", g)
    masked = logits.masked_fill(positives, float("-inf"))
    assert torch.equal(hardest_text, masked.argmax(1)) and torch.equal(hardest_image, masked.argmax(0))
    for _ in range(50):
        texts, images = mine_hard_negatives(logits, positives, "sample", g)
        assert not positives[torch.arange(6), texts].any() and not positives[images, torch.arange(6)].any()
    with pytest.raises(ValueError, match="at least two images"):
        mine_hard_negatives(logits[:2, :2], torch.ones(2, 2, dtype=torch.bool), "sample", g)


def test_bad_settings_are_named() -> None:
    base = ["--model_config", "x.json", "--synthetic_images", "4"]
    for flags, message in [
        (["--itm_weight", "-1"], "--itm_weight"),
        (["--alignment_loss_type", "triplet"], "--alignment_loss_type"),
        (["--distill_teacher", "cross"], "--distill_teacher"),
        (["--distill_topk", "1"], "--distill_topk"),
        (["--itm_negatives", "easy"], "--itm_negatives"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_args([*base, *flags])


WORKER = """
from test_training_objectives import OPTIONS, objective, prepare_case
from temde_hf.training.accumulation import forward_backward
from temde_hf.training.batches import split_micro_batches

for name, n_micro in {cases!r}:
    model, batch = prepare_case(name)
    wrapped = accelerator.prepare(model)
    local = {{k: v[rank * 8 : (rank + 1) * 8] for k, v in batch.items()}}
    for step in range(2):  # a second step: DDP fails there if a parameter missed the first reduction
        model.zero_grad(set_to_none=True)
        obj = objective(**OPTIONS[name], aggregation=model.config.alignment_aggregation)
        loss = forward_backward(wrapped, split_micro_batches(local, n_micro), obj, accelerator)
    save_rank_result(name, model, loss)
"""
# (options, micro-batches per process): the head through DDP with and without accumulation, every term
CASES = [("itm_sampled", 1), ("all", 2)]


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    launch_ddp_worker(WORKER.format(cases=CASES), tmp_path, sys_path=[Path(__file__).parent])
    for name, n_micro in CASES:
        model, batch = prepare_case(name)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            obj = objective(**OPTIONS[name], aggregation=model.config.alignment_aggregation)
            loss = forward_backward(
                model, split_micro_batches(batch, 2 * n_micro), obj, Accelerator(cpu=True)
            )
        expected = _grads(model)
        grads = [load_file(tmp_path / f"{name}_rank{r}.safetensors") for r in (0, 1)]
        assert grads[0].keys() == expected.keys() and any(k.startswith("itm_head.") for k in expected)
        for key, value in expected.items():
            assert torch.equal(grads[0][key], grads[1][key]), key  # DDP's all-reduce: processes agree
            torch.testing.assert_close(grads[0][key], value, atol=2e-5, rtol=1e-4, msg=f"{name}: {key}")
        for r in (0, 1):
            logged = json.loads((tmp_path / f"{name}_rank{r}.json").read_text())["loss"]
            assert logged == pytest.approx(float(loss), abs=1e-5)


@pytest.mark.slow
def test_main_trains_a_retrieval_model_that_evaluate_reranks(tmp_path: Path) -> None:
    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.evaluation.cli import main as evaluate_main
    from temde_hf.testing import save_tiny_towers
    from temde_hf.training.train import main

    torch.set_num_threads(1)
    vision, text = save_tiny_towers(tmp_path / "towers")
    data = make_synthetic_karpathy(tmp_path / "data", n_images=20, seed=0)
    out = tmp_path / "run"
    metrics = main([
        "--vision_model_path", str(vision), "--text_model_path", str(text), "--projection_dim", "16",
        "--n_sketches", "4", "--n_hyperplanes", "3", "--itm_layers", "1", "--data", str(data),
        "--output_dir", str(out), "--per_device_train_batch_size", "8", "--gradient_cache_micro_batches", "2",
        "--max_steps", "3", "--learning_rate", "2e-3", "--report_to", "none", "--disable_tqdm", "true",
        "--freeze_vision_tower", "true", "--itm_weight", "1", "--alignment_weight", "0.5",
        "--distill_weight", "0.5", "--distill_teacher", "itm", "--max_eval_images", "4",
    ])  # fmt: skip
    assert metrics["global_step"] == 3 and metrics["train_loss"] > 0
    final = out / "final"
    model = AutoModelForPreTraining.from_pretrained(final)
    assert type(model) is TemdeForImageTextRetrieval and model.config.itm_layers == 1
    fresh = TemdeForImageTextRetrieval(model.config)  # the head moved away from any initialisation
    assert not torch.equal(model.itm_head.classifier.weight, fresh.itm_head.classifier.weight)
    result = evaluate_main([str(final), "--data", str(data), "--split", "val", "--rerank", "itm", "--rerank-k", "3",
                            "--latency-queries", "2"])  # fmt: skip
    assert result["rerank"]["reranker"] == "itm" and 0 <= result["rerank"]["full"]["rsum"] <= 600
