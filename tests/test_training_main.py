"""The real `main([...])` on synthetic data: smoke run + reload, exact resume, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor

import temde_hf  # noqa: F401  (registers the Auto classes)
from temde_hf import TemdeModel
from temde_hf.cli import main as cli_main
from temde_hf.data import load_karpathy, make_synthetic_karpathy
from temde_hf.evaluation.metrics import retrieval_metrics
from temde_hf.inference.encode import encode_dataset
from temde_hf.testing import save_tiny_towers, tiny_trainer_argv
from temde_hf.training import loop
from temde_hf.training.checkpointing import (
    CheckpointError,
    OutputDirInUseError,
    ResumeMismatchError,
    list_checkpoints,
    output_dir_lock,
)
from temde_hf.training.losses import NonFiniteLossError
from temde_hf.training.train import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    vision, text = save_tiny_towers(root / "towers", dropout=0.1)  # dropout: resume must replay the RNG
    data = make_synthetic_karpathy(root / "data", n_images=30, seed=0)  # 18 train / 6 val images
    return {"root": root, "vision": vision, "text": text, "data": data}


def _argv(setup: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return tiny_trainer_argv(
        setup["vision"], setup["text"], output_dir,
        "--per_device_train_batch_size", "8", "--gradient_cache_micro_batches", "2",
        "--learning_rate", "2e-3", "--warmup_steps", "2", "--logging_steps", "1", "--seed", "7", *extra,
        data=setup["data"],
    )  # fmt: skip


def _losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((list_checkpoints(output_dir)[-1] / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_smoke_run_saves_a_checkpoint_that_reloads_and_evaluates(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    config = tmp_path / "run.yaml"
    config.write_text("training:\n  num_train_epochs: 2\n  save_steps: 3\n  save_total_limit: 2\n")
    out = tmp_path / "run"
    metrics = main([str(config), *_argv(setup, out, "--report_to", "tensorboard")])
    # 18 images x 5 captions = 90 pairs, 16 per step -> 5 steps per epoch
    assert metrics["global_step"] == 10 and metrics["train_loss"] > 0
    assert [p.name for p in list_checkpoints(out)] == ["step-00000009", "step-00000010"]  # keep-last-2
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert (out / "run_settings.yaml").is_file() and (out / "training_curves.png").stat().st_size > 0
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    final = out / "final"
    assert (final / "README.md").is_file() and (final / "modeling_temde.py").is_file()
    # the saved model loads through the Auto classes and reproduces the run's validation metrics
    model = AutoModel.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    assert isinstance(model, TemdeModel) and bool(model.sketch.initialized)
    val = load_karpathy(setup["data"], split="val")
    image_embeds, text_embeds, c2i = encode_dataset(model, processor, val, max_length=64)
    reloaded = retrieval_metrics(caption_to_image=c2i, image_embeds=image_embeds, text_embeds=text_embeds)
    assert reloaded["rsum"] == pytest.approx(metrics["eval_rsum"], abs=1e-6)
    card = json.loads((final / "eval_results.json").read_text())
    assert card["rsum"] == pytest.approx(metrics["eval_rsum"])
    # the card records the run's settings under their current names (gradient caching, not accumulation)
    settings = (final / "README.md").read_text()
    assert "gradient_cache_micro_batches: 2" in settings and "gradient_accumulation_steps: 1" in settings
    assert "bf16: false" in settings and "report_to: tensorboard" in settings


def test_killed_run_resumes_with_identical_losses(setup: dict[str, Path], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    extra = ("--num_train_epochs", "2", "--save_steps", "0", "--max_eval_images", "0")
    full = tmp_path / "full"
    main(_argv(setup, full, *extra))
    cut = tmp_path / "cut"
    main(_argv(setup, cut, *extra, "--stop_after_steps", "7"))  # pre-empted mid-epoch 2
    assert [p.name for p in list_checkpoints(cut)] == ["step-00000007"]
    assert not (cut / "final").exists()
    main(_argv(setup, cut, *extra, "--resume_from_checkpoint", "true"))
    expected, resumed = _losses(full), _losses(cut)
    assert sorted(expected) == sorted(resumed) == list(range(1, 11))
    for step in range(8, 11):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step
    # not vacuous: the losses do change from step to step (dropout, data order, updates)
    assert len({round(v, 6) for v in expected.values()}) == 10


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    calls = {"n": 0}
    original = loop.contrastive_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss  # call 1 is the start-up probe: step 4

    monkeypatch.setattr(loop, "contrastive_loss", flaky)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"nan at step 4 .*step-00000002"):
        main(_argv(setup, out, "--max_steps", "6", "--save_steps", "2", "--max_eval_images", "0"))
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"]
    assert not (out / "final").exists()
    # the kept checkpoint is usable: resume from it and finish
    monkeypatch.setattr(loop, "contrastive_loss", original)
    metrics = main(_argv(setup, out, "--max_steps", "6", "--save_steps", "2", "--max_eval_images", "0",
                         "--resume", "latest"))  # fmt: skip
    assert metrics["global_step"] == 6 and (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigkilled_process_resumes_with_identical_losses(setup: dict[str, Path], tmp_path: Path) -> None:
    """A real kill (SIGKILL, possibly mid-save) of a `temde-hf train` process, then `--resume_from_checkpoint true`."""
    torch.set_num_threads(1)
    extra = ("--max_steps", "24", "--save_steps", "1", "--save_total_limit", "2", "--max_eval_images", "0")
    full = tmp_path / "full"
    main(_argv(setup, full, *extra))
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "temde_hf.cli", "train", *_argv(setup, killed, *extra)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step-00000003").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the training process made no progress"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    last = list_checkpoints(killed)[-1]
    done = int(last.name.split("-")[1])
    assert 3 <= done < 24, "killed too late to test anything"
    main(_argv(setup, killed, *extra, "--resume_from_checkpoint", "true"))
    expected, resumed = _losses(full), _losses(killed)
    for step in range(done + 1, 25):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class _Payload:
    """A pickle that would create a marker file when unpickled: resuming must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "damage",
    ["trainer_state.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "pickle payload"],
)
def test_damaged_checkpoint_is_named_and_nothing_is_unpickled(
    setup: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    """A damaged (truncated) or malicious last checkpoint stops the resume with the file and the fix."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    extra = ("--max_steps", "6", "--save_steps", "2", "--max_eval_images", "0")
    main(_argv(setup, out, *extra, "--stop_after_steps", "4"))
    last = list_checkpoints(out)[-1]
    assert last.name == "step-00000004"
    marker = tmp_path / "pwned"
    if damage == "pickle payload":
        import pickle

        (last / "optimizer.bin").write_bytes(pickle.dumps({"state": _Payload(marker)}))
        damaged = last / "optimizer.bin"
    else:
        damaged = last / damage
        _truncate(damaged)
    with pytest.raises(CheckpointError) as error:
        main(_argv(setup, out, *extra, "--resume_from_checkpoint", "latest"))
    message = str(error.value)
    assert str(damaged) in message and "--resume" in message and "step-00000002" in message
    assert not marker.exists()
    # the named fix works: resume from the previous checkpoint and finish
    metrics = main(_argv(setup, out, *extra, "--resume_from_checkpoint", str(list_checkpoints(out)[0])))
    assert metrics["global_step"] == 6


def test_new_run_refuses_a_finished_run_folder(setup: dict[str, Path], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    extra = ("--max_steps", "2", "--max_eval_images", "0")
    main(_argv(setup, out, *extra))
    before = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint true"):
        main(_argv(setup, out, *extra, "--learning_rate", "1e-2"))
    assert (out / "final" / "model.safetensors").read_bytes() == before
    main(_argv(setup, out, *extra, "--learning_rate", "1e-2", "--overwrite_output_dir", "true"))
    assert (out / "final" / "model.safetensors").read_bytes() != before
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"]
    card = (out / "final" / "README.md").read_text()
    assert "learning_rate: 0.01" in card  # the card records the exact settings of the run


@pytest.mark.parametrize("flip", [False, True])
def test_cached_tower_outputs_train_the_same_model(
    setup: dict[str, Path], tmp_path: Path, flip: bool
) -> None:
    """Frozen towers: training on their cached outputs (both views with flip augmentation) equals running
    them every step."""
    torch.set_num_threads(1)
    extra = ("--max_steps", "5", "--freeze_vision_tower", "true", "--freeze_text_tower", "true",
             "--max_eval_images", "4", "--eval_steps", "5", "--image_flip_augmentation", str(flip),
             "--feature_cache_dtype", "float32")  # fmt: skip
    cached, direct = tmp_path / "cached", tmp_path / "direct"
    a = main(_argv(setup, cached, *extra))
    b = main(_argv(setup, direct, *extra, "--cache_tower_outputs", "false"))
    cache_files = sorted(p.parent.name for p in (cached / "feature_cache").glob("*/header.json"))
    assert len(cache_files) == (3 if flip else 2) and not (direct / "feature_cache").exists()
    assert any(name.endswith("-mirrored") for name in cache_files) == flip
    losses_a, losses_b = _losses(cached), _losses(direct)
    assert sorted(losses_a) == list(range(1, 6))
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_b[step], abs=1e-5), step
    assert a["eval_rsum"] == pytest.approx(b["eval_rsum"])
    weights = [AutoModel.from_pretrained(out / "final").state_dict() for out in (cached, direct)]
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], atol=1e-5, rtol=1e-4, msg=key)


def test_a_second_run_into_a_folder_in_use_is_refused(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two runs into one output folder: the second refuses with one line; a killed run leaves no stale lock."""
    out = tmp_path / "busy"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "temde_hf.cli", "train", *_argv(setup, out, "--max_steps", "500")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "run_settings.yaml").exists():  # written once the first run holds the folder
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        with pytest.raises(OutputDirInUseError, match=rf"{out} is in use by another training run \(process "):
            main(_argv(setup, out, "--max_steps", "2", "--learning_rate", "1e-2"))
        assert (
            "learning_rate: 0.01" not in (out / "run_settings.yaml").read_text()
        )  # the second wrote nothing
        capsys.readouterr()
        assert cli_main(["train", *_argv(setup, out, "--max_steps", "2")]) == 1
        err = capsys.readouterr().err  # (log lines of the process may come before it)
        errors = [line for line in err.splitlines() if line.startswith("temde-hf train:")]
        assert (
            len(errors) == 1 and errors[0].startswith("temde-hf train: error: ") and str(out) in errors[0]
        ), err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with output_dir_lock(out):  # the kernel released the killed run's lock
        pass


def test_resume_with_other_data_order_settings_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    extra = ("--max_steps", "4", "--save_steps", "0", "--max_eval_images", "0")
    main(_argv(setup, out, *extra, "--stop_after_steps", "2"))
    settings = (out / "run_settings.yaml").read_text()
    with pytest.raises(ResumeMismatchError, match=r"--per_device_train_batch_size: .*step-00000002 was trained "
                       r"with 8, this run has 4; .*pass --per_device_train_batch_size 8"):  # fmt: skip
        main(
            _argv(
                setup, out, *extra, "--resume_from_checkpoint", "true", "--per_device_train_batch_size", "4"
            )
        )
    with pytest.raises(ResumeMismatchError, match=r"--seed: .*with 7, this run has 8"):
        main(_argv(setup, out, *extra, "--resume_from_checkpoint", "true", "--seed", "8"))
    assert (out / "run_settings.yaml").read_text() == settings  # the record still says how the run was made
    # settings that do not decide the data order may change (here: the logging interval)
    metrics = main(_argv(setup, out, *extra, "--resume_from_checkpoint", "true", "--logging_steps", "2"))
    assert metrics["global_step"] == 4


def test_eval_split_typo_and_a_one_image_run_are_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no images in split\(s\) 'vall' \(--eval_split\).*none"):
        main(_argv(setup, tmp_path / "typo", "--eval_split", "vall"))
    one = make_synthetic_karpathy(tmp_path / "one_image", n_images=3, seed=0)
    assert len(load_karpathy(one, split="train")) == 1
    with pytest.raises(ValueError, match=r"1 training image\(s\) .*needs at least 2 distinct images"):
        main([*_argv(setup, tmp_path / "one", "--max_steps", "1"), "--data", str(one)])
    with pytest.raises(
        ValueError, match=r"--per_device_train_batch_size 1 x 1 process\(es\).*at least 2 pairs"
    ):
        main(_argv(setup, tmp_path / "pair", "--per_device_train_batch_size", "1",
                   "--gradient_cache_micro_batches", "1"))  # fmt: skip


def test_push_to_hub_uploads_the_final_model_through_publish(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    torch.set_num_threads(1)
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        huggingface_hub, "create_repo", lambda *a, **k: calls.append(("create_repo", {"a": a, **k}))
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.append(("upload_folder", k)))
    out = tmp_path / "pushed"
    main(_argv(setup, out, "--max_steps", "2", "--max_eval_images", "4", "--push_to_hub", "true",
               "--hub_model_id", "someone/tiny-temde", "--hub_token", "hf_not_a_real_token",
               "--hub_private_repo", "true"))  # fmt: skip
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    create, upload = calls[0][1], calls[1][1]
    assert create["a"] == ("someone/tiny-temde",) and create["private"] is True
    assert create["token"] == upload["token"] == "hf_not_a_real_token"
    uploaded = Path(upload["folder_path"])
    assert upload["repo_id"] == "someone/tiny-temde" and (uploaded / "model.safetensors").is_file()
    assert "someone/tiny-temde" in (uploaded / "README.md").read_text()
    for path in [out / "run_settings.yaml", *out.rglob("README.md")]:
        assert "hf_not_a_real_token" not in path.read_text(), path


def _train_in_a_fresh_process(setup: dict[str, Path], out: Path, *extra: str) -> dict:
    """`temde-hf train` in its own process (accelerate's mixed-precision state is one per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = _argv(setup, out, "--max_steps", "2", "--max_eval_images", "4", *extra)
    done = subprocess.run([sys.executable, "-m", "temde_hf.cli", "train", *argv], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["train_loss"] > 0
    return metrics


@pytest.mark.slow  # a fresh process (accelerate's precision is per process): ~15 s
def test_bf16_trains_on_cpu(setup: dict[str, Path], tmp_path: Path) -> None:
    """--bf16: accelerate's bfloat16 autocast, which CPUs have (fp16 is refused there, see test_training_flags)."""
    out = tmp_path / "bf16"
    _train_in_a_fresh_process(setup, out, "--bf16", "true")
    assert "bf16: true" in (out / "run_settings.yaml").read_text()
    model = AutoModel.from_pretrained(out / "final")
    assert model.visual_projection.weight.dtype == torch.float32  # mixed precision keeps fp32 weights


@pytest.mark.slow  # dynamo traces every micro-batch shape: minutes on a shared CPU even with the eager backend
def test_torch_compile_trains(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "compiled"
    _train_in_a_fresh_process(setup, out, "--torch_compile_backend", "eager")  # no C compiler needed
    assert "torch_compile: true" in (out / "run_settings.yaml").read_text()
    _, info = AutoModel.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no compiled-wrapper names saved
