"""The shared test building blocks of `temde_hf.testing` do what the tests rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from temde_hf.testing import (
    GALLERY_CAPTIONS,
    GALLERY_COLOURS,
    accelerate_launch_run,
    run_python,
    tiny_processor,
)


def test_run_python_blocks_packages_and_their_submodules(tmp_path: Path) -> None:
    code = """
    import importlib, sys
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            print(name, "blocked" if "blocked in this test" in str(error) else "missing")
        else:
            print(name, "imported")
    """
    out = run_python(code, "json", "email.mime", "xml", "xml.dom", blocked=("xml", "email"), cwd=tmp_path)
    assert out.split("\n")[:-1] == ["json imported", "email.mime blocked", "xml blocked", "xml.dom blocked"]


def test_run_python_reports_the_childs_error_and_sets_the_environment(tmp_path: Path) -> None:
    code = (
        "import os, sys; print(os.environ.get('TEMDE_X'), 'PYTHONPATH' in os.environ); sys.exit(sys.argv[1])"
    )
    with pytest.raises(AssertionError, match="exit status 1:\nwhy it failed"):
        run_python(code, "why it failed", env={"TEMDE_X": "1"})
    out = run_python(code.replace("sys.exit(sys.argv[1])", "pass"), env={"PYTHONPATH": None}, cwd=tmp_path)
    assert out == "None False\n"


def test_colour_gallery_is_distinct_images_and_in_vocabulary_captions(
    colour_gallery: dict[str, Path],
) -> None:
    assert list(colour_gallery) == list(GALLERY_COLOURS)
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in colour_gallery.values()]
    for name, image in zip(colour_gallery, pixels):
        assert tuple(image[-1, -1]) == GALLERY_COLOURS[name]  # the corner is the image's own colour
    assert len({image.tobytes() for image in pixels}) == len(pixels)
    tokenizer = tiny_processor().tokenizer
    ids = tokenizer(GALLERY_CAPTIONS)["input_ids"]
    assert len(set(GALLERY_CAPTIONS)) == len(GALLERY_CAPTIONS) == 2 * len(GALLERY_COLOURS)
    assert all(tokenizer.unk_token_id not in row for row in ids)  # the tiny BERT sees real words


HANGING_WORKER = """
import os, time
import torch.distributed as dist
from accelerate import Accelerator

def rank_one_never_arrives():
    while True:
        time.sleep(1)

accelerator = Accelerator(cpu=True)
if accelerator.process_index == 1:
    rank_one_never_arrives()
dist.barrier()
"""


@pytest.mark.slow
def test_a_hung_launch_fails_with_every_process_stack_and_leaves_no_process(tmp_path: Path) -> None:
    """A launch past its timeout raises with where each worker waited, and kills the workers too (torch's
    launcher starts them in their own sessions: killing the launcher alone would leave them running)."""
    import psutil

    script = tmp_path / "hangs.py"
    script.write_text(HANGING_WORKER)
    with pytest.raises(AssertionError, match="ran past 20 s") as raised:
        accelerate_launch_run(str(script), timeout=20)
    assert "rank_one_never_arrives" in str(raised.value)  # the hung worker's own stack
    alive = [p for p in psutil.process_iter(["cmdline"]) if str(script) in " ".join(p.info["cmdline"] or [])]
    assert not alive
