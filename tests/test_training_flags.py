"""The trainer's command line: numeric ranges, transformers' flag names and meanings, run_clip configs,
schedules from `transformers.get_scheduler`, trackers, the output-folder lock and resume checks."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from temde_hf.testing import tiny_batch, tiny_model
from temde_hf.training import loop
from temde_hf.training.accumulation import forward_backward
from temde_hf.training.arguments import parse_args, save_run_settings
from temde_hf.training.batches import split_micro_batches
from temde_hf.training.checkpointing import (
    OutputDirInUseError,
    ResumeMismatchError,
    check_resume_settings,
    output_dir_lock,
)
from temde_hf.training.losses import contrastive_loss
from temde_hf.training.optim import build_scheduler
from temde_hf.training.steps import BatchPlan
from temde_hf.training.train import build_accelerator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def _args(*flags: str):
    return parse_args(["--model_config", "x", "--synthetic_images", "4", *flags])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--num_train_epochs", "0"), r"--num_train_epochs 0\.0 must be a finite number > 0"),
        (("--num_train_epochs", "nan"), r"--num_train_epochs nan must be a finite number > 0"),
        (("--max_steps", "0"), r"--max_steps 0 must be a finite number >= 1 \(or -1"),
        (("--warmup_steps", "-3"), r"--warmup_steps -3 must be a finite number >= 0"),
        (("--warmup_ratio", "5"), r"--warmup_ratio 5\.0 must be a finite number in \[0, 1\]"),
        (("--max_grad_norm", "nan"), r"--max_grad_norm nan must be a finite number >= 0 \(0: no clipping\)"),
        (("--max_grad_norm", "-1"), r"--max_grad_norm -1\.0 must be"),
        (("--learning_rate", "inf"), r"--learning_rate inf must be a finite number > 0"),
        (("--learning_rate", "0"), r"--learning_rate 0\.0 must be a finite number > 0"),
        (("--adam_beta2", "1"), r"--adam_beta2 1\.0 must be a finite number in \[0, 1\)"),
        (("--adam_epsilon", "0"), r"--adam_epsilon 0\.0 must be"),
        (("--weight_decay", "-0.1"), r"--weight_decay -0\.1 must be"),
        (("--per_device_train_batch_size", "0"), r"--per_device_train_batch_size 0 must be a finite number >= 1"),
        (("--gradient_accumulation_steps", "0"), r"--gradient_accumulation_steps 0 must be"),
        (("--gradient_cache_micro_batches", "0"), r"--gradient_cache_micro_batches 0 must be"),
        (("--per_device_eval_batch_size", "0"), r"--per_device_eval_batch_size 0 must be"),
        (("--logging_steps", "0"), r"--logging_steps 0 must be"),
        (("--save_steps", "-1"), r"--save_steps -1 must be a finite number >= 0 \(0: only at the end\)"),
        (("--save_total_limit", "0"), r"--save_total_limit 0 must be"),
        (("--eval_steps", "-5"), r"--eval_steps -5 must be"),
        (("--lr_step_gamma", "0"), r"--lr_step_gamma 0\.0 must be a finite number in \(0, 1\]"),
        (("--max_logit_scale", "1"), r"--max_logit_scale 1\.0 must be a finite number > 1"),
        (("--margin", "nan"), r"--margin nan must be"),
        (("--vse_warmup_epochs", "-1"), r"--vse_warmup_epochs -1\.0 must be"),
        (("--sketch_init_batches", "-1"), r"--sketch_init_batches -1 must be"),
        (("--distill_topk", "1"), r"--distill_topk 1 must be a finite number >= 2"),
        (("--distill_temperature", "0"), r"--distill_temperature 0\.0 must be"),
        (("--itm_weight", "inf"), r"--itm_weight inf must be"),
        (("--max_train_images", "1"), r"--max_train_images 1 must be a finite number >= 2"),
        (("--max_eval_images", "-1"), r"--max_eval_images -1 must be"),
        (("--max_text_length", "0"), r"--max_text_length 0 must be"),
        (("--dataloader_num_workers", "-2"), r"--dataloader_num_workers -2 must be"),
        (("--stop_after_steps", "0"), r"--stop_after_steps 0 must be"),
        (("--cv_folds", "-2"), r"--cv_folds -2 must be"),
        (("--projection_dim", "0"), r"--projection_dim 0 must be"),
        (("--sketch_chunk_size", "0"), r"--sketch_chunk_size 0 must be"),  # a flag derived from the config
        (("--sketch_temperature", "0"), r"--sketch_temperature 0\.0 must be"),
        (("--lr_scheduler_type", "constant", "--warmup_steps", "5"), r"constant has no warm-up.*constant_with_warmup"),
        (("--lr_scheduler_type", "cosine_annealing"), r"--lr_scheduler_type 'cosine_annealing' is not one of"),
        (("--bf16", "true", "--fp16", "true"), r"--bf16 and --fp16 exclude each other"),
        (("--report_to", "tensorboard,none"), r"'none' cannot be combined"),
        (("--report_to", "visdom"), r"--report_to 'visdom' is not one of"),
    ],
)  # fmt: skip
def test_bad_numbers_and_choices_name_the_flag_and_the_range(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        _args(*flags)
    assert "\n" not in str(caught.value)


def test_a_single_synthetic_image_is_refused() -> None:
    with pytest.raises(ValueError, match=r"--synthetic_images must be >= 2: a contrastive batch needs"):
        parse_args(["--model_config", "x", "--synthetic_images", "1"])


def test_an_uninstalled_tracker_is_one_clear_line() -> None:
    installed = {str(t) for t in get_available_trackers()}
    missing = next(name for name in sorted(LOGGER_TYPE_TO_CLASS) if name not in installed)
    with pytest.raises(
        ValueError, match=rf"--report_to {missing}: the {missing} package is not installed"
    ) as e:
        _args("--report_to", missing)
    assert "\n" not in str(e.value)
    assert _args("--report_to", "all")[2].report_to == "all"
    assert _args("--report_to", "None")[2].report_to == "none"
    assert _args("--report_to", "tensorboard")[2].report_to == "tensorboard"
    assert _args("--report_to", "tensorboard", "tensorboard")[2].report_to == "tensorboard"  # `a b` form


def test_transformers_flag_names_and_deprecated_aliases(caplog: pytest.LogCaptureFixture) -> None:
    args = _args("--resume_from_checkpoint", "true", "--bf16", "true", "--torch_compile_backend", "eager")[2]
    assert args.resume_from_checkpoint == "latest" and args.bf16 and not args.fp16
    assert args.torch_compile  # a backend implies compiling, as in transformers
    assert _args("--resume_from_checkpoint", "false")[2].resume_from_checkpoint is None
    assert _args("--resume_from_checkpoint", "outputs/x/checkpoints/step-2")[2].resume_from_checkpoint == (
        "outputs/x/checkpoints/step-2"
    )
    with caplog.at_level(logging.WARNING):
        old = _args("--resume", "latest", "--mixed_precision", "bf16")[2]
    assert old.resume_from_checkpoint == "latest" and old.resume is None
    assert old.bf16 and old.mixed_precision is None  # recorded under the new names only
    assert "--resume is deprecated" in caplog.text and "--mixed_precision is deprecated" in caplog.text


def test_fp16_on_cpu_is_refused_before_anything_starts() -> None:
    args = _args("--fp16", "true", "--use_cpu", "true")[2]
    with pytest.raises(ValueError, match=r"--fp16 needs a GPU.*--bf16 true"):
        build_accelerator(args)


def test_run_clip_config_maps_its_names_and_names_each_unknown_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # --init_from must name a folder that exists
    (tmp_path / "saved_model").mkdir()
    (tmp_path / "m").mkdir()
    # the keys of transformers' contrastive-image-text example, as a user would bring them
    config = tmp_path / "clip.json"
    config.write_text(
        '{"model_name_or_path": "saved_model", "dataset_name": "user/captions", "image_column": "img",'
        ' "caption_column": "text", "max_seq_length": 32, "do_train": true, "do_eval": false,'
        ' "remove_unused_columns": false, "output_dir": "outputs/clip", "per_device_train_batch_size": 16,'
        ' "learning_rate": 5e-5, "warmup_steps": 0, "weight_decay": 0.1, "overwrite_output_dir": true,'
        ' "freeze_vision_model": true, "push_to_hub": false}'
    )
    with caplog.at_level(logging.WARNING):
        model_args, data_args, args = parse_args([str(config)])
    assert model_args.init_from == "saved_model" and data_args.data == "user/captions"
    assert data_args.loader_kwargs() == {"image_column": "img", "captions_column": "text"}
    assert data_args.max_text_length == 32 and data_args.eval_split == "none"  # do_eval false
    assert args.per_device_train_batch_size == 16 and args.learning_rate == 5e-5
    assert args.weight_decay == 0.1 and args.overwrite_output_dir and args.freeze_vision_tower
    assert "do_train ignored" in caplog.text and "remove_unused_columns ignored" in caplog.text
    # keys with no meaning here: one line each, naming the key (and the fix where there is one)
    config = tmp_path / "clip.yaml"
    config.write_text(
        "dataset_name: user/captions\nmodel_name_or_path: m\nvalidation_file: val.csv\n"
        "max_train_samples: 100\nevaluation_strategy: steps\n"
    )
    with pytest.raises(ValueError) as caught:
        parse_args([str(config)])
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert "validation_file is not a setting of this trainer" in lines[0] and "--eval_split" in lines[0]
    assert "max_train_samples" in lines[1] and "--max_train_images" in lines[1]
    assert "unknown setting evaluation_strategy" in lines[2] and str(config) in lines[2]
    broken = tmp_path / "broken.json"
    broken.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match=rf"{broken}: not valid JSON"):
        parse_args([str(broken)])


def test_run_clip_command_line_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # --init_from must name a folder that exists
    for name in ("saved", "m"):
        (tmp_path / name).mkdir()
    model_args, data_args, args = parse_args([
        "--model_name_or_path", "saved", "--train_file", "pairs.parquet", "--max_seq_length=24",
        "--do_train", "--do_eval", "--remove_unused_columns", "False", "--learning_rate", "1e-4",
    ])  # fmt: skip
    assert model_args.init_from == "saved" and data_args.data == "pairs.parquet"
    assert data_args.max_text_length == 24 and data_args.eval_split == "val" and args.learning_rate == 1e-4
    assert parse_args(["--init_from", "m", "--data", "d.json", "--max-steps", "3"])[2].max_steps == 3
    with pytest.raises(ValueError, match=r"^command line: unknown setting --logging_dir; see"):
        parse_args(["--init_from", "saved", "--data", "d.json", "--logging_dir", "runs"])
    with pytest.raises(ValueError, match=r"--do_train false: this command only trains"):
        parse_args(["--init_from", "saved", "--data", "d.json", "--do_train", "false"])


def test_example_configs_keep_their_settings_under_the_new_names() -> None:
    coco = parse_args([str(EXAMPLES / "coco.yaml"), "--vision_model_path", "v", "--text_model_path", "t"])[2]
    # 256 pairs per forward, 2 of them cached into one contrastive batch of 512 (as before the rename)
    assert coco.per_device_train_batch_size == 256 and coco.gradient_cache_micro_batches == 2
    assert coco.gradient_accumulation_steps == 1 and coco.bf16 and coco.mixed_precision is None
    for name in ("coco", "flickr30k", "flickr8k_demo", "tiny_synthetic"):
        text = (EXAMPLES / f"{name}.yaml").read_text()
        assert "mixed_precision" not in text and "gradient_accumulation_steps" not in text, name


def _old_schedule(kind: str, total: int, warmup: int) -> list[float]:
    """The hand-written schedule this trainer had before `get_scheduler` (its formula, for comparison)."""
    out = []
    for step in range(total):
        if step < warmup:
            out.append((step + 1) / (warmup + 1))
        elif kind == "cosine":
            out.append(0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))
        else:
            out.append(1.0)
    return out


def _curve(args, total: int, steps_per_epoch: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=args.learning_rate)
    scheduler = build_scheduler(optimizer, args, total, steps_per_epoch)
    curve = []
    for _ in range(total):
        curve.append(optimizer.param_groups[0]["lr"] / args.learning_rate)
        optimizer.step()
        scheduler.step()
    return curve


def test_demo_recipe_lr_curve_is_unchanged_and_schedules_come_from_transformers() -> None:
    demo = parse_args(
        [str(EXAMPLES / "flickr8k_demo.yaml"), "--vision_model_path", "v", "--text_model_path", "t"]
    )
    args = demo[2]
    assert args.lr_scheduler_type == "cosine" and args.warmup_ratio == 0.05
    total = 81  # 3 epochs x 27 steps (3,500 pairs / 128)
    warmup = math.ceil(0.05 * total)
    assert _curve(args, total, 27) == pytest.approx(_old_schedule("cosine", total, warmup), abs=1e-12)
    # transformers' linear decay and constant_with_warmup; the first step never has LR 0
    linear = _curve(_args("--lr_scheduler_type", "linear", "--warmup_steps", "2")[2], 10, 5)
    assert linear[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and linear[3:] == pytest.approx(
        [(10 - s) / 8 for s in range(3, 10)]
    )
    flat = _curve(_args("--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "1")[2], 4, 2)
    assert flat == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert _curve(_args("--lr_scheduler_type", "constant")[2], 3, 2) == pytest.approx([1.0, 1.0, 1.0])
    min_lr = _args(
        "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'
    )[2]
    decayed = _curve(min_lr, 10, 5)
    assert min(decayed) >= 0.1 - 1e-9 and decayed[-1] < 0.15  # cosine down to min_lr_rate, never below
    # VSE++'s step decay, which transformers lacks, is kept
    step = _curve(
        _args("--lr_scheduler_type", "step", "--lr_step_size", "3", "--lr_step_gamma", "0.5")[2], 7, 3
    )
    assert step == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25])


def test_scheduler_state_loads_with_the_weights_only_unpickler() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, _args("--lr_scheduler_type", "linear")[2], 10, 5)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["last_epoch"] == 0


def test_hub_token_is_never_recorded(tmp_path: Path) -> None:
    model_args, data_args, args = _args(
        "--push_to_hub", "true", "--hub_token", "hf_secret", "--hub_model_id", "me/m"
    )
    path = save_run_settings(tmp_path, model_args, data_args, args)
    assert "hf_secret" not in path.read_text()
    settings = yaml.safe_load(path.read_text())["training"]
    assert settings["push_to_hub"] is True and settings["hub_model_id"] == "me/m"
    assert args.hub_token == "hf_secret"  # still used for the upload itself


def test_gradient_accumulation_averages_separate_contrastive_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """--gradient_accumulation_steps 2 (transformers' meaning): the step's gradient is the mean of two
    batches' gradients, each batch its own negatives; gradient caching inside each batch changes nothing."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model().train()
    batch = tiny_batch(16, seed=3, n_images=16)
    accelerator = Accelerator(cpu=True)
    loss_fn = contrastive_loss

    def grads_of(micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        forward_backward(model, micro_batches, loss_fn, accelerator)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    halves = split_micro_batches(batch, 2)
    first, second = grads_of([halves[0]]), grads_of([halves[1]])
    expected = {n: (first[n] + second[n]) / 2 for n in first}
    whole = grads_of([batch])  # one contrastive batch of 16: what caching would give, not accumulation

    seen: dict[str, dict[str, torch.Tensor]] = {}

    class Recorder:
        param_groups = [{"name": "head/decay"}]

        def step(self) -> None:
            seen["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        def zero_grad(self, set_to_none: bool = True) -> None:
            model.zero_grad(set_to_none=set_to_none)

    scheduler = SimpleNamespace(get_last_lr=lambda: [1.0], step=lambda: None)
    for flags in (("--gradient_accumulation_steps", "2"), ("--gradient_accumulation_steps", "2",
                                                           "--gradient_cache_micro_batches", "2")):  # fmt: skip
        args = _args("--per_device_train_batch_size", "4", "--max_grad_norm", "0", "--max_logit_scale", "1e9",
                     *flags)[2]  # fmt: skip
        trained = loop.TrainingModel(model, None, accelerator, model_wrapped=model)
        plan = BatchPlan.from_args(args)
        model.zero_grad(set_to_none=True)
        logs = loop._optimizer_step(
            trained, args, Recorder(), scheduler, plan.split(batch), loop.TrainerState(), spe=10, warmup=0
        )
        assert math.isfinite(logs["loss"])
        assert seen["grads"].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(seen["grads"][name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert max((whole[n] - expected[n]).abs().max() for n in expected) > 1e-4  # not vacuous


def test_output_dir_lock_refuses_a_second_run_but_not_the_same_runs_other_ranks(tmp_path: Path) -> None:
    # (a holder in another process, killed, is in test_training_main: the kernel frees its lock)
    out = tmp_path / "run"
    with output_dir_lock(out):
        with (
            pytest.raises(
                OutputDirInUseError, match=rf"{out} is in use by another training run .*--output_dir"
            ),
            output_dir_lock(out),
        ):
            pass
        with output_dir_lock(out, is_main_process=False):  # other ranks of the same run pass through
            pass
    with output_dir_lock(out):  # released at the end of the run
        pass


def test_resume_settings_must_match() -> None:
    saved = {"per_device_train_batch_size": 8, "seed": 7, "num_processes": 2}
    check_resume_settings(Path("ckpt"), saved, dict(saved))
    with pytest.raises(ResumeMismatchError, match=r"--per_device_train_batch_size: ckpt was trained with 8, "
                       r"this run has 16; .*pass --per_device_train_batch_size 8"):  # fmt: skip
        check_resume_settings(Path("ckpt"), saved, {**saved, "per_device_train_batch_size": 16})
    with pytest.raises(ResumeMismatchError, match=r"--num_processes: .*accelerate launch --num_processes 2"):
        check_resume_settings(Path("ckpt"), saved, {**saved, "num_processes": 1})


def test_model_flags_are_the_configs_architecture_fields() -> None:
    """One source of truth: every `TemdeConfig` field is a flag, typed and documented as the config says."""
    import dataclasses

    from temde_hf import TemdeConfig
    from temde_hf.training.arguments import ModelArguments

    own = set(vars(TemdeConfig)["__annotations__"]) - {"vision_config", "text_config", "sub_configs_defaults"}
    flags = {f.name: f for f in dataclasses.fields(ModelArguments)}
    assert own <= set(flags)
    for name in own:  # the help is the config docstring's description, never a hand-written copy
        assert flags[name].metadata["help"] and flags[name].metadata["help"] != "see TemdeConfig", name
    assert 'the `"attention"` pooling layer' in flags["attention_pooling_heads"].metadata["help"]
    # the flags the hand-written list missed reach the config
    model_args = parse_args([
        "--vision_model_path", "v", "--text_model_path", "t", "--data", "d.json", "--attention_pooling_heads", "2", "--sketch_kernel", "reference",
        "--sketch_chunk_size", "8", "--sketch_width", "16", "--learn_sketch_temperature", "false",
    ])[0]  # fmt: skip
    overrides = model_args.config_overrides()
    assert overrides == {
        "attention_pooling_heads": 2, "sketch_kernel": "reference", "sketch_chunk_size": 8, "sketch_width": 16,
        "learn_sketch_temperature": False,
    }  # fmt: skip
    config = TemdeConfig(**overrides)
    assert (config.sketch_kernel, config.sketch_chunk_size, config.n_hyperplanes) == ("reference", 8, 4)


@pytest.mark.parametrize(
    "config",
    sorted(EXAMPLES.glob("*.yaml")) + sorted((EXAMPLES.parents[1] / "benchmarks" / "configs").glob("*.yaml")),
)
def test_every_shipped_config_parses(config: Path) -> None:
    model_args = parse_args([str(config), "--vision_model_path", "v", "--text_model_path", "t"])[0]
    assert model_args.config_overrides()["n_sketches"] > 0 and model_args.vision_model_path == "v"
