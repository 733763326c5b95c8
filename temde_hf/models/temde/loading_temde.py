"""Strict `from_pretrained` for this folder's models: a checkpoint loads whole, or not at all.

transformers fills a parameter the weights file lacks (or holds with another shape) with fresh random
values and only logs a "MISSING" table, so a damaged or mismatched ``model.safetensors`` still gives a
model that runs, and its embeddings are noise. `StrictLoadingMixin.from_pretrained` reads transformers'
own loading report (``output_loading_info=True``) and refuses such a file with one line naming it, the
first keys and the fix. What stays accepted is what transformers itself deliberately tolerates:

- keys a class lists in ``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_load_unexpected``,
  tied weights and buffers that are not saved (transformers removes them from the report);
- a head the checkpoint's class does not have (``_optional_head_prefixes``): loading the dual encoder
  from a checkpoint with a matching head drops the head, and loading the head model from a plain dual
  encoder starts the head fresh, as with any transformers base/head pair;
- the 0-dim one-element parameters of earlier checkpoints (``_one_element_parameters``), copied into
  the current ``(1,)`` shape.

Only torch, transformers and safetensors are imported: this file ships with the model as remote code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
_SHOWN_KEYS = 3  # keys named in the one-line error; the rest are counted


class CheckpointMismatchError(ValueError):
    """A weights file lacks tensors of the model, holds tensors it has no place for, or of another shape."""


def weights_file(pretrained_model_name_or_path: str | os.PathLike) -> str:
    """The file to name in an error: the folder's safetensors weights when local, else what was passed."""
    path = Path(pretrained_model_name_or_path)
    for name in SAFETENSORS_FILES:
        if (path / name).is_file():
            return str(path / name)
    return str(pretrained_model_name_or_path)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else shown


def _checkpoint_tensor(pretrained_model_name_or_path: str | os.PathLike, key: str) -> torch.Tensor | None:
    """One tensor read directly from a local folder's safetensors weights (None when not found)."""
    import json

    from safetensors import safe_open

    folder = Path(pretrained_model_name_or_path)
    files = [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(key)
        files = [folder / shard] if isinstance(shard, str) and "/" not in shard and "\\" not in shard else []
    for file in files:
        if file.is_file():
            with safe_open(str(file), framework="pt") as handle:
                if key in handle.keys():  # noqa: SIM118 (a safe_open handle is no container)
                    return handle.get_tensor(key)
    return None


def _drop_load_report(record: logging.LogRecord) -> bool:
    """Logging filter: False for transformers' "LOAD REPORT" table (strict loading says it in one line)."""
    return "LOAD REPORT" not in str(record.msg)


class StrictLoadingMixin:
    """`from_pretrained` that refuses missing, unexpected or wrongly shaped tensors (see the module doc).

    Put it before `PreTrainedModel` in a model's bases. ``strict=False`` restores transformers' own
    behaviour (missing tensors start fresh, with its logged report).
    """

    # Top-level modules a checkpoint of a sibling class (base model vs. model with a head) may lack or add.
    _optional_head_prefixes: tuple[str, ...] = ()
    # Parameters of shape (1,) that earlier checkpoints stored 0-dim.
    _one_element_parameters: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, strict by default.

        Args:
            pretrained_model_name_or_path: The checkpoint folder (or Hub id).
            *args, **kwargs: As for `PreTrainedModel.from_pretrained`; ``strict=False`` accepts missing,
                unexpected and (with ``ignore_mismatched_sizes=True``) wrongly shaped tensors.

        Raises:
            CheckpointMismatchError: (a `ValueError`) one line naming the weights file, the first
                offending keys and the fix.
        """
        if not kwargs.pop("strict", True):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]
        wants_info = kwargs.pop("output_loading_info", False)
        tolerate_shapes = kwargs.pop("ignore_mismatched_sizes", False)
        # Any missing/mismatched tensor is an error below, so transformers' multi-line report would only
        # precede the one line that says the same: keep it out of the user's terminal.
        # (A filter, not a level: transformers runs extra checks when this logger's level is set.)
        report_logger = hf_logging.get_logger("transformers.modeling_utils")
        report_logger.addFilter(_drop_load_report)
        try:
            model, info = super().from_pretrained(  # type: ignore[misc]
                pretrained_model_name_or_path,
                *args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported (and refused) here, in one line
                **kwargs,
            )
        finally:
            report_logger.removeFilter(_drop_load_report)
        cls._check_loading_info(model, pretrained_model_name_or_path, info, tolerate_shapes)
        return (model, info) if wants_info else model

    @classmethod
    def _check_loading_info(
        cls, model: Any, pretrained_model_name_or_path: Any, info: dict[str, Any], tolerate_shapes: bool
    ) -> None:
        """Refuse the loaded `model` unless every tensor came from the file (or is tolerated, see above)."""
        file = weights_file(pretrained_model_name_or_path)
        saved_by = getattr(model.config, "architectures", None) or []
        sibling = bool(saved_by) and cls.__name__ not in saved_by  # a base/head checkpoint of this family

        def head_key(key: str) -> bool:
            return sibling and key.startswith(cls._optional_head_prefixes)

        mismatched = []
        for entry in sorted(info.get("mismatched_keys") or (), key=str):
            key, saved_shape, model_shape = entry
            if key in cls._one_element_parameters and tuple(saved_shape) == () and tuple(model_shape) == (1,):
                value = _checkpoint_tensor(pretrained_model_name_or_path, key)
                if value is not None:  # an earlier checkpoint's 0-dim value: the same number, reshaped
                    with torch.no_grad():
                        model.get_parameter_or_buffer(key).copy_(value.reshape(1))
                    info["mismatched_keys"].discard(entry)
                    continue
            mismatched.append(f"{key} {tuple(saved_shape)} vs {tuple(model_shape)}")
        missing = sorted(key for key in info.get("missing_keys") or () if not head_key(key))
        unexpected = sorted(key for key in info.get("unexpected_keys") or () if not head_key(key))
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors of the model are missing ({_listed(missing)})")
        if mismatched and not tolerate_shapes:
            problems.append(f"{len(mismatched)} have another shape ({_listed(mismatched)})")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors are not the model's ({_listed(unexpected)})")
        if problems:
            raise CheckpointMismatchError(
                f"{file}: does not hold the weights of this {cls.__name__}: {'; '.join(problems)}; the file is "
                "damaged, or belongs to another model or config.json: copy the checkpoint folder again "
                "(weights and config.json together), or pass strict=False to start the missing weights fresh"
            )


class NoSuchFolderError(FileNotFoundError, ValueError):
    """A path-like model argument names no folder (it is never retried as a Hub id).

    A `ValueError` too, like every other refused argument."""


def looks_like_path(value: str | os.PathLike) -> bool:
    """Whether `value` is meant as a local path rather than a Hub id (``ORG/NAME`` or ``NAME``).

    Path-like: starts with ``.``, ``~`` or a root, holds a backslash or more than one ``/``, or its parent
    folder exists here (``runs/final`` beside an existing ``runs/``).
    """
    text = os.fspath(value)
    if text.startswith((".", "~")) or os.path.isabs(text) or "\\" in text or text.count("/") > 1:
        return True
    parent = Path(text).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def require_folder(value: str | os.PathLike, what: str, fix: str, hub_ids: bool = True) -> None:
    """Refuse a missing local folder before anything (transformers, the network) sees it.

    Args:
        value: The folder (or, with `hub_ids`, a Hub id).
        what: How the user passed it, e.g. ``"--init_from"`` or ``"vision tower"``.
        fix: What to pass instead.
        hub_ids: Accept a value that is not path-like as a Hub id (it is then not checked here).

    Raises:
        NoSuchFolderError: One line: ``{what} {value}: no such folder; {fix}``.
    """
    path = Path(os.fspath(value)).expanduser()
    if path.is_dir() or (hub_ids and not path.exists() and not looks_like_path(value)):
        return
    problem = "is a file, not a folder" if path.exists() else "no such folder"
    raise NoSuchFolderError(f"{what} {os.fspath(value)}: {problem}; {fix}")
