"""Pieces of the trainer: settings parsing, the seeded sampler, freezing, parameter groups, schedules,
and the checkpoint folder rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from temde_hf import TemdeModel
from temde_hf.testing import tiny_config, tiny_model
from temde_hf.training.arguments import parse_args, trainable_layers
from temde_hf.training.batches import EpochBatchSampler, epoch_pairs
from temde_hf.training.checkpointing import check_output_dir, list_checkpoints, resolve_resume
from temde_hf.training.optim import (
    build_param_groups,
    freeze_towers,
    frozen_tower_names,
    train_mode,
)
from temde_hf.training.steps import BatchPlan, PairBatches

CAPTION_TO_IMAGE = torch.arange(10).repeat_interleave(2)  # 10 images x 2 captions = 20 pairs


def _args(*flags: str):
    return parse_args(["--model_config", "x", "--synthetic_images", "4", *flags])


def test_config_file_then_cli_flags(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n  model_config: cfg.json\ndata:\n  synthetic_images: 10\n"
        "training:\n  learning_rate: 0.5\n  per_device_train_batch_size: 4\n"
    )
    model_args, data_args, args = parse_args([str(config), "--learning_rate", "0.25"])
    assert args.learning_rate == 0.25  # the flag wins over the file
    assert args.per_device_train_batch_size == 4 and data_args.synthetic_images == 10
    assert model_args.model_config == "cfg.json"
    config.write_text("model_config: cfg.json\nsynthetic_images: 4\nlearning_rat: 1.0\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args([str(config)])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--loss_type", "triplet"),
            r"--loss_type 'triplet' is not supported; choose one of info_nce, vse_hinge",
        ),
        (("--sampling", "captions"), r"--sampling 'captions'"),
        (("--cv_folds", "1"), r"--cv_folds must be 0"),
        (("--cv_folds", "5", "--cv_fold", "5"), r"--cv_fold 5 must be in 0 .. 4"),
        (("--text_trainable_layers", "-1"), r"--text_trainable_layers -1 must be a finite number >= 0"),
        (("--feature_cache_dtype", "int8"), r"--feature_cache_dtype 'int8'"),
    ],
)
def test_bad_settings_name_the_flag(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _args(*flags)


def test_sampler_shards_one_global_order_and_resumes() -> None:
    full = list(EpochBatchSampler(CAPTION_TO_IMAGE, 4, seed=3, epoch=1))
    ranks = [
        list(EpochBatchSampler(CAPTION_TO_IMAGE, 2, rank=r, world_size=2, seed=3, epoch=1)) for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*ranks)] == full  # process r holds the r-th half of each global batch
    assert list(EpochBatchSampler(CAPTION_TO_IMAGE, 4, seed=3, epoch=1, skip_batches=2)) == full[2:]
    assert list(EpochBatchSampler(CAPTION_TO_IMAGE, 4, seed=3, epoch=2)) != full
    assert sorted(i for batch in full for i in batch) == list(range(20))  # every pair once


def test_batch_plan_draws_each_step_and_splits_it_into_contrastive_and_micro_batches() -> None:
    """10 pairs per forward, 2 micro-batches per contrastive batch (gradient caching), 3 contrastive
    batches per optimizer step (accumulation): 60 pairs per process per step, cut in that order."""
    flags = ("--per_device_train_batch_size", "10", "--gradient_cache_micro_batches", "2",
             "--gradient_accumulation_steps", "3", "--seed", "5")  # fmt: skip
    plan = BatchPlan.from_args(_args(*flags)[2])
    assert (plan.micro_batch_size, plan.contrastive_batch_size, plan.step_size) == (10, 20, 60)
    c2i = torch.arange(65).repeat_interleave(2)  # 130 pairs: 2 steps of 60, the last 10 pairs dropped
    pairs = PairBatches(plan, c2i, lambda items: {"pair_ids": torch.as_tensor(items)})
    assert pairs.steps_per_epoch == 2
    steps = [plan.split(batch) for batch in pairs.epoch(0)]
    sizes = [[[len(micro["pair_ids"]) for micro in contrastive] for contrastive in step] for step in steps]
    assert sizes == [[[10, 10], [10, 10], [10, 10]]] * 2
    # the cuts keep the drawn order: micro-batches, then contrastive batches, then steps, one after another
    flat = [
        i
        for step in steps
        for contrastive in step
        for micro in contrastive
        for i in micro["pair_ids"].tolist()
    ]
    order = epoch_pairs(c2i, "pairs", seed=5, epoch=0)
    assert flat == order[:120] and len(set(order[120:]) & set(flat)) == 0
    # resume mid-epoch: the second step only, the same pairs; the next epoch draws another order
    resumed = [plan.split(batch) for batch in pairs.epoch(0, skip_steps=1)]
    assert [m["pair_ids"].tolist() for c in resumed[0] for m in c] == [
        m["pair_ids"].tolist() for c in steps[1] for m in c
    ]
    assert next(iter(pairs.epoch(1)))["pair_ids"].tolist() != flat[:60]
    # two processes: each holds its consecutive slice of one global step of 120 pairs (one step per epoch)
    ranks = [BatchPlan(10, 2, 3, rank=r, world_size=2, seed=5) for r in (0, 1)]
    global_step = [i for rank in ranks for i in next(iter(rank.sampler(c2i)))]
    assert global_step == order[:120] and ranks[0].sampler(c2i).steps_per_epoch == 1


def test_batch_plan_refuses_a_contrastive_batch_of_one_pair() -> None:
    args = _args("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4")[2]
    with pytest.raises(ValueError, match=r"--per_device_train_batch_size 1 x 1 process\(es\): .*no negative"):
        BatchPlan.from_args(args)
    assert BatchPlan.from_args(args, world_size=2).step_size == 4  # two processes: 2 pairs per loss


def test_image_sampling_visits_every_image_once_with_one_caption() -> None:
    for epoch in (0, 1):
        pairs = epoch_pairs(CAPTION_TO_IMAGE, "images", seed=0, epoch=epoch)
        assert sorted(CAPTION_TO_IMAGE[pairs].tolist()) == list(range(10))
    drawn = {p for e in range(8) for p in epoch_pairs(CAPTION_TO_IMAGE, "images", seed=0, epoch=e)}
    assert len(drawn) > 10  # different captions in different epochs
    sampler = EpochBatchSampler(CAPTION_TO_IMAGE, 4, sampling="images")
    assert sampler.steps_per_epoch == 2  # 10 images, batches of 4, the tail dropped


def test_flip_augmentation_draws_one_view_per_pair_and_epoch() -> None:
    items = epoch_pairs(CAPTION_TO_IMAGE, "pairs", seed=0, epoch=0, n_views=2)
    assert sorted(i // 2 for i in items) == list(range(20))  # every pair once
    assert {i % 2 for i in items} == {0, 1}  # both views drawn
    assert items != epoch_pairs(CAPTION_TO_IMAGE, "pairs", seed=0, epoch=1, n_views=2)
    without = epoch_pairs(CAPTION_TO_IMAGE, "pairs", seed=0, epoch=0)
    assert [i // 2 for i in items] == without  # the views do not change the pair order


def test_param_groups_freeze_and_schedule() -> None:
    model = tiny_model()
    args = _args("--learning_rate", "1.0", "--vision_lr_multiplier", "0.1", "--text_lr_multiplier", "0.5",
                 "--freeze_vision_tower", "true")[2]  # fmt: skip
    freeze_towers(model, trainable_layers(args))
    assert frozen_tower_names(model) == ["vision"]
    groups = {g["name"]: g for g in build_param_groups(model, args)}
    assert not any(name.startswith("vision/") for name in groups)
    assert groups["text/decay"]["lr"] == 0.5 and groups["head/decay"]["lr"] == 1.0
    assert any(p is model.logit_scale for p in groups["head/no_decay"]["params"])
    train_mode(model)
    assert not model.vision_model.training and model.text_model.training and model.training


def test_trainable_layers_train_the_top_of_a_tower() -> None:
    config = tiny_config()
    config.text_config.num_hidden_layers = 3
    model = TemdeModel(config)
    freeze_towers(model, {"vision": None, "text": 1})
    trainable = {n for n, p in model.text_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.layer.2.", "pooler.")) for n in trainable)
    assert all(p.requires_grad for p in model.vision_model.parameters())
    freeze_towers(model, {"vision": 0, "text": None})
    assert frozen_tower_names(model) == ["vision"]


def test_batch_norm_stays_in_eval_mode() -> None:
    model = tiny_model()
    model.visual_projection = torch.nn.Sequential(torch.nn.BatchNorm1d(4))  # any BatchNorm in the model
    train_mode(model, freeze_batch_norm=True)
    assert model.training and not model.visual_projection[0].training
    train_mode(model, freeze_batch_norm=False)
    assert model.visual_projection[0].training


@pytest.mark.parametrize("name", ["tiny_synthetic", "flickr30k", "coco", "flickr8k_demo"])
def test_example_configs_parse(name: str) -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / f"{name}.yaml"
    model_args, _, args = parse_args([str(path), "--vision_model_path", "v", "--text_model_path", "t"])
    assert model_args.config_overrides()["sketch_fusion"] in ("concat", "replace", "none")
    assert args.per_device_train_batch_size >= 16 and args.output_dir.startswith("outputs/")


def test_resume_ignores_half_written_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "checkpoints"
    for name in ("step-00000002", "step-00000010", ".tmp-step-00000012", "step-00000011"):
        (root / name).mkdir(parents=True)
    for name in ("step-00000002", "step-00000010"):  # step-11 was killed before its state was written
        (root / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000010"]
    assert resolve_resume(tmp_path, "latest") == root / "step-00000010"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(root / "step-00000011"))
    with caplog.at_level("WARNING"):
        assert (
            resolve_resume(tmp_path / "fresh", "latest") is None
        )  # a first run with --resume_from_checkpoint true
    assert "holds no complete checkpoint, so this is a new run" in caplog.text


def test_a_new_run_never_replaces_a_finished_one(tmp_path: Path) -> None:
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("weights")
    (tmp_path / "final_metrics.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"--resume_from_checkpoint true.*--overwrite_output_dir true"):
        check_output_dir(tmp_path, resuming=False, overwrite=False)
    assert (tmp_path / "final" / "model.safetensors").is_file()
    check_output_dir(tmp_path, resuming=True, overwrite=False)  # continuing the run is fine
    check_output_dir(tmp_path, resuming=False, overwrite=True)
    assert not (tmp_path / "final").exists() and not (tmp_path / "final_metrics.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own artifacts are removed
    check_output_dir(tmp_path / "new", resuming=False, overwrite=False)  # an empty folder is fine


def test_one_thread_cpu_processes_are_told_the_cores_they_leave_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from temde_hf.training import train

    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    cpu = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    monkeypatch.setattr(train.torch, "get_num_threads", lambda: 1)
    assert train.idle_cpu_cores(cpu) == 3  # accelerate launch's default: one thread of four cores
    assert train.idle_cpu_cores(SimpleNamespace(device=torch.device("cpu"), num_processes=4)) == 0
    assert train.idle_cpu_cores(SimpleNamespace(device=torch.device("cuda"), num_processes=1)) == 0
    monkeypatch.setattr(train.torch, "get_num_threads", lambda: 2)
    assert train.idle_cpu_cores(cpu) == 0  # torch's own choice (physical cores) is left alone
