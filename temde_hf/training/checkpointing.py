"""Checkpoints that survive a kill at any moment, and an exact resume.

A checkpoint ``output_dir/checkpoints/step-00000120/`` holds:

- ``accelerator.save_state`` files: optimizer, LR scheduler, the RNG states of every process;
- ``model.safetensors``: the model's state dict (the final model is saved with ``save_pretrained``);
- ``trainer_state.json``: step counter, epoch, batches consumed in the epoch, best metric, log history.

It is written to ``.tmp-step-...`` and renamed when complete, so a run killed while saving leaves the
previous checkpoints intact and ``--resume latest`` never picks a half-written one. With the seeded
sampler (same order per epoch) and the skipped consumed batches, a resumed run produces the same
losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"


@dataclass
class TrainerState:
    """Where the run is: saved with every checkpoint and restored on resume."""

    global_step: int = 0
    total_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    sketch_initialized: bool = False
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> TrainerState:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written ``.tmp-*`` folders excluded)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``None``, ``"latest"`` (None if the run has none yet) or a folder.

    Raises:
        FileNotFoundError: `resume` is a folder that is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); pass 'latest' or a "
            f"folder like {Path(output_dir) / CHECKPOINTS / (PREFIX + '00000100')}"
        )
    return path


def save_checkpoint(
    accelerator: Any, model: nn.Module, state: TrainerState, output_dir: str | Path, keep: int
) -> Path:
    """Write a checkpoint atomically (collective: call on every process) and keep the last `keep`.

    Returns:
        The checkpoint folder.
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"{PREFIX}{state.global_step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_model(model, str(tmp / MODEL_FILE))  # the raw state dict: resume is exact
        state.save(tmp / STATE_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's ``model.safetensors`` (the raw state dict) into `model`, strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete (use an older one)")
    missing, unexpected = load_model(model, path, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}): resume with the same model settings as the run that wrote it"
        )


def load_checkpoint(accelerator: Any, model: nn.Module, path: str | Path) -> TrainerState:
    """Restore model weights, optimizer, scheduler and RNG states; return the trainer state."""
    path = Path(path)
    load_model_weights(model, path / MODEL_FILE)
    accelerator.load_state(str(path))
    return TrainerState.load(path / STATE_FILE)
