"""A gallery folder or image path that is not what it should be: one line naming it and the fix.

Paths read from ``gallery.json`` stay inside the index folder; numeric index flags are checked before
FAISS sees them (``--nlist 0`` used to crash the process); a FIFO or a directory given as an image is
refused instead of blocking forever.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
import torch

from temde_hf.gallery import GalleryIndex, IndexSpec
from temde_hf.gallery.index_cli import main as index_main
from temde_hf.gallery.search_cli import main as search_main
from temde_hf.inference.tokens import TokenSet
from temde_hf.testing import make_colour_gallery, run_python, save_tiny_checkpoint

pytest.importorskip("faiss", reason="gallery search needs faiss-cpu (the `index` extra)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("bad-gallery") / "tiny", seed=2)


def saved_gallery(folder: Path, with_tokens: bool = False) -> Path:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 8)).astype(np.float32)
    tokens = TokenSet(torch.randn(6, 3, 4), torch.ones(6, 3, dtype=torch.bool)) if with_tokens else None
    GalleryIndex(vectors, [f"img{i}" for i in range(6)], tokens=tokens).save(folder)
    return folder


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "gallery.json").read_text())
    change(meta)
    (folder / "gallery.json").write_text(json.dumps(meta))


def test_the_token_file_named_in_gallery_json_stays_in_its_folder(tmp_path: Path) -> None:
    folder = saved_gallery(tmp_path / "idx", with_tokens=True)
    assert GalleryIndex.load(folder).tokens is not None
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "tokens.fp16.safetensors").rename(outside)
    for name in ("../elsewhere.safetensors", str(outside)):
        edit_meta(folder, lambda meta, name=name: meta["tokens"].update(file=name))
        with pytest.raises(ValueError, match=r"gallery\.json tokens\.file is .*(leads outside|relative to)"):
            GalleryIndex.load(folder)
    (folder / "tokens.fp16.safetensors").symlink_to(outside)  # a link out of the folder: the same
    edit_meta(folder, lambda meta: meta["tokens"].update(file="tokens.fp16.safetensors"))
    with pytest.raises(ValueError, match=r"leads outside"):
        GalleryIndex.load(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "gallery.json").write_text("{not json"), r"gallery\.json: not valid JSON.*rebuild"),
        (lambda f: (f / "gallery.json").write_text("[1, 2]"), r"gallery\.json: not a JSON object"),
        (lambda f: edit_meta(f, lambda m: m.pop("ids")), r"gallery\.json: missing or malformed entry.*ids"),
        (lambda f: edit_meta(f, lambda m: m["index"].update(nprobe=0)), r"gallery\.json: .*--nprobe 0"),
        (
            lambda f: edit_meta(f, lambda m: m.update(paths="abc")),
            r"gallery\.json: 'ids' and 'paths' must be",
        ),
        (lambda f: edit_meta(f, lambda m: m.update(paths=[])), r"gallery\.json lists 6 ids and 0 paths"),
        (
            lambda f: (f / "index.faiss").write_bytes(b"garbage" * 10),
            r"an index file cannot be read.*rebuild",
        ),
    ],
)
def test_a_damaged_gallery_folder_is_named(tmp_path: Path, damage, message: str) -> None:
    folder = saved_gallery(tmp_path / "idx")
    damage(folder)
    with pytest.raises(ValueError, match=message) as caught:
        GalleryIndex.load(folder)
    assert "\n" not in str(caught.value)


def test_a_damaged_token_file_header_is_no_memory_error(tmp_path: Path) -> None:
    folder = saved_gallery(tmp_path / "idx", with_tokens=True)
    token_file = folder / "tokens.fp16.safetensors"
    data = bytearray(token_file.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")  # a header length of 4 EiB
    token_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tokens\.fp16\.safetensors: .*too short for its header: truncated"):
        GalleryIndex.load(folder)


def test_index_settings_are_checked_before_faiss(checkpoint: Path, tmp_path: Path) -> None:
    make_colour_gallery(tmp_path / "images")
    # In a child process: before the check, FAISS ended the process with a segmentation fault.
    out = run_python(
        """
        import contextlib, sys
        from temde_hf import cli
        with contextlib.redirect_stderr(sys.stdout):  # the one line the command prints
            print("status", cli.main(["index", *sys.argv[1:]]))
        """,
        "--model", str(checkpoint), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "idx"),
        "--index-type", "global", "--nlist", "0",
        cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert "temde-hf index: error: --nlist 0: must be a whole number >= 1" in out and "status 1" in out
    assert not (tmp_path / "idx").exists()  # refused before any image was encoded
    for flag, value in (("--nprobe", "-3"), ("--pq-m", "0"), ("--k-factor", "-1")):
        with pytest.raises(ValueError, match=rf"{flag} {value}: must be a whole number"):
            index_main(
                ["--model", str(checkpoint), "--images", str(tmp_path / "images"), "--out", "x", flag, value]
            )
    with pytest.raises(ValueError, match=r"--nlist 64: more IVF lists than the 8 training vectors"):
        index_main(["--model", str(checkpoint), "--images", str(tmp_path / "images"), "--out",
                    str(tmp_path / "idx2"), "--index-type", "global", "--nlist", "64"])  # fmt: skip
    with pytest.raises(
        ValueError, match=r"--nlist / --nprobe apply to IVF indexes .*not 'flat' \(the automatic"
    ):
        index_main(["--model", str(checkpoint), "--images", str(tmp_path / "images"), "--out",
                    str(tmp_path / "idx3"), "--nlist", "2"])  # fmt: skip
    with pytest.raises(ValueError, match=r"--pq-m 3: must divide the embedding width 8"):
        GalleryIndex(
            np.eye(8, dtype=np.float32)[:8], list("abcdefgh"), index_type=IndexSpec("ivfpq", 1, 1, 3)
        )


@contextmanager
def released_after(fifo: Path, seconds: float) -> Iterator[None]:
    """If a reader still blocks on `fifo` after `seconds`, open and close its write end, so a test of code
    that (wrongly) reads the pipe fails instead of hanging the suite."""
    done = threading.Event()

    def release() -> None:
        while not done.wait(seconds):
            with suppress(OSError):  # ENXIO while nobody reads
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_or_a_folder_as_image_is_refused_not_read(checkpoint: Path, tmp_path: Path, capsys) -> None:
    images = make_colour_gallery(tmp_path / "images")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(next(iter(images.values()))), "pipe.png", "folder.png"]))
    with released_after(fifo, 20):
        gallery = index_main(
            ["--model", str(checkpoint), "--image-list", str(listing), "--out", str(tmp_path / "idx")]
        )
        assert len(gallery) == 1 and len(gallery.skipped) == 2  # skipped, counted, listed
        reasons = " ".join(s["reason"] for s in gallery.skipped)
        assert "is a named pipe (FIFO), not an image file" in reasons and "is a directory" in reasons
        assert "skipped 2 unreadable" in capsys.readouterr().out
        with pytest.raises(ValueError, match=r"pipe\.png: is a named pipe \(FIFO\), not an image file"):
            search_main(["--index", str(tmp_path / "idx"), "--image", str(fifo)])


def test_index_out_that_is_a_file_is_named(checkpoint: Path, tmp_path: Path) -> None:
    make_colour_gallery(tmp_path / "images")
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ValueError, match=r"--out .*out: is a file; pass a folder for the index"):
        index_main(
            ["--model", str(checkpoint), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]
        )


def test_faiss_errors_reach_the_user_without_their_cpp_location(tmp_path: Path) -> None:
    folder = saved_gallery(tmp_path / "idx")
    (folder / "index.faiss").write_bytes(bytes(64))
    with pytest.raises(ValueError, match=r"an index file cannot be read \(Index type 0x00000000") as caught:
        GalleryIndex.load(folder)
    assert ".cpp" not in str(caught.value) and "Error in" not in str(caught.value)


def test_a_resumed_build_names_a_damaged_shard_listing(checkpoint: Path, tmp_path: Path) -> None:
    make_colour_gallery(tmp_path / "images")
    argv = ["--model", str(checkpoint), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "idx")]
    index_main(argv)
    listing = next((tmp_path / "idx" / "shards").glob("*.skipped.json"))
    listing.write_text("{garbled")
    with pytest.raises(
        ValueError, match=r"skipped\.json: unreadable .*delete it and shard-00000\.safetensors"
    ):
        index_main(argv)
    (tmp_path / "idx" / "build.json").write_text("nonsense")
    with pytest.raises(ValueError, match=r"build\.json: not the JSON object temde-hf index writes"):
        index_main(argv)
