"""Frozen-tower caches on disk: memory-mapped reads, resumable and sharded builds, keys, the ONNX pass."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from temde_hf.export.tower_graph import OnnxTower, export_tower, run_tower
from temde_hf.testing import TINY_IMAGE_SIZE, accelerate_launch, tiny_model
from temde_hf.training.features import build_tower_cache
from temde_hf.training.tower_cache import CachePlan, CacheWriter, RowView, StaleCacheError, TowerOutputs

N_ITEMS, BATCH = 22, 4  # 6 build batches, the last one short
LENGTHS = [2 + r % 8 for r in range(N_ITEMS)]  # the token counts of `Captions`


class Pixels:
    """Item ``i`` -> a fixed random image (seeded by ``i``); records the items it was asked for."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at, self.seen = fail_at, []

    def __call__(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.fail_at is not None and self.fail_at in rows:
            raise KeyboardInterrupt("simulated interruption")
        self.seen.extend(rows)
        images = [torch.randn(3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(r))
                  for r in rows]  # fmt: skip
        return {"pixel_values": torch.stack(images)}


class Captions:
    """Item ``i`` -> token ids of random length 2..9 (seeded by ``i``), padded to the batch's longest."""

    def __call__(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        ids = [torch.randint(5, 60, (2 + r % 8,), generator=torch.Generator().manual_seed(r)) for r in rows]
        length = max(len(i) for i in ids)
        input_ids = torch.stack([torch.nn.functional.pad(i, (0, length - len(i))) for i in ids])
        mask = torch.stack([(torch.arange(length) < len(i)).long() for i in ids])
        return {"input_ids": input_ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def _build(folder: Path, tower, inputs, **kwargs) -> TowerOutputs:
    settings = {"batch_size": BATCH, "dtype": "float32", "backend": "torch", **kwargs}
    return build_tower_cache(folder, "k1", tower, inputs, N_ITEMS, **settings)


def test_cached_rows_equal_the_live_tower_and_are_memory_mapped(model, tmp_path: Path) -> None:
    """Rows read back equal the tower's outputs (to float32 rounding across batchings, to fp16 precision in float16);
    the arrays are read-only memory maps of the files, and a read returns only the rows asked for."""
    images = Pixels()
    rows = torch.tensor([21, 3, 0, 3, 17])
    live_hidden, live_pooled = run_tower(model.vision_model, images(rows.tolist()))
    for dtype, tolerance in (("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 2e-2)):
        cache = _build(tmp_path / dtype, model.vision_model, Pixels(), dtype=dtype, num_workers=2)
        assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in cache.arrays.values())
        hidden, pooled, mask = cache.rows(rows)
        assert mask is None and hidden.shape == live_hidden.shape and pooled.shape == live_pooled.shape
        torch.testing.assert_close(hidden.float(), live_hidden, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(pooled.float(), live_pooled, atol=tolerance, rtol=tolerance)
    text = _build(tmp_path / "text", model.text_model, Captions(), lengths=LENGTHS)
    hidden, pooled, mask = text.rows(torch.tensor([1, 7]))  # lengths 3 and 9
    live = Captions()([1, 7])
    live_hidden, live_pooled = run_tower(model.text_model, live)
    assert hidden.shape == (2, 9, live_hidden.shape[2]) and mask.tolist() == [[1] * 3 + [0] * 6, [1] * 9]
    torch.testing.assert_close(hidden[0, :3], live_hidden[0, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[1], live_hidden[1], atol=1e-5, rtol=1e-5)
    assert hidden[0, 3:].abs().sum() == 0  # padding rows stay zero
    torch.testing.assert_close(pooled, live_pooled, atol=1e-5, rtol=1e-5)


def test_cached_forward_equals_live_forward_within_the_cache_dtype(model, tmp_path: Path) -> None:
    """The model fed cached fp16 tower outputs embeds like the model fed pixels and tokens."""
    from temde_hf.training.batches import model_inputs

    vision = _build(tmp_path / "v", model.vision_model, Pixels(), dtype="float16")
    text = _build(tmp_path / "t", model.text_model, Captions(), dtype="float16", lengths=LENGTHS)
    rows = torch.tensor([4, 9, 13])
    hidden, pooled, _ = vision.rows(rows)
    t_hidden, t_pooled, mask = text.rows(rows)
    length = int(mask.sum(1).max())
    cached = model_inputs({"vision_hidden": hidden, "vision_pooled": pooled, "text_hidden": t_hidden[:, :length],
                           "text_pooled": t_pooled, "attention_mask": mask[:, :length]})  # fmt: skip
    with torch.inference_mode():
        a = model(**cached, return_dict=True)
        b = model(**Pixels()(rows.tolist()), **Captions()(rows.tolist()), return_dict=True)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(a.text_embeds, b.text_embeds, atol=5e-3, rtol=5e-3)


class Interrupted(Captions):
    """`Captions` that dies once asked for item `fail_at`, and records the items it made."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at, self.seen = fail_at, []

    def __call__(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.fail_at is not None and self.fail_at in rows:
            raise KeyboardInterrupt("simulated interruption")
        self.seen.extend(rows)
        return super().__call__(rows)


@pytest.mark.parametrize("part", ["images", "captions"])
def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(
    model, tmp_path: Path, part: str
) -> None:
    """Images in row order; captions in length order (`order.bin`), so the batches done are not a prefix."""
    if part == "images":
        tower, make, settings = model.vision_model, Pixels, {}
        fail_at, done = 13, list(range(12))  # dies in batch 3 of 6
    else:
        tower, make, settings = model.text_model, Interrupted, {"lengths": LENGTHS}
        order = sorted(range(N_ITEMS), key=LENGTHS.__getitem__)
        fail_at, done = order[12], order[:12]
    whole = _build(tmp_path / "whole", tower, make(), **settings)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "resumed", tower, make(fail_at=fail_at), **settings)
    assert not (tmp_path / "resumed" / "header.json").exists()  # never readable half-built
    with pytest.raises(StaleCacheError, match="no finished"):
        TowerOutputs(tmp_path / "resumed", "k1")
    second = make()
    resumed = _build(tmp_path / "resumed", tower, second, **settings)
    assert sorted(second.seen) == sorted(set(range(N_ITEMS)) - set(done))  # batches 0-2 not computed again
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")
    for a, b in zip(resumed.rows(torch.arange(N_ITEMS)), whole.rows(torch.arange(N_ITEMS))):
        assert (a is None and b is None) or torch.equal(a, b)
    if part == "captions":
        return
    # another plan in the folder (another batch size) starts over instead of mixing batches
    third = Pixels()
    build_tower_cache(
        tmp_path / "resumed", "k2", tower, third, N_ITEMS, batch_size=5, dtype="float32", backend="torch"
    )
    assert sorted(set(third.seen)) == list(range(N_ITEMS))


def test_a_stale_or_damaged_cache_is_never_read(model, tmp_path: Path) -> None:
    tower = model.vision_model
    _build(tmp_path / "c", tower, Pixels())
    with pytest.raises(StaleCacheError, match="other inputs"):
        TowerOutputs(tmp_path / "c", "another-key")
    # asked for another key, the builder recomputes instead of returning the old rows
    again = Pixels()
    build_tower_cache(
        tmp_path / "c", "k3", tower, again, N_ITEMS, batch_size=BATCH, dtype="float32", backend="torch"
    )
    assert sorted(set(again.seen)) == list(range(N_ITEMS))
    with open(tmp_path / "c" / "hidden.bin", "r+b") as file:
        file.truncate(100)
    with pytest.raises(StaleCacheError, match="damaged"):
        TowerOutputs(tmp_path / "c", "k3")


def test_onnx_tower_graphs_match_eager(model, tmp_path: Path) -> None:
    """Tower graphs (images; captions shorter than the traced length, with padding) within 1e-4 of eager."""
    pytest.importorskip("onnxruntime")
    images = Pixels()(range(3))
    graph = OnnxTower(export_tower(model.vision_model, images, tmp_path / "vision.onnx"))
    with torch.inference_mode():
        want_images = run_tower(model.vision_model, Pixels()(range(5, 10)))
        want_text = run_tower(model.text_model, Captions()([1, 4, 2]))
    for got, want in zip(graph(Pixels()(range(5, 10))), want_images):
        assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4
    captions = Captions()([7, 6])  # 9 tokens: the longest
    graph = OnnxTower(export_tower(model.text_model, captions, tmp_path / "text.onnx"))
    shorter = Captions()([1, 4, 2])  # 3..6 tokens, padded
    got, want = graph(shorter), want_text
    mask = shorter["attention_mask"].bool()
    assert float((got[0] - want[0])[mask].abs().max()) < 1e-4 and float((got[1] - want[1]).abs().max()) < 1e-4
    # the build pass uses the graph by default and gives the eager cache within 1e-4
    onnx = _build(tmp_path / "onnx", model.vision_model, Pixels(), backend="auto", graph_dir=tmp_path / "g")
    eager = _build(tmp_path / "eager", model.vision_model, Pixels())
    assert list((tmp_path / "g").glob("*.onnx"))
    for a, b in zip(onnx.rows(torch.arange(N_ITEMS)), eager.rows(torch.arange(N_ITEMS))):
        assert (a is None and b is None) or float((a - b).abs().max()) < 1e-4


_TWO_PROCESS_BUILD = """
import sys, torch
torch.set_num_threads(1)
from accelerate import Accelerator
from temde_hf.testing import tiny_model
from temde_hf.training.features import build_tower_cache
sys.path.insert(0, sys.argv[2])
from test_tower_cache import N_ITEMS, BATCH, Pixels
accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == 2
torch.manual_seed(0)
tower = tiny_model().vision_model
build_tower_cache(sys.argv[1], "k1", tower, Pixels(), N_ITEMS, batch_size=BATCH, dtype="float16",
                  backend=sys.argv[3], num_workers=1, rank=accelerator.process_index, world_size=2,
                  wait=accelerator.wait_for_everyone)
"""


@pytest.mark.slow
def test_a_two_process_build_equals_the_one_process_build(model, tmp_path: Path) -> None:
    """Under `accelerate launch`, each process fills its batches of the same files: equal to one process
    (the default backend: onnxruntime where installed, the graph exported once by process 0)."""
    backend = "auto"
    script = tmp_path / "build.py"
    script.write_text(_TWO_PROCESS_BUILD)
    accelerate_launch(str(script), str(tmp_path / "two"), str(Path(__file__).parent), backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process: the same kernels, so the same bits
    try:
        _build(tmp_path / "one", model.vision_model, Pixels(), dtype="float16", backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_rows_does_not_load_the_file(tmp_path: Path) -> None:
    """A 384 MiB cache (sparse on disk): opening it and reading batches adds only those batches to memory."""
    plan = CachePlan("k", n_items=4096, tokens=49, width=1000, pooled_width=1000, dtype="float16",
                     has_mask=False, batch_size=64)  # fmt: skip
    writer = CacheWriter(tmp_path / "big", plan)
    writer.prepare()
    # every batch marked done without writing: the rows stay sparse zeros (no disk, quick)
    (tmp_path / "big" / "done.bin").write_bytes(b"\x01" * plan.n_batches)
    writer.finish()
    before = _rss_anon()
    cache = RowView([TowerOutputs(tmp_path / "big", "k")], torch.arange(4096))
    for start in range(0, 4096, 512):
        hidden, pooled, _ = cache.rows(torch.arange(start, start + 64))
        assert hidden.shape == (64, 49, 1000)
    del hidden, pooled
    assert plan.n_bytes("hidden") > 380 * 2**20
    assert _rss_anon() - before < 64 * 2**20


@pytest.mark.gpu
def test_the_gpu_pass_in_bfloat16_channels_last_matches_the_cpu_cache(model, tmp_path: Path) -> None:
    """On a GPU the pass runs in bfloat16 autocast with channels-last images; the rows match fp32 CPU."""
    cpu = _build(tmp_path / "cpu", model.vision_model, Pixels())
    tower = tiny_model().vision_model
    tower.load_state_dict(model.vision_model.state_dict())
    gpu = _build(tmp_path / "gpu", tower.cuda(), Pixels(), device="cuda", backend="auto")
    for a, b in zip(gpu.rows(torch.arange(N_ITEMS))[:2], cpu.rows(torch.arange(N_ITEMS))[:2]):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    assert all(p.is_contiguous() for p in tower.parameters())  # saved with the model: back to the default
