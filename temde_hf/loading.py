"""Load a saved checkpoint for inference: local folders and safetensors weights only.

The one loader of `temde-hf evaluate`, the Space demo and the gallery commands. Pickle-based weights
(``pytorch_model.bin``, ``*.pt``, ...) are refused, never loaded: unpickling a file runs any code it
carries, so a checkpoint folder from someone else must not be able to execute anything. (transformers
itself would still load a folder holding only ``pytorch_model.bin``.)

Loading is strict: our models' `from_pretrained` refuses a weights file that lacks tensors, holds
foreign ones or has them in another shape (`CheckpointMismatchError`, see the model folder's
``loading_temde.py``), so every loader (this one, the Endpoints handler through remote code, training's
``--init_from``) gets one line naming the file instead of a model with random weights. A path-like
model argument that names no folder is refused by `require_folder`, never looked up on the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The one check of path-like model arguments (towers, --init_from), shared with the model folder, whose
# `from_vision_text_pretrained` must run without this package (Hub remote code).
from temde_hf.models.temde.configuration_temde import TemdeConfig
from temde_hf.models.temde.loading_temde import CheckpointMismatchError, NoSuchFolderError, require_folder

# Pickle formats execute code when loaded: never loaded, never shipped, whatever else a folder holds.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


__all__ = [
    "PICKLE_SUFFIXES",
    "CheckpointMismatchError",
    "NoSuchFolderError",
    "check_checkpoint_dir",
    "load_checkpoint",
    "read_config",
    "require_folder",
]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _unreadable_json(path: Path) -> Path | None:
    """The first ``*.json`` file of the folder that is not valid JSON, if any."""
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return file
    return None


def read_config(path: Path) -> dict[str, Any]:
    """The checkpoint folder's ``config.json`` as a dict, or one line naming it and the fix."""
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{config_path}: not valid JSON ({_one_line(exc)}); the file is truncated or damaged: copy the "
            "checkpoint again (or save it again with save_pretrained)"
        ) from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object; copy the checkpoint again")
    return config


def check_model_type(path: Path, config: dict[str, Any]) -> None:
    """Refuse a checkpoint whose ``config.json`` is not a T-EMDE model (it would load as another model)."""
    expected = TemdeConfig.model_type
    if config.get("model_type") != expected:
        raise ValueError(
            f"{path / 'config.json'}: model_type {config.get('model_type')!r} is not a T-EMDE checkpoint "
            f"(expected {expected!r}); pass a folder written by TemdeModel.save_pretrained"
        )


def check_checkpoint_dir(path: str | Path) -> Path:
    """Check that `path` is a local checkpoint folder with safetensors weights, before loading it.

    Args:
        path: A folder written by ``model.save_pretrained`` (plus the processor's files).

    Returns:
        `path` as a `Path`.

    Raises:
        ValueError: One line naming the folder, what is missing and what to pass instead: no such
            folder (never retried as a Hub id), no ``config.json``, or weights only in a pickle format.
    """
    path = Path(path)
    if not path.exists():
        raise NoSuchFolderError(
            f"{path}: no such folder; pass the folder written by save_pretrained (for a Hub checkpoint, "
            "download it first: `hf download REPO_ID --local-dir DIR`)"
        )
    if not path.is_dir():
        raise ValueError(f"{path}: is a file; pass the checkpoint folder that holds config.json")
    if not (path / "config.json").is_file():
        runs = [name for name in ("final", "best") if (path / name / "config.json").is_file()]
        hint = f"this looks like a training run: pass {path / runs[0]}" if runs else "pass a folder"
        raise ValueError(f"{path / 'config.json'}: not found; {hint} written by save_pretrained")
    read_config(path)
    if not any((path / name).is_file() for name in SAFETENSORS_WEIGHTS):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path}: weights only in a pickle format ({', '.join(pickles)}), which can run code when "
                "loaded, so they are refused; convert them to model.safetensors where you trust the file "
                "(load it and call save_pretrained, whose default is safetensors)"
            )
        raise ValueError(f"{path}: no model.safetensors; pass a folder written by save_pretrained")
    return path


def load_checkpoint(
    path: str | Path, device: str = "cpu", trust_remote_code: bool = False, with_matching_head: bool = False
) -> tuple[Any, Any]:
    """`AutoModel` (eval mode, on `device`) and `AutoProcessor` of a checked checkpoint folder.

    Args:
        path: The checkpoint folder (see `check_checkpoint_dir`).
        device: Where the model goes.
        trust_remote_code: For checkpoints of architectures temde_hf does not register.
        with_matching_head: Load the dual encoder with its trained matching head
            (`AutoModelForPreTraining` -> `TemdeForImageTextRetrieval`); a checkpoint without one is
            refused rather than given a random head.

    Raises:
        ValueError: The folder fails `check_checkpoint_dir`, or a file in it is truncated or damaged
            (named, with the fix).
    """
    import transformers
    from safetensors import SafetensorError

    import temde_hf  # noqa: F401  (registers the "temde" Auto classes)

    path = check_checkpoint_dir(path)
    config = read_config(path)
    if not trust_remote_code:
        check_model_type(path, config)
    auto_class = transformers.AutoModel
    if with_matching_head:
        architectures = config.get("architectures") or []
        if "TemdeForImageTextRetrieval" not in architectures:
            raise ValueError(
                f"{path}: has no trained matching head (config.json architectures: {architectures}); train one "
                "with `temde-hf train ... --itm_weight 1`, or rerank with the parameter-free --rerank alignment"
            )
        auto_class = transformers.AutoModelForPreTraining
    try:
        model = auto_class.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=True
        )
        processor = transformers.AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (CheckpointMismatchError, NoSuchFolderError):
        raise  # already one line naming the file and the fix
    except SafetensorError as exc:
        raise ValueError(
            f"{path}: the safetensors weights cannot be read ({_one_line(exc)}); the file is truncated or "
            "damaged: copy the checkpoint again"
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        where = _unreadable_json(path) or path  # a JSON error does not say which file it was
        raise ValueError(
            f"{where}: cannot load the checkpoint ({_one_line(exc)}); a file is missing, truncated or "
            "damaged: copy the checkpoint again"
        ) from exc
    except ValueError as exc:  # the config's own checks (a missing tower config, a bad field): name the file
        raise ValueError(f"{path / 'config.json'}: {_one_line(exc)}") from exc
    return model.to(device).eval(), processor
