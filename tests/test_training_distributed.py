"""Two CPU processes (gloo, launched like `accelerate`/`torchrun` would) see every pair as a negative.

The worker runs the training step's code path (`forward_backward` + `contrastive_loss` + `sync_gradients`)
on its half of a batch; the averaged gradients must equal one process's gradients on the whole batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from test_training_tiny import tiny_batch, tiny_model

from temde_hf.training.accumulation import forward_backward, split_micro_batches
from temde_hf.training.losses import contrastive_loss

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
# (name, loss_type, micro-batches per process, negatives)
CASES = [
    ("info_nce_global", "info_nce", 1, "global"),
    ("hinge_global_cached", "vse_hinge", 2, "global"),
    ("info_nce_local", "info_nce", 1, "local"),
]
N_PAIRS = 16

WORKER = """
import json, sys
from functools import partial
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from accelerate import Accelerator
from safetensors.torch import save_file
from test_training_tiny import tiny_batch, tiny_model
from temde_hf.training.accumulation import forward_backward, split_micro_batches
from temde_hf.training.losses import contrastive_loss, sync_gradients

accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
assert world == 2, world
out = Path(sys.argv[1])
for name, loss_type, n_micro, negatives in {cases!r}:
    model = tiny_model(loss_type=loss_type)
    batch = tiny_batch({n}, seed=1, n_images=12)
    half = {n} // world
    local = {{k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}}
    loss_fn = lambda i, t, ids: contrastive_loss(model, i, t, ids, negatives=negatives)
    loss = forward_backward(model, split_micro_batches(local, n_micro), loss_fn, accelerator)
    sync_gradients([p for p in model.parameters() if p.requires_grad])
    grads = {{k: p.grad.contiguous() for k, p in model.named_parameters() if p.grad is not None}}
    save_file(grads, str(out / f"{{name}}_rank{{rank}}.safetensors"))
    (out / f"{{name}}_rank{{rank}}.json").write_text(json.dumps({{"loss": float(loss)}}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process(loss_type: str, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model = tiny_model(loss_type=loss_type)
    loss_fn = partial(_loss, model)
    loss = forward_backward(model, [batch], loss_fn, Accelerator(cpu=True))
    return float(loss), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def _loss(model, images, texts, ids):
    return contrastive_loss(model, images, texts, ids, negatives="global")


@pytest.fixture(scope="module")
def worker_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    script = out / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS_DIR), cases=CASES, n=N_PAIRS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(script), str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("name", "loss_type", "n_micro", "negatives"), CASES)
def test_two_processes_match_one_process_on_the_whole_batch(
    worker_outputs: Path, name: str, loss_type: str, n_micro: int, negatives: str
) -> None:
    torch.set_num_threads(1)
    batch = tiny_batch(N_PAIRS, seed=1, n_images=12)
    halves = [{k: v[r * 8 : (r + 1) * 8] for k, v in batch.items()} for r in (0, 1)]
    if negatives == "global":
        expected_loss, expected = _single_process(loss_type, batch)
    else:  # each process's own negatives: the objective is the mean of the two halves' losses
        parts = [_single_process(loss_type, half) for half in halves]
        expected_loss = None
        expected = {k: (parts[0][1][k] + parts[1][1][k]) / 2 for k in parts[0][1]}
    grads = [load_file(worker_outputs / f"{name}_rank{r}.safetensors") for r in (0, 1)]
    losses = [json.loads((worker_outputs / f"{name}_rank{r}.json").read_text())["loss"] for r in (0, 1)]
    assert grads[0].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(grads[0][key], grads[1][key]), key  # processes agree after the all-reduce
        assert torch.allclose(grads[0][key], value, atol=1e-5, rtol=1e-4), key
    if expected_loss is not None:
        assert losses[0] == pytest.approx(expected_loss, abs=1e-5)
        assert losses[1] == pytest.approx(expected_loss, abs=1e-5)
    # the check is not vacuous: the negatives of the other process change the gradient
    if negatives == "global":
        _, alone = _single_process(loss_type, halves[0])
        assert max((alone[k] - expected[k]).abs().max() for k in expected) > 1e-4


def test_micro_batches_split_evenly() -> None:
    batch = tiny_batch(10)
    parts = split_micro_batches(batch, 4)
    assert [len(p["input_ids"]) for p in parts] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([p["pair_ids"] for p in parts]), batch["pair_ids"])


def _torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "-m", "temde_hf.cli", "train", *args]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_training_matches_one_process_and_resumes(tmp_path: Path) -> None:
    """`temde-hf train` under a 2-process launch, pre-empted and resumed, reproduces a 1-process run."""
    from test_training_tiny import make_towers

    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.training.checkpointing import list_checkpoints
    from temde_hf.training.train import main

    torch.set_num_threads(1)
    vision, text = make_towers(tmp_path / "towers")
    data = make_synthetic_karpathy(tmp_path / "data", n_images=30, seed=0)

    def argv(out: Path, per_device: int, *extra: str) -> list[str]:
        return [
            "--vision_model_path", str(vision), "--text_model_path", str(text), "--projection_dim", "16",
            "--n_sketches", "4", "--n_hyperplanes", "3", "--karpathy_json", str(data),
            "--output_dir", str(out), "--per_device_train_batch_size", str(per_device),
            "--gradient_accumulation_steps", "2", "--max_steps", "4", "--save_steps", "0",
            "--learning_rate", "2e-3", "--max_eval_images", "0", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true", *extra,
        ]  # fmt: skip

    main(argv(tmp_path / "one", 8))  # one process, 16 pairs per step
    two = tmp_path / "two"
    _torchrun(*argv(two, 4, "--stop_after_steps", "2"))  # two processes x 8 pairs per step
    _torchrun(*argv(two, 4, "--resume", "latest"))

    def losses(out: Path) -> list[float]:
        state = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
        return [e["loss"] for e in state["log_history"] if "loss" in e]

    assert len(losses(two)) == 4
    assert losses(two) == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert (two / "final" / "model.safetensors").is_file()
