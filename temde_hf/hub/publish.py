"""Publish a checkpoint: export exactly the folder that goes to the Hub, then (optionally) upload it.

The export holds only what a user needs and nothing that can run code on load: safetensors weights,
``config.json`` (with its ``auto_map``), processor/tokenizer files, the remote-code ``*.py`` of the model
folder, the rendered ``README.md`` card and the Inference Endpoints ``handler.py``. Pickle-based files
(``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``) are never exported.

    temde-hf publish CHECKPOINT --repo-id user/temde-flickr8k --eval-json eval.json --dry-run --out-dir export/
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from temde_hf.hub.model_card import is_hub_id, render_model_card
from temde_hf.loading import PICKLE_SUFFIXES, check_checkpoint_dir, check_model_type, read_config

# Written by the export itself: the Endpoints handler and the package's one image decoder, which the
# handler imports from beside it (the Endpoints toolkit puts the folder on sys.path; its text check comes
# from the model's own remote code, processing_temde.py).
GENERATED_SOURCES = {
    "handler.py": Path(__file__).parent / "handler.py",
    "image_decoding.py": Path(__file__).parents[1] / "data" / "image_decoding.py",
}
# ONNX graphs (temde-hf export-onnx) are protobuf: data, never executed as code. They sit in the `onnx/`
# subfolder that transformers.js and optimum read (the only folder exported), or beside the weights
# in checkpoints exported before.
ONNX_DIR = "onnx"
ALLOWED_SUFFIXES = {".safetensors", ".json", ".py", ".txt", ".model", ".jinja", ".onnx"}
# Training-run files that are JSON/text but are not part of a model repo.
RUN_FILES = {"trainer_state.json", "training_args.json", "optimizer.json", "scheduler.json", "rng_state.json"}
GENERATED = {"README.md", *GENERATED_SOURCES}


@dataclass
class ExportReport:
    """What `export_for_hub` wrote and what it left out (and why)."""

    out_dir: Path
    files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _check_checkpoint(checkpoint_dir: Path) -> dict[str, Any]:
    """Validate the folder before copying anything; returns its config."""
    check_checkpoint_dir(checkpoint_dir)  # a folder, config.json, safetensors weights (never pickles)
    config_path = checkpoint_dir / "config.json"
    config = read_config(checkpoint_dir)
    check_model_type(checkpoint_dir, config)
    auto_map = config.get("auto_map")
    if not auto_map:
        raise ValueError(
            f"{config_path} has no 'auto_map': save with the T-EMDE model so remote code is written"
        )
    modules = {ref.split(".")[0] for ref in auto_map.values() if isinstance(ref, str) and "--" not in ref}
    missing = sorted(m for m in modules if not (checkpoint_dir / f"{m}.py").is_file())
    if missing:
        raise ValueError(f"{config_path}: auto_map names {missing} but those .py files are not in the folder")
    # `processor.save_pretrained` writes this entry for a registered processor; without it, a user
    # without temde_hf gets the bare tokenizer from `AutoProcessor`, not the image + text processor.
    processor_path = checkpoint_dir / "processor_config.json"
    if processor_path.is_file():
        processor_auto_map = json.loads(processor_path.read_text()).get("auto_map", {})
        if "AutoProcessor" not in processor_auto_map:
            raise ValueError(
                f"{processor_path} has no auto_map entry for AutoProcessor: save the processor with "
                "`temde_hf.TemdeProcessor.save_pretrained` so its remote code is named"
            )
    return config


def card_metadata_of(checkpoint_dir: Path) -> dict[str, Any]:
    """The card settings a checkpoint's own ``README.md`` carries, as `render_model_card` keywords.

    The export renders the card again (with the repo id and the evaluation given now); the towers
    (``base_model``), ``datasets``, the model's name and the evaluation dataset's readable name that the
    trainer or the demo wrote there are kept unless the caller gives new ones.
    """
    path = checkpoint_dir / "README.md"
    if not path.is_file():
        return {}
    data = ModelCard.load(path).data
    kept: dict[str, Any] = {}
    if data.base_model:
        kept["base_models"] = [data.base_model] if isinstance(data.base_model, str) else list(data.base_model)
    if data.datasets:
        kept["datasets"] = [data.datasets] if isinstance(data.datasets, str) else list(data.datasets)
    if data.model_name:
        kept["model_name"] = data.model_name
    if data.eval_results:
        kept["dataset_name"] = data.eval_results[0].dataset_name
    return kept


def _classify(path: Path) -> str | None:
    """``None`` if the file belongs in the export, else the reason it is skipped."""
    if path.is_dir() and path.name == ONNX_DIR and not path.is_symlink():
        bad = sorted(p.name for p in path.iterdir() if not p.is_file() or p.suffix not in (".onnx", ".json"))
        return f"holds {bad}, not only ONNX graphs and their metadata" if bad else None
    if path.is_dir():
        return "folder (checkpoints/runs are not exported)"
    if path.suffix in PICKLE_SUFFIXES:
        return "pickle-based format (unsafe to load); weights ship as safetensors"
    if path.name in RUN_FILES:
        return "training-run state, not part of the model"
    if path.name in GENERATED:
        return "regenerated by the export"
    if path.suffix not in ALLOWED_SUFFIXES:
        return f"unexpected file type {path.suffix or '(none)'}"
    return None


def _check_own_file(path: Path, checkpoint_dir: Path) -> None:
    """Refuse a file to export that is a link, or resolves outside the checkpoint.

    The export must hold the checkpoint's own files: following a link would publish whatever it
    points to (another model's weights, a private file).
    """
    if path.is_symlink() or not path.resolve().is_relative_to(checkpoint_dir.resolve()):
        target = path.resolve()
        raise ValueError(
            f"{path}: is a symbolic link (to {target}); publish exports only the checkpoint's own files: "
            "replace the link by a copy of the file, or remove it"
        )


def check_card_copy(card_copy: str | Path, out_dir: str | Path, dry_run: bool) -> Path | None:
    """Where ``--card-copy`` may write the card: never over an existing file, and on a dry run only
    inside the dry run's own export folder (None: a dry run that only reports the copy).

    Raises:
        ValueError: The path exists (it could be the checkpoint's weights); one line with the fix.
    """
    card_copy = Path(card_copy)
    if card_copy.exists() or card_copy.is_symlink():
        raise ValueError(
            f"--card-copy {card_copy}: already exists, and publish never overwrites a file; pass a new path "
            "(or delete that file yourself first)"
        )
    if dry_run and not card_copy.resolve().is_relative_to(Path(out_dir).resolve()):
        return None
    return card_copy


def _write_card_copy(card: Path, card_copy: Path) -> None:
    """Copy the rendered card to a new file (exclusive create: a file that appeared meanwhile stays)."""
    card_copy.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(card_copy, "xb") as handle:
            handle.write(card.read_bytes())
    except FileExistsError as err:
        raise ValueError(
            f"--card-copy {card_copy}: already exists, and publish never overwrites a file; pass a new path"
        ) from err


def _prepare_out_dir(
    out_dir: Path, checkpoint_dir: Path, export_names: set[str], overwrite: bool, dry_run: bool
) -> None:
    """Make `out_dir` ready for the export, deleting only the files of an earlier export.

    `--overwrite` must never cost data: it refuses when `out_dir` is, contains or lies inside the
    checkpoint, and when it holds anything this export would not write itself (a folder, a file of
    another name), since such a folder is not an earlier export. Only the files about to be rewritten
    are deleted, one by one (never a recursive delete).
    """
    out, checkpoint = out_dir.resolve(), checkpoint_dir.resolve()
    if out == checkpoint or checkpoint.is_relative_to(out):
        relation = "is" if out == checkpoint else "contains"
        raise ValueError(
            f"--out-dir {out_dir} {relation} the checkpoint {checkpoint_dir}; pass a separate, new folder"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file; pass a folder for the export")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ValueError(
            f"{out_dir}: not empty; pass a new --out-dir, or --overwrite to replace an earlier export there"
        )
    if dry_run:
        raise ValueError(
            f"{out_dir}: not empty, and a dry run deletes nothing; pass a new --out-dir "
            "(or remove the earlier export yourself)"
        )
    if out.is_relative_to(checkpoint):
        raise ValueError(
            f"--out-dir {out_dir} is inside the checkpoint {checkpoint_dir}, and --overwrite never deletes "
            "anything in a checkpoint; pass a folder outside it"
        )
    foreign = sorted(
        p.name for p in out_dir.iterdir() if p.name not in export_names or p.is_dir() or p.is_symlink()
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{out_dir}: holds {shown}, which this export does not write, so it is not an earlier export "
            "and --overwrite leaves it alone; pass a new --out-dir (or empty the folder yourself)"
        )
    for path in out_dir.iterdir():
        path.unlink()


def _write_public_config(source: Path, target: Path) -> None:
    """Copy ``config.json``, leaving out the towers' ``_name_or_path`` where it is a local path, not a Hub
    id: a tower composed from a folder records where it lay on the machine that trained it, which means
    nothing to a reader of the Hub repo and says more about that machine than a publisher meant to."""
    config = json.loads(source.read_text(encoding="utf-8"))
    for key in ("vision_config", "text_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and sub.get("_name_or_path") and not is_hub_id(sub["_name_or_path"]):
            del sub["_name_or_path"]
    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_for_hub(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    eval_json: str | Path | Mapping[str, Any] | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    **card_kwargs: Any,
) -> ExportReport:
    """Write the exact folder that `push_to_hub` would upload.

    Args:
        checkpoint_dir: folder from `model.save_pretrained` + `processor.save_pretrained`.
        out_dir: the export folder (created; must be empty unless ``overwrite``); never the checkpoint,
            a folder containing it, or (with ``overwrite``) a folder inside it.
        eval_json: evaluation JSON (path or dict) for the card's results; ``None`` for no results.
        overwrite: replace an earlier export in ``out_dir`` (only the files this export writes are
            deleted; anything else there is refused, see `_prepare_out_dir`).
        dry_run: the export is only to be looked at: it deletes nothing, even with ``overwrite``.
        **card_kwargs: passed to `render_model_card` (``repo_id``, ``base_models``, ``datasets``,
            ``training_info``, ...); those not given (or ``None``) keep the values of the checkpoint's
            own card (see `card_metadata_of`).

    Returns:
        An `ExportReport` listing the exported and the skipped files.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    _check_checkpoint(checkpoint_dir)
    report = ExportReport(out_dir=out_dir)
    for path in sorted(checkpoint_dir.iterdir()):
        reason = _classify(path)
        if reason:
            report.skipped[path.name] = reason
        else:
            for own in [path, *(sorted(path.iterdir()) if path.is_dir() else [])]:  # onnx/: each graph too
                _check_own_file(own, checkpoint_dir)
            report.files.append(path.name)
    # Rendered before anything is deleted, so a bad evaluation JSON leaves an earlier export intact.
    given = {key: value for key, value in card_kwargs.items() if value is not None}
    card = render_model_card(checkpoint_dir, eval_json, **{**card_metadata_of(checkpoint_dir), **given})
    _prepare_out_dir(out_dir, checkpoint_dir, {*report.files, *GENERATED}, overwrite, dry_run)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in report.files:
        if (checkpoint_dir / name).is_dir():  # onnx/: its graphs and metadata, file by file
            (out_dir / name).mkdir()
            for graph in sorted((checkpoint_dir / name).iterdir()):
                shutil.copy2(graph, out_dir / name / graph.name)
        elif name == "config.json":
            _write_public_config(checkpoint_dir / name, out_dir / name)
        else:
            shutil.copy2(checkpoint_dir / name, out_dir / name)
    card.save(out_dir / "README.md")
    for name, source in GENERATED_SOURCES.items():
        shutil.copy2(source, out_dir / name)
    report.files = sorted([*report.files, *GENERATED])
    return report


def push_to_hub(
    checkpoint_dir: str | Path,
    repo_id: str,
    *,
    out_dir: str | Path,
    eval_json: str | Path | Mapping[str, Any] | None = None,
    dry_run: bool = False,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload T-EMDE checkpoint",
    overwrite: bool = False,
    **card_kwargs: Any,
) -> ExportReport:
    """Export the checkpoint (see `export_for_hub`) and upload that folder with `upload_folder`.

    Args:
        checkpoint_dir: the saved checkpoint.
        repo_id: Hub repo, ``user/name``.
        out_dir: where the export is written (kept after the upload, so what was sent can be inspected).
        eval_json: evaluation JSON for the card.
        dry_run: write the export and upload nothing.
        private: create the repo as private.
        token: Hub token (default: the logged-in one).
        commit_message: the Hub commit message.
        overwrite: replace an earlier export in ``out_dir`` (see `export_for_hub`); never on a dry run,
            which deletes nothing.
        **card_kwargs: passed to `render_model_card`.

    Returns:
        The `ExportReport` of the uploaded (or, on a dry run, would-be uploaded) folder.
    """
    report = export_for_hub(
        checkpoint_dir,
        out_dir,
        eval_json=eval_json,
        overwrite=overwrite,
        dry_run=dry_run,
        repo_id=repo_id,
        **card_kwargs,
    )
    if dry_run:
        return report
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, token=token, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(out_dir), commit_message=commit_message, token=token)
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="temde-hf publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="folder written by save_pretrained")
    parser.add_argument("--repo-id", required=True, help="Hub repo id, user/name")
    parser.add_argument("--out-dir", required=True, help="where to write the exported folder")
    parser.add_argument("--eval-json", help="evaluation JSON from `temde-hf evaluate` (card results)")
    parser.add_argument(
        "--base-model",
        action="append",
        default=[],
        help="Hub id of a pretrained tower (repeat for both; default: those of the checkpoint's card)",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        help="training dataset Hub id (default: the checkpoint card's)",
    )
    parser.add_argument("--training-info", help="JSON file of training settings to show on the card")
    parser.add_argument("--dry-run", action="store_true", help="write the export, upload nothing")
    parser.add_argument("--private", action="store_true")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export in --out-dir (not on a dry run)"
    )
    parser.add_argument("--card-copy", help="also save the rendered card here (e.g. model_cards/NAME.md)")
    return parser


def _read_training_info(path: str) -> dict[str, Any]:
    """``--training-info``: a JSON object, or one line naming the file and the fix."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"--training-info {path}: not a readable JSON file ({' '.join(str(err).split())})"
        ) from err
    if not isinstance(info, dict):
        raise ValueError(f"--training-info {path}: must hold a JSON object of training settings")
    return info


def main(argv: Sequence[str] | None = None) -> ExportReport:
    """``temde-hf publish``: export (and unless ``--dry-run`` upload) a checkpoint."""
    args = _parser().parse_args(argv)
    card_copy = check_card_copy(args.card_copy, args.out_dir, args.dry_run) if args.card_copy else None
    training_info = _read_training_info(args.training_info) if args.training_info else None
    report = push_to_hub(
        args.checkpoint,
        args.repo_id,
        out_dir=args.out_dir,
        eval_json=args.eval_json,
        dry_run=args.dry_run,
        private=args.private,
        overwrite=args.overwrite,
        base_models=args.base_model or None,
        datasets=args.dataset or None,
        training_info=training_info,
    )
    if card_copy is not None:
        _write_card_copy(report.out_dir / "README.md", card_copy)
    elif args.card_copy:
        print(f"would save a copy of the card to {args.card_copy} (a dry run writes only into --out-dir)")
    action = "would upload" if args.dry_run else f"uploaded to {args.repo_id}"
    print(f"{action} {len(report.files)} files from {report.out_dir}:")
    for name in report.files:
        print(f"  {name}")
    for name, reason in report.skipped.items():
        print(f"  skipped {name}: {reason}")
    return report
