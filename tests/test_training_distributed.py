"""Two real CPU processes under `accelerate launch` (DDP through `accelerator.prepare`, gloo) train
exactly like one process on the whole batch: every pair is a negative of every other."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from temde_hf import TemdeModel
from temde_hf.testing import (
    accelerate_launch,
    accelerate_launch_run,
    launch_ddp_worker,
    save_tiny_towers,
    tiny_batch,
    tiny_config,
    tiny_trainer_argv,
)
from temde_hf.training.accumulation import forward_backward
from temde_hf.training.batches import split_micro_batches
from temde_hf.training.initialization import freeze_unused_parameters
from temde_hf.training.losses import contrastive_loss
from temde_hf.training.optim import freeze_towers
from temde_hf.training.tower_split import attach_upper_towers, find_tower_split

# (name, loss_type, micro-batches per process, negatives, cached: "vision" (a frozen vision tower fed
# cached outputs), "text_lower" (the text tower's top layer run on its cached lower part) or "")
CASES = [
    ("info_nce_global", "info_nce", 1, "global", ""),
    ("info_nce_accumulation", "info_nce", 2, "global", ""),
    ("hinge_accumulation", "vse_hinge", 2, "global", ""),
    ("frozen_vision_cached", "info_nce", 2, "global", "vision"),
    ("text_top_layer_cached", "info_nce", 2, "global", "text_lower"),
    ("info_nce_local", "info_nce", 1, "local", ""),
]
N_PAIRS = 16


def prepare_case(loss_type: str, cached: str) -> tuple[torch.nn.Module, dict, partial]:
    """The same model, batch and loss in every process (and in the single-process reference)."""
    torch.manual_seed(0)
    # no dropout: a process holding half the batch draws other masks than one process holding all of it
    config = tiny_config()
    config.text_config.num_hidden_layers = 2 if cached == "text_lower" else 1
    model = TemdeModel(config).train()
    batch = tiny_batch(N_PAIRS, seed=1, n_images=12)
    if cached == "vision":  # what the trainer does for a frozen tower: its outputs replace the pixels
        model.vision_model.requires_grad_(False).eval()
        with torch.no_grad():
            out = model.vision_model(pixel_values=batch.pop("pixel_values"))
        batch["vision_hidden"], batch["vision_pooled"] = out.last_hidden_state, out.pooler_output
    if cached == "text_lower":  # its top layer trains: the layer below's output replaces the tokens
        freeze_towers(model, {"vision": None, "text": 1})
        split = find_tower_split(model.text_model, 1)
        attach_upper_towers(model, {"text": split})
        with torch.no_grad():
            batch["text_lower"] = split.lower(
                {"input_ids": batch.pop("input_ids"), "attention_mask": batch["attention_mask"]}
            )
    return model, batch, partial(contrastive_loss, loss_type=loss_type)


WORKER = """
from test_training_distributed import prepare_case
from temde_hf.training.accumulation import forward_backward
from temde_hf.training.batches import split_micro_batches
from temde_hf.training.initialization import freeze_unused_parameters

for name, loss_type, n_micro, negatives, cached in {cases!r}:
    model, batch, loss_fn = prepare_case(loss_type, cached)
    freeze_unused_parameters(model, batch, loss_fn)
    wrapped = accelerator.prepare(model)
    half = {n} // world
    local = {{k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}}
    for step in range(2):  # a second step: DDP fails there if a parameter missed the first reduction
        model.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        loss = forward_backward(wrapped, split_micro_batches(local, n_micro),
                                lambda *a: loss_fn(*a, negatives=negatives), accelerator)
    save_rank_result(name, model, loss)
"""


def _single_process(name: str, loss_type: str, n_micro: int, negatives: str, cached: str) -> tuple:
    model, batch, loss_fn = prepare_case(loss_type, cached)
    freeze_unused_parameters(model, batch, loss_fn)
    halves = [{k: v[r * 8 : (r + 1) * 8] for k, v in batch.items()} for r in (0, 1)]
    accelerator = Accelerator(cpu=True)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        if negatives == "global":  # one process, the whole batch
            loss = forward_backward(model, split_micro_batches(batch, 2 * n_micro),
                                    partial(loss_fn, negatives="global"), accelerator)  # fmt: skip
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        else:  # each process's own negatives: the objective is the mean of the halves' losses
            parts = []
            for half in halves:
                model.zero_grad(set_to_none=True)
                forward_backward(model, [half], partial(loss_fn, negatives="local"), accelerator)
                parts.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
            loss, grads = None, {k: (parts[0][k] + parts[1][k]) / 2 for k in parts[0]}
    return loss, grads


@pytest.fixture(scope="module")
def worker_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    body = WORKER.format(cases=CASES, n=N_PAIRS)
    return launch_ddp_worker(body, tmp_path_factory.mktemp("dist"), sys_path=[Path(__file__).parent])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "loss_type", "n_micro", "negatives", "cached"), CASES)
def test_two_processes_match_one_process_on_the_whole_batch(
    worker_outputs: Path, name: str, loss_type: str, n_micro: int, negatives: str, cached: str
) -> None:
    torch.set_num_threads(1)
    expected_loss, expected = _single_process(name, loss_type, n_micro, negatives, cached)
    grads = [load_file(worker_outputs / f"{name}_rank{r}.safetensors") for r in (0, 1)]
    losses = [json.loads((worker_outputs / f"{name}_rank{r}.json").read_text())["loss"] for r in (0, 1)]
    assert grads[0].keys() == expected.keys()
    assert not any(k.startswith("vision_model.") for k in expected) or cached != "vision"
    if cached == "text_lower":  # the top layer trains (its gradients all-reduced), nothing below it
        text = [k for k in expected if k.startswith("text_model.")]
        assert text and all(k.startswith("text_model.encoder.layer.1.") for k in text)
    for key, value in expected.items():
        assert torch.equal(grads[0][key], grads[1][key]), key  # DDP's all-reduce: processes agree
        assert torch.allclose(grads[0][key], value, atol=1e-5, rtol=1e-4), key
    if expected_loss is not None:
        assert losses[0] == pytest.approx(float(expected_loss), abs=1e-5)
        assert losses[1] == pytest.approx(float(expected_loss), abs=1e-5)


@pytest.mark.slow
def test_two_process_training_matches_one_process_and_resumes(tmp_path: Path) -> None:
    """`temde-hf train` under `accelerate launch` (2 processes), pre-empted and resumed, reproduces a
    1-process run: losses, gradient norms and the final weights."""
    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.training.checkpointing import list_checkpoints
    from temde_hf.training.train import main

    torch.set_num_threads(1)
    vision, text = save_tiny_towers(tmp_path / "towers", dropout=0.0)
    data = make_synthetic_karpathy(tmp_path / "data", n_images=30, seed=0)

    def argv(out: Path, per_device: int, *extra: str) -> list[str]:
        return tiny_trainer_argv(
            vision, text, out,
            "--per_device_train_batch_size", str(per_device),
            "--gradient_cache_micro_batches", "2", "--max_steps", "4", "--save_steps", "0",
            "--learning_rate", "2e-3", "--max_eval_images", "6", "--eval_steps", "4", "--logging_steps", "1",
            "--freeze_vision_tower", "true", *extra, data=data,
        )  # fmt: skip

    main(argv(tmp_path / "one", 8))  # one process, 16 pairs per step
    two = tmp_path / "two"
    accelerate_launch("-m", "temde_hf.cli", "train", *argv(two, 4, "--stop_after_steps", "2"))
    accelerate_launch("-m", "temde_hf.cli", "train", *argv(two, 4, "--resume_from_checkpoint", "true"))

    def history(out: Path, key: str) -> list[float]:
        state = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
        return [e[key] for e in state["log_history"] if key in e]

    assert len(history(two, "loss")) == 4
    for key in ("loss", "grad_norm", "eval_rsum"):
        assert history(two, key) == pytest.approx(history(tmp_path / "one", key), abs=1e-4), key
    one, two_final = (load_file(out / "final" / "model.safetensors") for out in (tmp_path / "one", two))
    for key, value in one.items():
        torch.testing.assert_close(two_final[key], value, atol=1e-5, rtol=1e-4, msg=key)


# `temde-hf train` in which the process of rank 1 refuses bad input at the named point ("load": reading
# the data, before any collective; "step": its first training step, while rank 0 waits in DDP's all-reduce).
REFUSING_WORKER = """
import os, sys
import temde_hf.training.loop as loop
import temde_hf.training.train as train
from temde_hf import cli

def refuse(*args, **kwargs):
    raise ValueError("rank1.json: caption 3 is not a string; fix the file or pass --on-error skip")

if os.environ["RANK"] == "1" and sys.argv[1] == "load":
    train.load_data = refuse
if os.environ["RANK"] == "1" and sys.argv[1] == "step":
    loop.accumulate_gradients = refuse
sys.exit(cli.main(["train", *sys.argv[2:]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["load", "step"])
def test_a_refusing_process_shows_its_own_error_line(tmp_path: Path, where: str) -> None:
    """One process refuses: its one `temde-hf train: error:` line is printed and the launch fails; the
    other process's line (if it gets to print one) says another process failed, not a raw gloo error;
    no process aborts at exit."""
    vision, text = save_tiny_towers(tmp_path / "towers")
    from temde_hf.data import make_synthetic_karpathy

    data = make_synthetic_karpathy(tmp_path / "data", n_images=8, seed=0)
    script = tmp_path / "worker.py"
    script.write_text(REFUSING_WORKER)
    result = accelerate_launch_run(
        str(script), where, "--vision_model_path", str(vision), "--text_model_path", str(text),
        "--projection_dim", "16", "--n_sketches", "4", "--n_hyperplanes", "3", "--data", str(data),
        "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--max_steps", "2",
        "--save_steps", "0", "--eval_split", "none", "--report_to", "none", "--disable_tqdm", "true",
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("temde-hf train:")]
    refused = (
        "temde-hf train: error: rank1.json: caption 3 is not a string; fix the file or pass --on-error skip"
    )
    assert lines and lines[0].startswith(refused), result.stderr[-3000:]
    for line in lines[1:]:  # the other process, if the launcher let it print
        assert "process 0 of 2 stopped because another process of this launch failed" in line, line
    assert "terminate called" not in result.stderr and "SIGABRT" not in result.stderr
