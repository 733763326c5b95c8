"""Publishing: the exported folder is exactly what is uploaded, and it loads without temde_hf."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from temde_hf.hub.publish import export_for_hub, main, push_to_hub
from temde_hf.testing import run_without_temde_hf, save_tiny_checkpoint

TEXTS = ["a red square", "a blue dog on the grass", "this is a photo of a cat"]
EVAL = {
    "dataset": "flickr8k",
    "split": "test",
    "i2t": {"R@1": 1.0, "R@5": 5.0, "R@10": 10.0},
    "t2i": {"R@1": 2.0, "R@5": 6.0, "R@10": 11.0},
    "rsum": 35.0,
}

# Runs in a fresh interpreter, outside the repository, with temde_hf made unimportable: only the
# exported folder's remote code can build the model.
CLEAN_LOAD = """
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor, pipeline

export, image_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
texts = json.loads(sys.argv[4])
model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
batch = processor(images=[Image.open(image_path)], text=texts, return_tensors="pt", padding=True)
with torch.no_grad():
    image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    text = model.get_text_features(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).pooler_output
classifier = pipeline("zero-shot-image-classification", model=export, trust_remote_code=True)
scores = classifier(Image.open(image_path), candidate_labels=["red", "blue", "green"])
save_file({"image": image.contiguous(), "text": text.contiguous()}, out)
print(json.dumps({
    "model_module": type(model).__module__,
    "processor_class": type(processor).__name__,
    "pipeline_scores": scores,
    "temde_hf_loaded": any(m.split(".")[0] == "temde_hf" for m in sys.modules),
}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("publish") / "tiny-temde")
    # training leftovers that must never be uploaded
    torch.save({"step": 1}, folder / "optimizer.pt")
    (folder / "pytorch_model.bin").write_bytes(b"not really weights")
    (folder / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-10").mkdir()
    return folder


def test_export_holds_exactly_the_hub_files(checkpoint: Path, tmp_path: Path) -> None:
    report = export_for_hub(checkpoint, tmp_path / "export", eval_json=EVAL, repo_id="someone/tiny")
    exported = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exported == report.files
    assert {
        "model.safetensors",
        "config.json",
        "processor_config.json",
        "tokenizer.json",
        "README.md",
        "handler.py",
        "modeling_temde.py",
        "configuration_temde.py",
        "processing_temde.py",
    } <= set(exported)
    assert not [n for n in exported if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert set(report.skipped) == {"optimizer.pt", "pytorch_model.bin", "trainer_state.json", "checkpoint-10"}
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    for ref in config["auto_map"].values():  # every auto_map module ships
        assert (tmp_path / "export" / f"{ref.split('.')[0]}.py").is_file()
    # the processor's auto_map is written by `save_pretrained` itself; the export copies the file as is
    processor_config = (tmp_path / "export" / "processor_config.json").read_text()
    assert processor_config == (checkpoint / "processor_config.json").read_text()
    assert json.loads(processor_config)["auto_map"]["AutoProcessor"] == "processing_temde.TemdeProcessor"
    assert "**RSUM: 35.0**" in (tmp_path / "export" / "README.md").read_text()
    with pytest.raises(ValueError, match="not empty"):
        export_for_hub(checkpoint, tmp_path / "export")


def test_export_refuses_pickle_only_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "temde", "auto_map": {}}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights only in a pickle format \(pytorch_model\.bin\)"):
        export_for_hub(tmp_path, tmp_path / "out")


def test_export_refuses_a_processor_config_without_auto_map(tmp_path: Path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    config_path = checkpoint / "processor_config.json"
    config = json.loads(config_path.read_text())
    del config["auto_map"]  # as written by a processor class that was not registered for AutoProcessor
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"processor_config\.json has no auto_map entry for AutoProcessor"):
        export_for_hub(checkpoint, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_dry_run_uploads_nothing_and_push_uploads_the_export(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: calls.append(("create_repo", k)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.append(("upload_folder", k)))
    report = main(
        [str(checkpoint), "--repo-id", "someone/tiny", "--out-dir", str(tmp_path / "dry"), "--dry-run"]
    )
    assert calls == [] and "model.safetensors" in report.files
    push_to_hub(checkpoint, "someone/tiny", out_dir=tmp_path / "real", eval_json=EVAL)
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    assert calls[1][1]["folder_path"] == str(tmp_path / "real")
    assert calls[1][1]["repo_id"] == "someone/tiny"


@pytest.mark.slow
def test_export_loads_in_clean_subprocess_with_same_embeddings(
    checkpoint: Path, colour_gallery: dict[str, Path], tmp_path: Path
) -> None:
    from temde_hf import TemdeModel, TemdeProcessor

    export = tmp_path / "export"
    export_for_hub(checkpoint, export, eval_json=EVAL)
    image_path = colour_gallery["orange"]
    out = tmp_path / "embeds.safetensors"
    stdout = run_without_temde_hf(
        CLEAN_LOAD,
        str(export),
        str(image_path),
        str(out),
        json.dumps(TEXTS),
        cwd=tmp_path,
        timeout=240,
    )
    info = json.loads(stdout.strip().splitlines()[-1])
    assert info["model_module"].startswith("transformers_modules"), info  # remote code, not the package
    assert info["processor_class"] == "TemdeProcessor" and not info["temde_hf_loaded"]

    model = TemdeModel.from_pretrained(checkpoint).eval()
    processor = TemdeProcessor.from_pretrained(checkpoint)
    batch = processor(images=[Image.open(image_path)], text=TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    remote = load_file(out)
    torch.testing.assert_close(remote["image"], image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote["text"], text.pooler_output, atol=1e-5, rtol=1e-5)
    scores = [s["score"] for s in info["pipeline_scores"]]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5


def test_overwrite_never_deletes_the_checkpoint_or_foreign_files(tmp_path: Path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "runs" / "ckpt")
    before = sorted(p.name for p in checkpoint.iterdir())
    for out_dir in (tmp_path / "runs", tmp_path, checkpoint):  # contains it (twice), is it
        with pytest.raises(ValueError, match=r"--out-dir .* (contains|is) the checkpoint"):
            export_for_hub(checkpoint, out_dir, overwrite=True)
        with pytest.raises(ValueError, match=r"(contains|is) the checkpoint"):
            main([str(checkpoint), "--repo-id", "a/b", "--out-dir", str(out_dir), "--dry-run", "--overwrite"])
    inside = checkpoint / "export"
    inside.mkdir()
    (inside / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"inside the checkpoint.*never deletes"):
        export_for_hub(checkpoint, inside, overwrite=True)
    assert (inside / "config.json").read_text() == "{}"
    (inside / "config.json").unlink()
    inside.rmdir()
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    # a folder holding anything the export does not write is not an earlier export: left alone
    other = tmp_path / "other"
    (other / "notes").mkdir(parents=True)
    (other / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"other: holds metrics\.json, notes, which this export does not"):
        export_for_hub(checkpoint, other, overwrite=True)
    assert (other / "metrics.json").is_file() and (other / "notes").is_dir()


def test_overwrite_replaces_an_earlier_export_but_a_dry_run_deletes_nothing(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    first = export_for_hub(checkpoint, out, eval_json=EVAL)
    assert "image_decoding.py" in first.files  # the handler's image decoder ships beside it
    source = Path(__file__).parents[1] / "temde_hf" / "data" / "image_decoding.py"
    assert (out / "image_decoding.py").read_bytes() == source.read_bytes()  # the package's one decoder
    (out / "README.md").write_text("stale card")
    with pytest.raises(ValueError, match=r"not empty, and a dry run deletes nothing"):
        main([str(checkpoint), "--repo-id", "a/b", "--out-dir", str(out), "--dry-run", "--overwrite"])
    assert (out / "README.md").read_text() == "stale card"
    again = export_for_hub(checkpoint, out, overwrite=True)
    assert again.files == first.files and (out / "README.md").read_text() != "stale card"


def test_publish_keeps_the_towers_and_names_of_the_checkpoints_card(tmp_path: Path) -> None:
    """`publish --dry-run` without --base-model renders the card again, keeping what the trainer wrote."""
    from huggingface_hub import ModelCard

    from temde_hf.hub.model_card import write_model_card

    checkpoint = save_tiny_checkpoint(tmp_path / "final")
    towers = ["google/vit-base-patch16-224-in21k", "sentence-transformers/all-MiniLM-L6-v2"]
    write_model_card(
        checkpoint,
        EVAL,
        checkpoint / "README.md",
        base_models=towers,
        model_name="temde-demo",
        dataset_name="Flickr8k",
    )
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    report = main(
        [str(checkpoint), "--repo-id", "someone/temde-demo", "--out-dir", str(tmp_path / "x"), "--dry-run",
         "--eval-json", str(tmp_path / "eval.json")]
    )  # fmt: skip
    card = ModelCard.load(report.out_dir / "README.md")
    assert card.data.base_model == towers and card.data.model_name == "temde-demo"
    assert card.data.eval_results[0].dataset_name == "Flickr8k"
    assert 'repo = "someone/temde-demo"' in card.text
    # given on the command line, a tower list replaces the card's
    report = main(
        [
            str(checkpoint),
            "--repo-id",
            "someone/t",
            "--out-dir",
            str(tmp_path / "y"),
            "--dry-run",
            "--base-model",
            "a/b",
        ]
    )
    assert ModelCard.load(report.out_dir / "README.md").data.base_model == ["a/b"]


def test_card_copy_never_overwrites_and_a_dry_run_writes_only_its_export(
    checkpoint: Path, tmp_path: Path
) -> None:
    weights = checkpoint / "model.safetensors"
    before = weights.read_bytes()
    base = ["--repo-id", "user/tiny", "--dry-run"]
    with pytest.raises(
        ValueError, match=r"--card-copy .*model\.safetensors: already exists.*pass a new path"
    ):
        main([str(checkpoint), *base, "--out-dir", str(tmp_path / "a"), "--card-copy", str(weights)])
    assert weights.read_bytes() == before and not (tmp_path / "a").exists()  # refused before any export
    outside = tmp_path / "cards" / "tiny.md"
    main([str(checkpoint), *base, "--out-dir", str(tmp_path / "b"), "--card-copy", str(outside)])
    assert not outside.exists() and not outside.parent.exists()  # a dry run writes only into --out-dir
    inside = tmp_path / "c" / "card-copy.md"
    main([str(checkpoint), *base, "--out-dir", str(tmp_path / "c"), "--card-copy", str(inside)])
    assert inside.read_text() == (tmp_path / "c" / "README.md").read_text()


def test_symlinks_in_the_checkpoint_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "linked"
    folder.mkdir()
    for path in checkpoint.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    secret = tmp_path / "private.json"
    secret.write_text('{"token": "hf_secret"}')
    (folder / "extra.json").symlink_to(secret)
    with pytest.raises(ValueError, match=r"linked/extra\.json: is a symbolic link \(to .*private\.json\)"):
        export_for_hub(folder, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_leaves_out_local_tower_paths_but_keeps_hub_ids(tmp_path: Path) -> None:
    """A tower composed from a local folder records that folder in config.json; the export leaves it out
    (it names the trainer's machine), keeps a Hub id, and the exported config still loads."""
    from temde_hf import TemdeConfig

    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_config"]["_name_or_path"] = "google/vit-base-patch16-224-in21k"
    config["text_config"]["_name_or_path"] = str(tmp_path / "home" / "someone" / "local-bert")
    (checkpoint / "config.json").write_text(json.dumps(config))
    export_for_hub(checkpoint, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["vision_config"]["_name_or_path"] == "google/vit-base-patch16-224-in21k"
    assert "_name_or_path" not in exported["text_config"]
    del config["text_config"]["_name_or_path"]
    assert exported == config  # nothing else changed
    assert str(tmp_path) not in (tmp_path / "export" / "config.json").read_text()
    loaded = TemdeConfig.from_pretrained(tmp_path / "export")
    assert loaded.text_config.hidden_size == config["text_config"]["hidden_size"]
