"""Checkpoints that survive a kill at any moment, resume exactly, and never unpickle anything.

A checkpoint ``output_dir/checkpoints/step-00000120/`` holds what `accelerator.save_state` writes (the
model as ``model.safetensors``, ``optimizer.bin``, ``scheduler.bin``, per-process
``random_states_<rank>.pkl``, and ``scaler.pt`` under fp16) plus ``trainer_state.json`` (step, epoch,
batches consumed, best metric, log history). The ``.bin``/``.pkl`` files are read back by
`accelerator.load_state` with torch's weights-only unpickler, which refuses anything but tensors and
plain containers; nothing is registered with `register_for_checkpointing` (those objects would be
loaded with full pickle).

It is written to ``.tmp-step-...`` and renamed when complete, so a run killed while saving leaves the
previous checkpoints intact and ``--resume latest`` never picks a half-written one. Before a resume, every
file is checked: a damaged one stops the run with its path and the previous complete checkpoint to use
(accelerate itself would only log an unreadable RNG file and continue with different random numbers).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import load as weights_only_load
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
STREAM_STATE_FILE = "stream_state_{rank}.json"  # a streaming run's position, one per process
# What a run leaves in its output folder; a new run never silently replaces it. (Its run_settings.yaml
# alone, from a run that stopped before its first checkpoint, records nothing to lose.)
RUN_ARTIFACTS = (CHECKPOINTS, "final", "best", "final_metrics.json")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or damaged; the message names it and the checkpoint to use instead."""


@dataclass
class TrainerState:
    """Where the run is: saved with every checkpoint and restored on resume."""

    global_step: int = 0
    total_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> TrainerState:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
            raise ValueError("not a trainer state (no integer 'global_step')")
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
        if not found:
            logger.warning(
                "--resume latest: %s holds no complete checkpoint, so this is a new run from step 0",
                Path(output_dir) / CHECKPOINTS,
            )
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); pass 'latest' or a "
            f"folder like {Path(output_dir) / CHECKPOINTS / (PREFIX + '00000100')}"
        )
    return path


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a new run over another run's results; with `overwrite`, remove them first.

    Only the run's own artifacts (`RUN_ARTIFACTS`) are removed; other files (e.g. a feature cache) stay.

    Raises:
        FileExistsError: `output_dir` holds another run and neither `resuming` nor `overwrite` is set.
    """
    output_dir = Path(output_dir)
    found = [name for name in RUN_ARTIFACTS if (output_dir / name).exists()]
    if not found or resuming:
        return
    if not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a run ({', '.join(found)}): continue it with --resume latest, "
            "start over with --overwrite_output_dir true (its checkpoints and results are deleted), or "
            "pick another --output_dir"
        )
    for name in found:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    logger.warning("--overwrite_output_dir: removed %s from %s", ", ".join(found), output_dir)


def save_checkpoint(
    accelerator: Any, state: TrainerState, output_dir: str | Path, keep: int, stream: Any = None
) -> Path:
    """Write a checkpoint atomically (collective: call on every process) and keep the last `keep`.

    With a streaming run's `stream` (`training.streaming.StreamBatches`), every process also writes its
    stream position (``stream_state_<rank>.json``, plain JSON) beside accelerate's files.

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
    accelerator.save_state(str(tmp), safe_serialization=True)
    if stream is not None:
        (tmp / STREAM_STATE_FILE.format(rank=accelerator.process_index)).write_text(
            json.dumps(stream.state_dict())
        )
    if accelerator.is_main_process:
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


def _damaged(path: Path, problem: str, output_dir: Path) -> CheckpointError:
    checkpoint = path.parent
    earlier = [p for p in list_checkpoints(output_dir) if p.name < checkpoint.name]
    fix = (
        f"resume from the previous complete checkpoint with --resume {earlier[-1]}"
        if earlier
        else "no earlier checkpoint exists: start over with --overwrite_output_dir true"
    )
    return CheckpointError(f"{path}: {problem}; {fix}")


def verify_checkpoint(path: Path, process_index: int, output_dir: str | Path) -> TrainerState:
    """Check that every file a resume reads is present and readable, without unpickling anything.

    Returns:
        The checkpoint's trainer state.

    Raises:
        CheckpointError: Naming the damaged file and the previous complete checkpoint.
    """
    output_dir = Path(output_dir)
    state_file = path / STATE_FILE
    try:
        state = TrainerState.load(state_file)
    except (OSError, ValueError, TypeError) as error:
        raise _damaged(state_file, f"unreadable trainer state ({error})", output_dir) from error
    model_file = path / MODEL_FILE
    try:
        with safe_open(str(model_file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                handle.get_slice(key)
    except (SafetensorError, OSError) as error:
        raise _damaged(model_file, f"unreadable weights ({error})", output_dir) from error
    # The weights-only unpickler refuses code; a truncated file fails to parse. Either way, name it.
    for name in ("optimizer.bin", "scheduler.bin", f"random_states_{process_index}.pkl"):
        file = path / name
        try:
            value = weights_only_load(file, map_location="cpu")
        except Exception as error:
            problem = "missing" if not file.exists() else f"unreadable or not plain tensors ({error})"
            raise _damaged(file, problem.splitlines()[0], output_dir) from error
        if name.startswith("random_states") and "torch_manual_seed" not in value:
            raise _damaged(file, "holds no torch RNG state", output_dir)
    return state


def load_checkpoint(accelerator: Any, path: str | Path, output_dir: str | Path) -> TrainerState:
    """Verify, then restore model weights, optimizer, scheduler and RNG states; return the trainer state."""
    path = Path(path)
    state = verify_checkpoint(path, accelerator.process_index, output_dir)
    try:
        accelerator.load_state(str(path))
    except RuntimeError as error:  # the weights file lacks tensors of the model, or holds others
        if "state_dict" not in str(error):
            raise
        detail = " ".join(str(error).split())[:300]
        raise _damaged(path / MODEL_FILE, f"does not fit the model ({detail})", Path(output_dir)) from error
    return state
