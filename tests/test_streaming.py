"""Streaming training data (`temde_hf.data.streaming`, `temde_hf.training.streaming`): parquet and
webdataset tar shards and a Hub-style dataset folder, block shuffle, disjoint shards per process, exact
resume, bad samples skipped and counted, and the trainer run on a stream."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import datasets
import pytest
import torch

from temde_hf.data.errors import DataError
from temde_hf.data.streaming import (
    ShuffledStream,
    StreamColumns,
    decode_example,
    open_stream,
    prepare_stream,
    shard_for_process,
)
from temde_hf.testing import accelerate_launch, save_tiny_towers, tiny_trainer_argv, truncated_jpeg

N_PHOTOS = 18


@pytest.fixture(scope="module")
def photos(flickr8k_dir: Path) -> list[tuple[str, bytes, list[str]]]:
    """`N_PHOTOS` real Flickr8k photos: ``(key, JPEG bytes, captions)``."""
    entries = json.loads((flickr8k_dir / "dataset_flickr8k.json").read_text())["images"][:N_PHOTOS]
    return [
        (Path(e["filename"]).stem, (flickr8k_dir / "images" / e["filename"]).read_bytes(),
         [s["raw"] for s in e["sentences"]])
        for e in entries
    ]  # fmt: skip


def write_parquet_shards(folder: Path, samples: list, n_shards: int) -> list[Path]:
    """Parquet shards with an embedded ``image`` (`datasets.Image`), ``captions`` and ``image_id``."""
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string")),
                                  "image_id": datasets.Value("string")})  # fmt: skip
    paths = []
    for shard in range(n_shards):
        part = samples[shard::n_shards]
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for _, b, _ in part], "captions": [c for *_, c in part],
             "image_id": [k for k, *_ in part]},
            features=features,
        )  # fmt: skip
        paths.append(folder / f"shard-{shard:03d}.parquet")
        table.to_parquet(str(paths[-1]))
    return paths


def write_tar_shards(folder: Path, samples: list, n_shards: int) -> list[Path]:
    """Webdataset shards: ``{key}.jpg`` + ``{key}.json`` (``{"captions": [...]}``) per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        paths.append(folder / f"shard-{shard:03d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for key, image, captions in samples[shard::n_shards]:
                for name, payload in (
                    (f"{key}.jpg", image),
                    (f"{key}.json", json.dumps({"captions": captions}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return paths


def _stream(
    pattern: str, rank: int = 0, world: int = 1, buffer_size: int = 4, seed: int = 0
) -> ShuffledStream:
    raw = open_stream(train_files=pattern)
    columns = StreamColumns.detect(list(raw.features))
    return ShuffledStream(
        shard_for_process(prepare_stream(raw, columns, seed), rank, world, pattern), buffer_size, seed, rank
    )


def _key(example: dict) -> str:
    return example.get("__key__") or example["image_id"]


@pytest.mark.parametrize("kind", ["parquet", "tar"])
def test_stream_resumes_exactly_from_a_json_state(tmp_path: Path, photos: list, kind: str) -> None:
    """A stream stopped mid-block, saved as JSON and loaded into a new stream continues with exactly the
    examples (and caption/flip draws) an uninterrupted stream yields, across the end of an epoch."""
    write = write_parquet_shards if kind == "parquet" else write_tar_shards
    write(tmp_path, photos, 3)
    pattern = str(tmp_path / f"*.{kind}")

    def run(stream: ShuffledStream, n: int) -> list:
        out = []
        while len(out) < n:
            for example, pick, view in stream:
                out.append((_key(example), pick, view))
                if len(out) == n:
                    return out
            stream.start_epoch(stream.epoch + 1)
        return out

    whole = run(_stream(pattern), 2 * N_PHOTOS)
    assert sorted(k for k, *_ in whole[:N_PHOTOS]) == sorted(k for k, *_ in photos)  # once per epoch
    assert sorted(k for k, *_ in whole[N_PHOTOS:]) == sorted(k for k, *_ in photos)
    assert [k for k, *_ in whole[:N_PHOTOS]] != [k for k, *_ in whole[N_PHOTOS:]]  # a new order each epoch
    assert [k for k, *_ in whole[:N_PHOTOS]] != [k for k, *_ in photos]  # shuffled
    first = _stream(pattern)
    head = run(first, 7)  # 7: in the middle of block 1 (buffer of 4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _stream(pattern)
    resumed.load_state_dict(state)
    assert head + run(resumed, 2 * N_PHOTOS - 7) == whole
    with pytest.raises(ValueError, match="--shuffle_buffer_size 4 and --seed 0, this run 5"):
        _stream(pattern, buffer_size=5).load_state_dict(
            state
        )  # other blocks: refused, not silently different


def test_processes_read_disjoint_shards_and_uneven_shards_are_refused(tmp_path: Path, photos: list) -> None:
    """Two processes read disjoint shards whose union is every sample, in every epoch; a shard count
    that is not a multiple of the processes is one clear error (not every process reading everything)."""
    write_tar_shards(tmp_path / "four", photos, 4)
    pattern = str(tmp_path / "four" / "*.tar")
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = _stream(pattern, rank, 2)
            stream.start_epoch(epoch)
            seen.append([_key(e) for e, _, _ in stream])
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(k for k, *_ in photos)
    write_tar_shards(tmp_path / "three", photos, 3)
    with pytest.raises(DataError, match=r"3 shard.*cannot be dealt evenly to 2 processes.*multiple of 2"):
        _stream(str(tmp_path / "three" / "*.tar"), 0, 2)


def test_stream_holds_at_most_one_block_in_memory() -> None:
    """Nothing is read ahead beyond the current shuffle block: memory does not grow with the dataset."""
    pulled = []

    def rows():
        for i in range(10_000):
            pulled.append(i)
            yield {"image": b"", "caption": f"c{i}"}

    stream = ShuffledStream(datasets.IterableDataset.from_generator(rows), buffer_size=8, seed=0)
    taken = [e["caption"] for _, (e, _, _) in zip(range(10), stream)]
    assert len(taken) == 10 and len(pulled) <= 16  # two blocks of 8, of 10,000 rows


def test_decode_example_names_bad_images_and_captions(tmp_path: Path, photos: list) -> None:
    """The one image decoder and the one text check decide what is bad; captions come from .txt, .json
    dicts, lists or Karpathy-style sentence dicts."""
    columns = StreamColumns.detect(["jpg", "json", "__key__"])
    assert columns == StreamColumns("jpg", "json", "__key__")
    _, image, captions = photos[0]
    sample = decode_example(
        {"jpg": {"bytes": image, "path": None}, "json": {"captions": captions}}, columns, "k", 0.99
    )
    assert sample.caption == captions[-1] and sample.image.mode == "RGB"
    sentences = StreamColumns("image", "sentences", None)
    raw = {"image": image, "sentences": [{"raw": " "}, {"raw": "a dog"}]}
    assert decode_example(raw, sentences, "k", 0.0).caption == "a dog"  # the blank one is not a choice
    broken = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    with pytest.raises(DataError, match="cannot be decoded"):
        decode_example(
            {"jpg": {"bytes": broken, "path": None}, "json": {"captions": ["x"]}}, columns, "k", 0.0
        )
    with pytest.raises(DataError, match=r"no usable caption.*empty or invisible"):
        decode_example(
            {"jpg": {"bytes": image, "path": None}, "json": {"captions": " \u200b"}}, columns, "k", 0.0
        )
    with pytest.raises(DataError, match=r"no column any of .*--caption_column"):
        StreamColumns.detect(["jpg", "cls"], source="x.tar")


def _argv(towers: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    vision, text = towers
    return tiny_trainer_argv(
        vision, text, out,
        "--streaming", "true", "--shuffle_buffer_size", "4", "--per_device_train_batch_size", "3",
        "--save_steps", "1", "--learning_rate", "2e-3", "--logging_steps", "1",
        "--streaming_log_keys", "true", "--sketch_init_batches", "1", *extra,
    )  # fmt: skip


def _key_log(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / "stream_keys" / f"rank{rank}.jsonl").read_text().splitlines()]


def test_streaming_run_from_a_dataset_folder_skips_and_counts_bad_samples(
    tmp_path: Path, photos: list, caplog: pytest.LogCaptureFixture
) -> None:
    """`--streaming --dataset_name FOLDER` (the Hub code path, on a local folder): each epoch uses every good
    sample once; an undecodable image and a blank caption are skipped, counted, listed and logged."""
    from temde_hf.training.train import main

    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="temde_hf")
    broken = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    good = photos[:12]
    bad = [("broken-image", broken, ["a caption"]), ("blank-caption", photos[12][1], [" ", "\u200b"])]
    write_parquet_shards(tmp_path / "hub-folder" / "data", good + bad, 2)
    out = tmp_path / "run"
    towers = save_tiny_towers(tmp_path / "towers", num_hidden_layers=2)  # the text tower trains its top layer
    main(_argv(towers, out, "--dataset_name", str(tmp_path / "hub-folder"),
               "--max_steps", "5", "--per_device_train_batch_size", "4", "--freeze_vision_tower", "true",
               "--freeze_text_tower", "false", "--text_trainable_layers", "1"))  # fmt: skip
    steps = _key_log(out, 0)
    assert [s["epoch"] for s in steps] == [0, 0, 0, 1, 1]  # 12 good samples = 3 steps of 4 per epoch
    epoch0 = [k for s in steps[:3] for k in s["keys"]]
    assert sorted(epoch0) == sorted(k for k, *_ in good)
    report = json.loads((out / "skipped_samples.json").read_text())
    assert {key for key, _ in report["first"]} == {"broken-image", "blank-caption"}
    assert report["n_skipped"] == len(report["first"]) >= 2
    assert any("skipped" in r.message and "bad sample" in r.message for r in caplog.records)
    # what a map-style run caches (the frozen vision tower, the text tower's lower layers) runs live, and says so
    assert any(
        "frozen part of the text and vision tower(s) runs every step" in r.getMessage()
        for r in caplog.records
    )
    assert (out / "final" / "model.safetensors").is_file()


def test_streaming_run_resumed_at_the_end_of_an_epoch_goes_on_with_the_next(
    tmp_path: Path, photos: list
) -> None:
    """A run pre-empted right after an epoch's last full step resumes into the next epoch, on the same
    samples as an uninterrupted run (one process; two are tested below)."""
    from temde_hf.training.train import main

    torch.set_num_threads(1)
    write_parquet_shards(tmp_path / "shards", photos[:8], 2)
    towers = save_tiny_towers(tmp_path / "towers")
    files = ("--train_files", str(tmp_path / "shards" / "*.parquet"), "--max_steps", "4")
    main(_argv(towers, tmp_path / "whole", *files))
    main(_argv(towers, tmp_path / "parts", *files, "--stop_after_steps", "2"))  # 8 samples = 2 steps of 3
    main(_argv(towers, tmp_path / "parts", *files, "--resume", "latest"))
    assert [s["epoch"] for s in _key_log(tmp_path / "whole", 0)] == [0, 0, 1, 1]
    assert _key_log(tmp_path / "parts", 0) == _key_log(tmp_path / "whole", 0)


def test_streaming_run_needs_max_steps(tmp_path: Path) -> None:
    from temde_hf.training.train import main

    towers = save_tiny_towers(tmp_path / "towers")
    with pytest.raises(ValueError, match=r"no length.*--max_steps"):
        main(_argv(towers, tmp_path / "run", "--train_files", str(tmp_path / "*.tar")))


@pytest.mark.slow
def test_two_process_streaming_run_sees_every_sample_once_per_epoch_and_resumes_exactly(
    tmp_path: Path, photos: list
) -> None:
    """`temde-hf train --streaming` on webdataset shards under `accelerate launch` (2 processes): in every
    epoch the processes train on disjoint samples that together are all of them, and a run pre-empted
    after 2 steps and resumed trains on the same samples in the same order, with the same losses and
    final weights, as an uninterrupted one."""
    from safetensors.torch import load_file

    from temde_hf.training.checkpointing import list_checkpoints

    write_tar_shards(tmp_path / "shards", photos, 6)  # 3 photos per shard, 3 shards per process
    towers = save_tiny_towers(tmp_path / "towers")

    def train(out: Path, *extra: str) -> None:
        argv = _argv(
            towers, out, "--train_files", str(tmp_path / "shards" / "*.tar"), "--max_steps", "6", *extra
        )
        accelerate_launch("-m", "temde_hf.cli", "train", *argv)

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(whole)
    train(parts, "--stop_after_steps", "2")
    train(parts, "--resume", "latest")

    logs = {out: [_key_log(out, rank) for rank in (0, 1)] for out in (whole, parts)}
    assert logs[parts] == logs[whole]  # the same samples, in the same order, on each process
    for epoch in (0, 1):  # 9 samples per process = 3 steps of 3 per epoch
        keys = [
            [k for step in logs[whole][rank] if step["epoch"] == epoch for k in step["keys"]]
            for rank in (0, 1)
        ]
        assert len(keys[0]) == len(keys[1]) == 9
        assert not set(keys[0]) & set(keys[1])
        assert sorted(keys[0] + keys[1]) == sorted(k for k, *_ in photos)

    def history(out: Path) -> list[float]:
        state = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
        return [e["loss"] for e in state["log_history"] if "loss" in e]

    assert len(history(whole)) == 6
    assert history(parts) == pytest.approx(history(whole), abs=1e-6)
    expected, resumed = (load_file(out / "final" / "model.safetensors") for out in (whole, parts))
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-5, msg=key)
