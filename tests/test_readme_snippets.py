"""Every ```python block of README.md runs, as a reader would paste it, on tiny stand-ins.

Each path or Hub id a block names is built by `RESOURCES` at that same relative path in a scratch
folder (a tiny checkpoint at ``outputs/demo/final``, tiny towers at the Hub ids, ...), and the block runs
there offline. A block naming anything the table does not know fails, so a new snippet cannot be
skipped silently: add its resources to the table.
"""

from __future__ import annotations

import ast
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from temde_hf.testing import make_colour_gallery, save_tiny_checkpoint, save_tiny_towers

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _checkpoint(path: Path) -> None:
    save_tiny_checkpoint(path, seed=0)


def _checkpoint_with_head(path: Path) -> None:
    save_tiny_checkpoint(path, seed=0, matching_head=True)


def _photo(path: Path) -> None:
    shutil.copyfile(make_colour_gallery(path.parent / "_gallery")["green"], path)


def _tower(kind: str) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        vision, text = save_tiny_towers(path.parent / f"_{kind}_towers")
        shutil.copytree(vision if kind == "vision" else text, path)

    return build


def _gallery_index(path: Path) -> None:
    from temde_hf.gallery import build_gallery_from_folder

    checkpoint = path.parent / "CKPT"
    if not checkpoint.is_dir():
        _checkpoint_with_head(checkpoint)
    images = path.parent / "_index_images"
    make_colour_gallery(images)
    build_gallery_from_folder(checkpoint, images, store_tokens=True, progress=False).save(path)


# What each path / Hub id a README block names stands for in CI (built in this order).
RESOURCES: dict[str, Callable[[Path], None]] = {
    "outputs/demo/final": _checkpoint,
    "photo.jpg": _photo,
    "google/vit-base-patch16-224-in21k": _tower("vision"),
    "sentence-transformers/all-MiniLM-L6-v2": _tower("text"),
    "CKPT": _checkpoint_with_head,
    "gallery_index": _gallery_index,
}
# Paths a block writes itself (never prepared; they must not exist before the block runs).
WRITTEN = {"outputs/mine"}
# Strings in blocks that are neither paths nor ids: task names, captions, labels, option values.
_PATHLIKE = re.compile(r"^[\w.-]+/[\w./-]+$|\.(jpe?g|png|json|txt|safetensors)$|^[A-Z]{3,}$|_index$")


def _named_resources(code: str) -> set[str]:
    strings = {node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant)}
    return {s for s in strings if isinstance(s, str) and _PATHLIKE.search(s)}


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4, "the README's usage blocks were not found (the ```python fences changed?)"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = BLOCKS[index]
    named = _named_resources(code)
    unknown = sorted(named - set(RESOURCES) - WRITTEN)
    assert not unknown, (
        f"README python block {index} names {unknown}, which tests/test_readme_snippets.py does not know how "
        "to provide: add each to RESOURCES (or WRITTEN, if the block creates it)"
    )
    for name, build in RESOURCES.items():
        if name in named and not (tmp_path / name).exists():
            build(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a name the table missed fails here, never downloads
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    for name in WRITTEN & named:
        assert (tmp_path / name).exists(), f"block {index} should have written {name}"
