"""FSDP2, as far as a CPU allows: the trainer's gradient-caching step on a `fully_shard`-ed model (2
processes, gloo) gives the gradients of one process on the whole batch.

accelerate's FSDP plugin itself needs GPUs (on CPU it silently falls back to DDP or one process), so the
worker shards the model with `torch.distributed.fsdp.fully_shard` directly and stands in for the two
things accelerate does for FSDP2 in `no_sync` / `backward`: `set_requires_gradient_sync(False)` on all
micro-batches but the last, and a plain backward.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from temde_hf.testing import free_port, tiny_batch, tiny_model
from temde_hf.training.accumulation import forward_backward
from temde_hf.training.batches import split_micro_batches
from temde_hf.training.initialization import freeze_unused_parameters
from temde_hf.training.losses import contrastive_loss

REPO = Path(__file__).resolve().parents[1]


class Fsdp2Engine:
    """What `accelerate.Accelerator` does for an FSDP2 model in `no_sync` and `backward`."""

    device = torch.device("cpu")

    @staticmethod
    @contextlib.contextmanager
    def no_sync(model: torch.nn.Module):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    @staticmethod
    def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
        return model  # `fully_shard` changes the module in place: there is no wrapper to remove


def case() -> tuple[torch.nn.Module, dict, partial]:
    torch.manual_seed(0)
    model = tiny_model().train()
    batch = tiny_batch(16, seed=1, n_images=12)
    loss_fn = partial(contrastive_loss, loss_type="info_nce", negatives="global")
    freeze_unused_parameters(model, batch, partial(contrastive_loss, loss_type="info_nce", negatives="local"))
    return model, batch, loss_fn


WORKER = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from test_training_fsdp import Fsdp2Engine, case
from temde_hf.training.accumulation import forward_backward
from temde_hf.training.batches import split_micro_batches

dist.init_process_group("gloo")
rank = dist.get_rank()
model, batch, loss_fn = case()
fully_shard(model)
local = {{k: v[rank * 8 : (rank + 1) * 8] for k, v in batch.items()}}
forward_backward(model, split_micro_batches(local, 2), loss_fn, Fsdp2Engine())  # gradient caching
grads = {{n: p.grad.full_tensor().contiguous() for n, p in model.named_parameters() if p.grad is not None}}
if rank == 0:
    save_file(grads, str(Path(sys.argv[1]) / "grads.safetensors"))
# both ranks reach here before the group goes: tearing gloo down while the other rank still runs a
# collective aborted the process now and then ("terminate called without an active exception")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_gradient_caching_matches_one_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(script), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sharded = load_file(tmp_path / "grads.safetensors")
    torch.set_num_threads(1)
    model, batch, loss_fn = case()
    forward_backward(model, split_micro_batches(batch, 4), loss_fn, Accelerator(cpu=True))
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sharded.keys() == expected.keys() and "logit_scale" in expected  # a (1,) parameter shards fine
    for name, value in expected.items():
        torch.testing.assert_close(sharded[name], value, atol=1e-5, rtol=1e-4, msg=name)
