"""Loading never goes random: a weights file missing tensors, holding foreign ones or of another shape is
refused in one line naming it, wherever a checkpoint is loaded; the legitimate cases still load."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from temde_hf.cli import main as cli_main
from temde_hf.loading import CheckpointMismatchError, NoSuchFolderError, load_checkpoint
from temde_hf.models.temde import TemdeForImageTextRetrieval, TemdeModel
from temde_hf.testing import run_without_temde_hf, save_tiny_checkpoint, save_tiny_towers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("strict") / "ckpt", seed=0)


def damaged(checkpoint: Path, folder: Path, change) -> Path:
    """A copy of `checkpoint` whose weights file is `change(state_dict)`."""
    shutil.copytree(checkpoint, folder)
    state = load_file(folder / "model.safetensors")
    save_file(change(dict(state)), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def without_projections(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in ("visual_projection.weight", "text_projection.weight")}


def test_missing_projections_are_refused_naming_the_file(checkpoint: Path, tmp_path: Path) -> None:
    folder = damaged(checkpoint, tmp_path / "noproj", without_projections)
    pattern = r"noproj/model\.safetensors: does not hold the weights .* 2 tensors of the model are missing \(text_projection\.weight, visual_projection\.weight\).*copy the checkpoint"
    with pytest.raises(CheckpointMismatchError, match=pattern):
        TemdeModel.from_pretrained(folder)
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(folder)
    with pytest.raises(ValueError, match=pattern):
        TemdeForImageTextRetrieval.from_pretrained(folder)
    model = TemdeModel.from_pretrained(folder, strict=False)  # the explicit way to start them fresh
    assert model.visual_projection.weight.shape[0] == model.config.projection_dim


def test_an_empty_weights_file_is_refused_by_every_command(checkpoint: Path, tmp_path: Path, capsys) -> None:
    folder = damaged(checkpoint, tmp_path / "empty", lambda state: {})
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    commands = [
        ["index", "--model", str(folder), "--images", str(images), "--out", str(tmp_path / "idx")],
        ["export-onnx", str(folder)],
    ]
    for argv in commands:  # one line from the one handler in temde_hf.cli, for every command
        assert cli_main(argv) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"temde-hf {argv[0]}: error: "), last
        assert re.search(r"empty/model\.safetensors: does not hold the weights.*are missing", last), last
    from temde_hf.data import make_synthetic_karpathy

    data = make_synthetic_karpathy(tmp_path / "syn", n_images=4, seed=0)
    assert cli_main(["evaluate", str(folder), "--data", str(data), "--split", "all"]) == 1
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]  # (above it: transformers' progress bars only)
    assert last.startswith("temde-hf evaluate: error: ") and "empty/model.safetensors: does not hold" in last
    assert "MISSING" not in captured.err + captured.out and "LOAD REPORT" not in captured.err + captured.out


def test_foreign_and_misshapen_tensors_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    extra = damaged(checkpoint, tmp_path / "extra", lambda s: {**s, "stray.weight": torch.zeros(2)})
    with pytest.raises(CheckpointMismatchError, match=r"1 tensors are not the model's \(stray\.weight\)"):
        TemdeModel.from_pretrained(extra)

    def reshaped(state: dict) -> dict:
        state["visual_projection.weight"] = torch.zeros(3, 5)
        return state

    wrong = damaged(checkpoint, tmp_path / "shape", reshaped)
    with pytest.raises(
        CheckpointMismatchError, match=r"1 have another shape \(visual_projection\.weight \(3, 5\) vs"
    ):
        TemdeModel.from_pretrained(wrong)


def test_legitimate_differences_still_load(checkpoint: Path, tmp_path: Path) -> None:
    # an earlier checkpoint stored the one-element parameters 0-dim: same values, new shape
    def scalars(state: dict) -> dict:
        state["logit_scale"] = torch.tensor(1.5)
        state["sketch.log_temperature"] = torch.tensor(-0.5)
        return state

    old = TemdeModel.from_pretrained(damaged(checkpoint, tmp_path / "old", scalars))
    assert old.logit_scale.shape == (1,) and old.logit_scale.item() == 1.5
    assert old.sketch.log_temperature.item() == -0.5
    # the head model from a plain dual encoder: a fresh head, the encoder loaded exactly
    reference = TemdeModel.from_pretrained(checkpoint)
    with_head = TemdeForImageTextRetrieval.from_pretrained(checkpoint)
    torch.testing.assert_close(with_head.visual_projection.weight, reference.visual_projection.weight)
    # ... and the dual encoder from a checkpoint with a head: the head is dropped
    head_ckpt = save_tiny_checkpoint(tmp_path / "head", matching_head=True, seed=0)
    TemdeModel.from_pretrained(head_ckpt)
    # a head checkpoint that lost its head is not given a random one
    headless = damaged(
        head_ckpt, tmp_path / "headless", lambda s: {k: v for k, v in s.items() if "itm_head" not in k}
    )
    with pytest.raises(CheckpointMismatchError, match=r"itm_head\."):
        TemdeForImageTextRetrieval.from_pretrained(headless)
    # composing from two towers builds new projections and sketch: nothing to refuse
    vision, text = save_tiny_towers(tmp_path / "towers")
    assert TemdeModel.from_vision_text_pretrained(vision, text).sketch is not None


def test_efficientnet_lite_is_strict_but_drops_or_adds_its_classifier(tmp_path: Path) -> None:
    from temde_hf.models.temde.configuration_efficientnet_lite import EfficientNetLiteConfig
    from temde_hf.models.temde.modeling_efficientnet_lite import (
        EfficientNetLiteForImageClassification,
        EfficientNetLiteModel,
    )

    config = EfficientNetLiteConfig(
        image_size=32, stem_channels=8, kernel_sizes=[3], strides=[2], expand_ratios=[1], out_channels=[8],
        num_block_repeats=[1], hidden_dim=16, num_labels=3,
    )  # fmt: skip
    EfficientNetLiteForImageClassification(config).save_pretrained(tmp_path / "cls")
    EfficientNetLiteModel.from_pretrained(tmp_path / "cls")  # the tower alone: classifier dropped
    EfficientNetLiteModel(config).save_pretrained(tmp_path / "base")
    EfficientNetLiteForImageClassification.from_pretrained(tmp_path / "base")  # a new classifier
    state = load_file(tmp_path / "cls" / "model.safetensors")
    key = next(k for k in state if "stem" in k or "embeddings" in k)
    save_file({k: v for k, v in state.items() if k != key}, tmp_path / "cls" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"cls/model\.safetensors: .*missing"):
        EfficientNetLiteForImageClassification.from_pretrained(tmp_path / "cls")


def test_remote_code_is_strict_without_temde_hf(checkpoint: Path, tmp_path: Path) -> None:
    folder = damaged(checkpoint, tmp_path / "noproj", without_projections)
    out = run_without_temde_hf(
        """
        import sys
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
        except ValueError as err:
            print(type(err).__name__, err)
        AutoModel.from_pretrained(sys.argv[2], trust_remote_code=True)
        print("intact checkpoint loads")
        """,
        str(folder),
        str(checkpoint),
        cwd=tmp_path,
    )
    assert "CheckpointMismatchError" in out and "noproj/model.safetensors" in out
    assert "intact checkpoint loads" in out


def test_handler_refuses_a_damaged_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    from temde_hf.hub.handler import EndpointHandler

    folder = damaged(checkpoint, tmp_path / "noproj", without_projections)
    with pytest.raises(ValueError, match=r"noproj/model\.safetensors: does not hold the weights"):
        EndpointHandler(str(folder))


def test_training_init_from_refuses_damaged_weights_and_missing_folders(
    checkpoint: Path, tmp_path: Path
) -> None:
    from temde_hf.training.arguments import ModelArguments
    from temde_hf.training.train import build_model

    folder = damaged(checkpoint, tmp_path / "noproj", without_projections)
    with pytest.raises(CheckpointMismatchError, match=r"noproj/model\.safetensors"):
        build_model(ModelArguments(init_from=str(folder)))


def test_a_missing_tower_folder_is_not_looked_up_on_the_hub(tmp_path: Path, monkeypatch) -> None:
    vision, text = save_tiny_towers(tmp_path / "towers")
    for missing in (tmp_path / "towers" / "vison", "./towers/vison", "~/no-such-towers/vision"):
        with pytest.raises(NoSuchFolderError, match=r"vision tower .*vison|vision tower ~/no-such-towers"):
            TemdeModel.from_vision_text_pretrained(missing, text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NoSuchFolderError, match=r"text tower towers/txt: no such folder; pass a folder"):
        TemdeModel.from_vision_text_pretrained(vision, "towers/txt")  # "towers/" exists here: a path


def test_training_refuses_missing_model_folders_before_anything_else(tmp_path: Path) -> None:
    from temde_hf.training.arguments import parse_args

    vision, text = save_tiny_towers(tmp_path / "towers")
    common = ["--synthetic_images", "8", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(NoSuchFolderError, match=r"--init_from .*runs/none: no such folder; pass an existing"):
        parse_args(["--init_from", str(tmp_path / "runs" / "none"), *common])
    with pytest.raises(NoSuchFolderError, match=r"--init_from final: no such folder"):
        parse_args(["--init_from", "final", *common])  # a saved model is always a local folder
    with pytest.raises(NoSuchFolderError, match=r"--text_model_path \./towers/txt: no such folder"):
        parse_args(["--vision_model_path", str(vision), "--text_model_path", "./towers/txt", *common])
    model_args, _, _ = parse_args(
        ["--vision_model_path", str(vision), "--text_model_path", str(text), *common]
    )
    assert model_args.text_model_path == str(text)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: (d / "config.json").write_text("{oops"),
            r"config\.json: not valid JSON .*copy the checkpoint",
        ),
        (lambda d: (d / "config.json").write_text("[]"), r"config\.json: not a JSON object"),
        (
            lambda d: (d / "config.json").write_text('{"model_type": "bert"}'),
            r"config\.json: model_type 'bert' is not a T-EMDE checkpoint .*TemdeModel\.save_pretrained",
        ),
        (
            lambda d: (d / "tokenizer_config.json").write_text("{garbled"),
            r"ckpt/tokenizer_config\.json: cannot load the checkpoint .*copy the checkpoint again",
        ),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x08" + bytes(40)),
            r"safetensors weights cannot be read .*truncated or damaged: copy the checkpoint again",
        ),
    ],
)
def test_a_damaged_checkpoint_folder_is_named_by_every_loader(
    checkpoint: Path, tmp_path: Path, change, message
) -> None:
    from temde_hf.hub.publish import export_for_hub

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    change(folder)
    with pytest.raises(ValueError, match=message) as caught:
        load_checkpoint(folder)
    assert "\n" not in str(caught.value)
    if message.startswith(r"config\.json"):  # publish reads config.json, not the weights or the tokenizer
        with pytest.raises(ValueError, match=message):
            export_for_hub(folder, tmp_path / "export")


def test_a_config_error_names_the_config_file(checkpoint: Path, tmp_path: Path) -> None:
    import json

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["vision_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ckpt/config\.json: TemdeConfig\.vision_config is missing"):
        load_checkpoint(folder)


def test_resume_refuses_a_weights_file_that_does_not_fit_the_model(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from temde_hf.testing import tiny_model
    from temde_hf.training.checkpointing import CheckpointError, TrainerState, save_checkpoint
    from temde_hf.training.checkpointing import load_checkpoint as resume_checkpoint

    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainerState()
    saved = save_checkpoint(accelerator, state, tmp_path / "run", keep=2)
    weights = saved / "model.safetensors"
    save_file(without_projections(load_file(weights)), weights, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: does not fit the model .*projection"
    ) as caught:
        resume_checkpoint(accelerator, saved, tmp_path / "run")
    assert "--overwrite_output_dir" in str(caught.value) or "--resume" in str(caught.value)
