"""Tiny, offline building blocks for tests, examples and smoke benchmarks.

Everything here is built from configs in code: no download, a few thousand parameters, milliseconds.
Models and processors, a solid-colour image gallery, bad images, and the two ways the tests run code
in another interpreter (a clean one with some packages made unimportable, or `accelerate launch` of
two CPU processes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import socket
import string
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import BertConfig, BertTokenizer, ViTConfig, ViTImageProcessor

from .models.temde import TemdeConfig, TemdeForImageTextRetrieval, TemdeModel, TemdeProcessor

# A small English vocabulary so captions of the synthetic data tokenise into real word pieces.
TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "a", "an", "the", "of", "on", "in", "with", "and", "is", "this", "photo", "picture", "image",
    "red", "green", "blue", "yellow", "white", "black", "purple", "orange",
    "circle", "square", "triangle", "shape", "dog", "cat", "car", "man", "woman", "small", "big",
    "background", "left", "right", "top", "bottom", "center", "two", "one", ".", ",",
]  # fmt: skip

TINY_IMAGE_SIZE = 32


def tiny_vocab() -> list[str]:
    """`TINY_VOCAB`, every word of the synthetic captions, and letters (so any word has word pieces)."""
    from .data.synthetic import BACKGROUNDS, COLOURS, SHAPES, TEMPLATES

    words = {w for t in TEMPLATES for w in t.replace("{", " ").replace("}", " ").split()}
    words |= set(COLOURS) | set(BACKGROUNDS) | set(SHAPES)
    letters = list(string.ascii_lowercase)
    return list(dict.fromkeys([*TINY_VOCAB, *sorted(words), *letters, *(f"##{c}" for c in letters)]))


def tiny_tower_configs(
    hidden_size: int = 32, dropout: float = 0.0, num_hidden_layers: int = 1
) -> tuple[ViTConfig, BertConfig]:
    """A 1-layer ViT (16 patches of 8 px on 32-px images) and a 1-layer BERT over `tiny_vocab()`
    (`num_hidden_layers` each: 2 or more to train only some of a tower's layers)."""
    vision = ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    text = BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        vocab_size=len(tiny_vocab()),
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return vision, text


def tiny_config(dropout: float = 0.0, **overrides: Any) -> TemdeConfig:
    """A tiny [`TemdeConfig`] (towers with `dropout`); keyword arguments override any T-EMDE field."""
    vision, text = tiny_tower_configs(dropout=dropout)
    settings: dict[str, Any] = {"projection_dim": 16, "n_sketches": 4, "n_hyperplanes": 3}
    settings.update(overrides)
    return TemdeConfig(vision_config=vision, text_config=text, **settings)


def tiny_model(dropout: float = 0.0, **overrides: Any) -> TemdeModel:
    """A tiny randomly initialised [`TemdeModel`] in eval mode (seed with `torch.manual_seed` first)."""
    return TemdeModel(tiny_config(dropout, **overrides)).eval()


def tiny_processor() -> TemdeProcessor:
    """A processor for the tiny towers: a word-piece tokenizer over `tiny_vocab()`, 32-px images."""
    vocab = {token: index for index, token in enumerate(tiny_vocab())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    image_processor = ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return TemdeProcessor(image_processor, tokenizer)


def save_tiny_checkpoint(
    directory: str | Path, matching_head: bool = False, seed: int | None = None, **overrides: Any
) -> Path:
    """Save a tiny model and its processor to `directory` (a loadable checkpoint); returns the folder.

    With `matching_head` the model is a `TemdeForImageTextRetrieval` (the dual encoder + its matching head);
    `seed` seeds torch first, so two checkpoints of different seeds hold different weights.
    """
    directory = Path(directory)
    if seed is not None:
        torch.manual_seed(seed)
    model = TemdeForImageTextRetrieval(tiny_config(**overrides)) if matching_head else tiny_model(**overrides)
    model.save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    return directory


def save_tiny_towers(
    directory: str | Path, dropout: float = 0.0, num_hidden_layers: int = 1
) -> tuple[Path, Path]:
    """Save tiny pretrained-style ViT and BERT tower folders (with processor files) for composition tests."""
    from transformers import BertModel, ViTModel

    directory = Path(directory)
    vision_config, text_config = tiny_tower_configs(dropout=dropout, num_hidden_layers=num_hidden_layers)
    vision_dir, text_dir = directory / "vision", directory / "text"
    ViTModel(vision_config, add_pooling_layer=False).save_pretrained(vision_dir)
    BertModel(text_config, add_pooling_layer=False).save_pretrained(text_dir)
    processor = tiny_processor()
    processor.image_processor.save_pretrained(vision_dir)
    processor.tokenizer.save_pretrained(text_dir)
    return vision_dir, text_dir


def tiny_trainer_argv(
    vision: str | Path, text: str | Path, output_dir: str | Path, *extra: str, data: str | Path | None = None
) -> list[str]:
    """`temde-hf train` flags of a tiny run: the `save_tiny_towers` folders, a 16-d head with a 4 x 3 sketch,
    `data` (``--data``, when given), no trackers and no progress bars; `extra` comes last (it wins)."""
    data_flags = [] if data is None else ["--data", str(data)]
    return [
        "--vision_model_path", str(vision), "--text_model_path", str(text),
        "--projection_dim", "16", "--n_sketches", "4", "--n_hyperplanes", "3", *data_flags,
        "--output_dir", str(output_dir), "--report_to", "none", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def tiny_batch(n: int, seed: int = 0, n_images: int | None = None) -> dict[str, torch.Tensor]:
    """Random training inputs for `n` pairs of the tiny towers.

    ``n_images`` distinct images; pair ``i`` shows image ``i % n_images`` (``pair_ids``), so some images
    have several captions in the batch. Captions have random lengths (padding in play).
    """
    g = torch.Generator().manual_seed(seed)
    n_images = n_images or n
    pair_ids = torch.arange(n) % n_images
    images = torch.randn(n_images, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)
    input_ids = torch.randint(5, len(tiny_vocab()), (n, 12), generator=g)
    lengths = torch.randint(4, 13, (n,), generator=g)
    attention_mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return {
        "pixel_values": images[pair_ids],
        "input_ids": input_ids * attention_mask,
        "attention_mask": attention_mask,
        "pair_ids": pair_ids,
    }


def tiny_processed_batch(processor: TemdeProcessor | None = None) -> dict[str, torch.Tensor]:
    """Two solid grey 40-px images and two captions through `processor` (default: `tiny_processor()`)."""
    import numpy as np

    images = [Image.fromarray(np.full((40, 40, 3), grey, dtype=np.uint8)) for grey in (30, 200)]
    processor = processor if processor is not None else tiny_processor()
    return processor(images=images, text=["a red circle", "a blue square on the left"])


def _gallery_colours() -> dict[str, tuple[int, int, int]]:
    from .data.synthetic import BACKGROUNDS, COLOURS

    return {**COLOURS, "black": BACKGROUNDS["black"], "white": BACKGROUNDS["white"]}


# The colour gallery: one image per colour (its file stem), and captions whose words are all in `tiny_vocab()`.
GALLERY_COLOURS: dict[str, tuple[int, int, int]] = _gallery_colours()
GALLERY_CAPTIONS: list[str] = [
    f"a {colour} square on a {background} background"
    for colour in GALLERY_COLOURS
    for background in ("black", "white")
]


def make_colour_gallery(folder: str | Path) -> dict[str, Path]:
    """Write one 48-px PNG per `GALLERY_COLOURS` entry into `folder`; returns colour name -> path.

    Each image is its colour with an inverse-colour square at its own place, so images differ in
    layout as well as colour.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, rgb) in enumerate(GALLERY_COLOURS.items()):
        image = Image.new("RGB", (48, 48), rgb)
        offset = 4 + 4 * i
        inverse = (255 - rgb[0], 255 - rgb[1], 255 - rgb[2])
        ImageDraw.Draw(image).rectangle([offset, offset, offset + 10, offset + 10], fill=inverse)
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    return paths


def png_declaring_size(width: int, height: int) -> bytes:
    """A 1-pixel PNG whose header claims `width` x `height` (a decompression bomb as far as the header
    goes; decoding it would fail, so a test passes only if the size is refused before decoding)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # After the 8-byte signature comes IHDR: length (8:12), type (12:16), width and height (16:24),
    # four more fields (24:29), then the CRC of type + data (29:33).
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def truncated_jpeg(path: str | Path, size: int = 64) -> Path:
    """Write a noisy JPEG cut in half: its header is intact (PIL's ``verify`` accepts it), its pixels
    are not."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path = Path(path)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def import_script(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a file outside any package (an example application, a benchmark) as a module named `name`.

    Its ``if __name__ == "__main__":`` block does not run; the module is not added to `sys.modules`.
    """
    path = Path(path)
    # By file path: examples/, benchmarks/ and an exported Endpoints folder are not packages (nothing in
    # temde_hf itself is ever loaded this way; the library imports what it uses)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not a Python file that can be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_endpoint_handler(folder: str | Path) -> ModuleType:
    """Load an exported ``handler.py`` as the Inference Endpoints toolkit does.

    The toolkit puts the repository folder on `sys.path` (so the modules shipped beside the handler
    import as top-level modules) and names the module ``handler.EndpointHandler``. The folder and those
    top-level modules are taken out of `sys.path` / `sys.modules` again, so one test's export does not
    serve another's.
    """
    folder = Path(folder)
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        return import_script(folder / "handler.py", name="handler.EndpointHandler")
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            if (
                getattr(sys.modules[name], "__file__", None)
                and Path(sys.modules[name].__file__).parent == folder
            ):
                del sys.modules[name]


# The folder holding the `temde_hf` this process imported: child processes import the same code.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# Runs first in `run_python`'s interpreter: importing a blocked package or any of its submodules raises the
# ModuleNotFoundError of an uninstalled package. (A test inside this process uses
# `monkeypatch.setitem(sys.modules, name, None)` instead: there the package may already be imported.)
_IMPORT_BLOCKER = """
import sys

class _BlockImports:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked in this test)", name=name)
        return None

assert not [m for m in sys.modules if m.split(".")[0] in {blocked!r}], "a blocked package was already imported"
sys.meta_path.insert(0, _BlockImports())
"""


def _child_env(env: Mapping[str, str | None] | None) -> dict[str, str]:
    """`os.environ` offline, with `PACKAGE_ROOT` on `PYTHONPATH`, then `env` (a `None` value removes a key)."""
    child = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PACKAGE_ROOT)}
    for key, value in (env or {}).items():
        if value is None:
            child.pop(key, None)
        else:
            child[key] = value
    return child


def run_python(
    code: str,
    *args: str,
    blocked: Sequence[str] = (),
    cwd: str | Path | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 300,
) -> str:
    """Run `code` in a fresh interpreter (`python -c code *args`) with the `blocked` packages unimportable.

    Args:
        code: Python source (dedented here); `sys.argv[1:]` is `args`.
        blocked: Top-level package names whose import fails, e.g. ``("temde_hf",)`` to prove a folder
            loads as Hub remote code alone.
        cwd: Working folder (default: this one); it is on `sys.path` as with any ``-c`` script.
        env: Changes to the environment (see `_child_env`); ``{"PYTHONPATH": None}`` drops the package.
        timeout: Seconds before the run is killed.

    Returns:
        The child's stdout.

    Raises:
        AssertionError: The child exited with a non-zero status (the message ends with its stderr).
    """
    source = (_IMPORT_BLOCKER.format(blocked=tuple(blocked)) if blocked else "") + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", source, *args],
        cwd=cwd,
        env=_child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def run_without_temde_hf(code: str, *args: str, cwd: str | Path, timeout: float = 300) -> str:
    """`run_python` as a user without this package runs Hub remote code: temde_hf blocked, not on `PYTHONPATH`.

    `cwd` should lie outside the repository (a test's `tmp_path`); transformers' remote-code module cache
    goes into ``cwd/hf_modules``, so no copy cached by another run is used. Returns the child's stdout.
    """
    env = {"PYTHONPATH": None, "HF_MODULES_CACHE": str(Path(cwd) / "hf_modules")}
    return run_python(code, *args, blocked=("temde_hf",), cwd=cwd, env=env, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a launcher's rendezvous or a web server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch_run(
    *args: str,
    cwd: str | Path | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """`accelerate launch` two CPU processes running `args` (a script or ``-m module`` and its arguments).

    Every launcher flag is explicit, so a developer's own accelerate config cannot leak in; each process
    gets one thread (two processes share two cores). Returns the finished launch, failed or not (its
    exit status, stdout and stderr); `accelerate_launch` is the one that must succeed.

    Raises:
        AssertionError: The launch ran past `timeout` seconds; the message holds every process's Python
            stack at that moment (see `_stop_hung_launch`) and the end of its output.
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *args,
    ]  # fmt: skip
    # faulthandler in every process: SIGABRT then prints its Python stack (what a hang waits on)
    child_env = _child_env({"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})})
    with subprocess.Popen(
        command, cwd=cwd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as launch:
        try:
            stdout, stderr = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stdout, stderr = _stop_hung_launch(launch)
            raise AssertionError(
                f"the launch ran past {timeout:.0f} s; its processes' Python stacks then, and its output:\n"
                + stdout[-3000:]
                + stderr[-12000:]
            ) from None
    return subprocess.CompletedProcess(command, launch.returncode, stdout, stderr)


def _stop_hung_launch(launch: subprocess.Popen[str]) -> tuple[str, str]:
    """Dump the Python stack of every process of a hung launch, kill them all, return the output.

    torch's launcher starts each worker in its own session, so killing the launcher alone would leave the
    workers running and holding the output pipes open (reading them would then hang as well).
    """
    import signal
    import time

    import psutil  # accelerate's own dependency

    try:
        workers = psutil.Process(launch.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    for process in workers:  # SIGABRT: faulthandler writes the stack to the captured stderr, then exits
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGABRT)
    time.sleep(3)
    for process in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    launch.kill()
    return launch.communicate()


def accelerate_launch(
    *args: str,
    cwd: str | Path | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 300,
) -> str:
    """`accelerate_launch_run` that must succeed; returns the launcher's stdout.

    Raises:
        AssertionError: The launch failed (the message ends with its output).
    """
    result = accelerate_launch_run(*args, cwd=cwd, env=env, timeout=timeout)
    if result.returncode:
        # a process's own error usually sits far above the launcher's summary: keep its lines too
        causes = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
        raise AssertionError(
            "\n".join(causes[:20]) + "\n...\n" + result.stdout[-3000:] + result.stderr[-3000:]
        )
    return result.stdout


# The start of every two-process training worker: accelerate's CPU processes, rank and world, the output
# folder (`sys.argv[1]`), and `save_rank_result`, which writes one rank's gradients and loss there.
_DDP_WORKER_HEADER = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path[:0] = {sys_path!r}
from accelerate import Accelerator
from safetensors.torch import save_file

accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
assert world == 2 and accelerator.distributed_type.value == "MULTI_CPU", (world, accelerator.distributed_type)
out = Path(sys.argv[1])


def save_rank_result(name, model, loss):
    grads = {{k: p.grad.contiguous() for k, p in model.named_parameters() if p.grad is not None}}
    save_file(grads, str(out / f"{{name}}_rank{{rank}}.safetensors"))
    (out / f"{{name}}_rank{{rank}}.json").write_text(json.dumps({{"loss": float(loss)}}))
"""


# The end of every two-process worker. A process that exits with its process group alive can abort
# ("terminate called without an active exception", SIGABRT) while the interpreter tears gloo's threads
# down, after the body has done all its work; the barrier first, so no rank leaves while the other
# still talks to it.
_DDP_WORKER_FOOTER = """
accelerator.wait_for_everyone()
accelerator.end_training()  # destroys the process group
"""


def launch_ddp_worker(body: str, out: str | Path, sys_path: Sequence[str | Path] = ()) -> Path:
    """Run `body` in two CPU processes under `accelerate launch`, between the common header and footer.

    The header defines `accelerator`, `rank`, `world`, `out` (= `out`) and
    ``save_rank_result(name, model, loss)``, which writes ``out/{name}_rank{rank}.safetensors`` (the
    gradients) and ``.json`` (the loss); the footer ends the process group. `sys_path` is prepended to
    the workers' `sys.path` (e.g. the tests folder, to import a test module's case builders). Returns `out`.
    """
    out = Path(out)
    script = out / "worker.py"
    header = _DDP_WORKER_HEADER.format(sys_path=[str(p) for p in sys_path])
    script.write_text(header + textwrap.dedent(body) + _DDP_WORKER_FOOTER)
    accelerate_launch(str(script), str(out))
    return out
