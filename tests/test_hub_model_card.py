"""Model cards: rendered from the checkpoint config + an evaluation JSON, never hand-written numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from temde_hf.evaluation.metrics import metrics_from_ranks
from temde_hf.hub.model_card import load_eval_results, render_model_card, write_model_card
from temde_hf.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("card") / "tiny-temde")


def _evaluate_layout(seed: int = 3) -> dict:
    """A `temde-hf evaluate`-style metrics.json, from real rank computations on random ranks."""
    gen = torch.Generator().manual_seed(seed)
    i2t, t2i = torch.randint(0, 30, (40,), generator=gen), torch.randint(0, 40, (200,), generator=gen)
    full = metrics_from_ranks(i2t, t2i)
    folds = [metrics_from_ranks(i2t[:10], t2i[:50]), metrics_from_ranks(i2t[10:], t2i[50:])]  # uneven
    folds_mean = {key: sum(f[key] for f in folds) / 2 for key in full}
    return {
        "n_images": 40,
        "n_captions": 200,
        "full": full,
        "folds": folds,
        "folds_mean": folds_mean,
        "checkpoint": "runs/tiny",
        "data": "../shared/data/flickr8k-800/dataset_flickr8k.json",
        "split": "test",
        "embed_dim": 48,
    }


def _model_index_metrics(card_path: Path) -> dict[str, float]:
    """The model-index metrics by name ("image-to-text R@1": value); each is a Hub `recall` metric."""
    text = card_path.read_text()
    header = yaml.safe_load(text.split("---")[1])
    (entry,) = header["model-index"]
    (result,) = entry["results"]
    assert result["dataset"]["split"] == "test"
    assert {m["type"] for m in result["metrics"]} == {"recall"}
    return {m["name"]: m["value"] for m in result["metrics"]}


RECALL_NAMES = {
    f"{label} R@{k}": f"{direction}_r{k}"
    for direction, label in (("i2t", "image-to-text"), ("t2i", "text-to-image"))
    for k in (1, 5, 10)
}


def test_card_yaml_parses_and_model_index_equals_eval_json(checkpoint: Path, tmp_path: Path) -> None:
    metrics = _evaluate_layout()
    eval_path = tmp_path / "metrics.json"
    eval_path.write_text(json.dumps(metrics))
    card_path = write_model_card(
        checkpoint,
        eval_path,
        tmp_path / "README.md",
        repo_id="someone/tiny-temde",
        base_models=["google/vit-base-patch16-224-in21k", "sentence-transformers/all-MiniLM-L6-v2"],
        training_info={"epochs": 3, "batch_size": 32},
    )
    values = _model_index_metrics(card_path)
    full = metrics["full"]
    assert values == {name: round(full[key], 2) for name, key in RECALL_NAMES.items()}  # six recalls, rounded

    card = ModelCard.load(card_path)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.base_model == [
        "google/vit-base-patch16-224-in21k",
        "sentence-transformers/all-MiniLM-L6-v2",
    ]
    assert card.data.datasets is None  # "flickr8k-800" is a folder name, not a Hub dataset id
    assert "- **Trained on:** flickr8k-800" in card.text  # named in the prose instead
    assert card.data.widget and card.data.widget[0]["candidate_labels"]
    # the results table in the prose shows the same numbers, and the settings come from config.json
    assert f"**RSUM: {round(full['rsum'], 2)}**" in card.text
    assert f"| image → text | {round(full['i2t_r1'], 2)} |" in card.text
    assert "| `n_sketches` | 4 |" in card.text and "| `sketch_width` | 8 |" in card.text
    assert "| `epochs` | 3 |" in card.text
    assert "2105.04242" in card.text and "2006.01894" in card.text
    assert 'repo = "someone/tiny-temde"' in card.text


def test_model_index_is_what_huggingface_hub_writes(checkpoint: Path, tmp_path: Path) -> None:
    """huggingface_hub's own tools build (`metadata_eval_result`) and read (`model_index_to_eval_results`)
    the same model-index: task, dataset and metric typed as the Hub expects."""
    from huggingface_hub import metadata_eval_result
    from huggingface_hub.repocard_data import model_index_to_eval_results

    full = _evaluate_layout()["full"]
    card = render_model_card(
        checkpoint, _evaluate_layout(), model_name="tiny", dataset_name="Flickr8k sample"
    )
    header = yaml.safe_load(str(card).split("---")[1])
    expected = metadata_eval_result(
        model_pretty_name="tiny",
        task_pretty_name="Image-text retrieval",
        task_id="zero-shot-image-classification",
        metrics_pretty_name="image-to-text R@1",
        metrics_id="recall",
        metrics_value=round(full["i2t_r1"], 2),
        metrics_config=None,
        dataset_pretty_name="Flickr8k sample",
        dataset_id="flickr8k-800",
        dataset_split="test",
    )["model-index"][0]
    (result,) = header["model-index"][0]["results"]
    (expected_result,) = expected["results"]
    assert result["task"] == expected_result["task"] and result["dataset"] == expected_result["dataset"]
    first = {k: v for k, v in result["metrics"][0].items() if k != "args"}
    assert first == {k: v for k, v in expected_result["metrics"][0].items() if k != "verified"}  # unverified
    assert result["metrics"][0]["args"] == {"k": 1}
    name, parsed = model_index_to_eval_results(header["model-index"])
    assert name == "tiny" and len(parsed) == 6
    assert {(r.task_type, r.metric_type, r.dataset_type) for r in parsed} == {
        ("zero-shot-image-classification", "recall", "flickr8k-800")
    }
    assert all(r.metric_value == round(r.metric_value, 2) for r in parsed)


def test_card_embed_dim_is_the_configs(tmp_path: Path) -> None:
    """An anchor coder's K is not 2^H: the card reads the width from the config, never recomputes it."""
    from temde_hf import TemdeConfig

    checkpoint = save_tiny_checkpoint(tmp_path / "anchor", sketch_coder="anchor", sketch_width=5)
    config = TemdeConfig.from_pretrained(checkpoint)
    assert config.embed_dim == 16 + 4 * 5 != 16 + 4 * 2**config.n_hyperplanes
    text = str(render_model_card(checkpoint, None))
    assert f"- **Embedding size:** {config.embed_dim}" in text and "| `sketch_width` | 5 |" in text


def test_towers_from_the_hub_are_the_base_models(tmp_path: Path) -> None:
    """Without explicit base models, the towers' Hub ids recorded in config.json are used; local paths are not."""
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_config"]["_name_or_path"] = "google/vit-base-patch16-224-in21k"
    config["text_config"]["_name_or_path"] = str(tmp_path / "some" / "local-bert")
    (checkpoint / "config.json").write_text(json.dumps(config))
    card = render_model_card(checkpoint, None, repo_id="someone/x")
    assert card.data.base_model == ["google/vit-base-patch16-224-in21k"]


def test_usage_snippet_never_names_the_folder(checkpoint: Path) -> None:
    text = str(render_model_card(checkpoint, None, model_name="temde-demo"))
    assert 'repo = "USER/temde-demo"  # the Hub repo id' in text and 'repo = "tiny-temde"' not in text


def test_folds_mean_block_and_nested_layout(checkpoint: Path) -> None:
    metrics = _evaluate_layout(seed=5)
    card = render_model_card(checkpoint, metrics, eval_block="folds_mean", dataset_name="COCO 1K")
    header = yaml.safe_load(str(card).split("---")[1])
    values = {m["name"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert values["text-to-image R@5"] == round(metrics["folds_mean"]["t2i_r5"], 2)
    dataset = header["model-index"][0]["results"][0]["dataset"]
    assert (dataset["type"], dataset["name"]) == ("flickr8k-800", "COCO 1K")

    nested = {
        "dataset": "flickr8k",
        "split": "val",
        "i2t": {"R@1": 10.0, "R@5": 30.0, "R@10": 45.0},
        "t2i": {"R@1": 8.0, "R@5": 26.0, "R@10": 40.123},
        "rsum": 159.0,
    }
    card = render_model_card(checkpoint, nested)
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {
        "image-to-text R@1": 10.0,
        "image-to-text R@5": 30.0,
        "image-to-text R@10": 45.0,
        "text-to-image R@1": 8.0,
        "text-to-image R@5": 26.0,
        "text-to-image R@10": 40.12,
    }


def test_card_without_results_and_bad_inputs(checkpoint: Path, tmp_path: Path) -> None:
    card = render_model_card(checkpoint, None)
    assert card.data.eval_results is None and "No evaluation results" in card.text
    with pytest.raises(ValueError, match=r"t2i\.R@5"):
        load_eval_results(
            {
                "dataset": "x",
                "split": "test",
                "i2t": {"R@1": 1, "R@5": 1, "R@10": 1},
                "t2i": {"R@1": 1, "R@10": 1},
                "rsum": 3,
            }
        )
    with pytest.raises(ValueError, match="does not exist"):
        load_eval_results(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"config\.json"):
        render_model_card(tmp_path, None)


@pytest.mark.slow
def test_card_from_a_real_evaluate_run(checkpoint: Path, tmp_path: Path) -> None:
    """`temde-hf evaluate` on synthetic data -> metrics.json -> card: the numbers travel unchanged."""
    from temde_hf.data.synthetic import make_synthetic_karpathy
    from temde_hf.evaluation.cli import main as evaluate_main

    data = make_synthetic_karpathy(tmp_path / "synthetic", n_images=20, seed=1)
    data_json = next(data.glob("dataset_*.json")) if data.is_dir() else data
    result = evaluate_main(
        [str(checkpoint), "--data", str(data_json), "--split", "test", "--output-dir", str(tmp_path / "eval"),
         "--rerank", "alignment", "--rerank-k", "5", "--rerank-fusion", "2"]
    )  # fmt: skip
    card_path = write_model_card(checkpoint, tmp_path / "eval" / "metrics.json", tmp_path / "README.md")
    values = _model_index_metrics(card_path)  # the model-index reports stage 1, the model's own score
    assert values["image-to-text R@1"] == round(result["full"]["i2t_r1"], 2)
    assert values["text-to-image R@10"] == round(result["full"]["t2i_r10"], 2)
    assert ModelCard.load(card_path).data.datasets is None  # a local folder's name is no Hub dataset id
    text = card_path.read_text()
    assert f"**RSUM with the second stage: {round(result['rerank']['full']['rsum'], 2)}**" in text
    assert "--rerank alignment --rerank-k 5 --rerank-fusion 2" in text


def test_card_shows_the_second_stage_only_when_evaluated_with_one(checkpoint: Path) -> None:
    metrics = _evaluate_layout()
    plain = render_model_card(checkpoint, metrics)
    assert "second stage" not in str(plain)
    reranked = _evaluate_layout(seed=4)["full"]
    metrics["rerank"] = {
        "reranker": "itm",
        "k": 20,
        "stage1_weight": 0.5,
        "full": reranked,
        "latency_ms": None,
    }
    card = str(render_model_card(checkpoint, metrics))
    assert f"**RSUM with the second stage: {round(reranked['rsum'], 2)}**" in card
    assert f"| text → image | {round(reranked['t2i_r1'], 2)} | {round(reranked['t2i_r5'], 2)} |" in card
    assert "--rerank itm --rerank-k 20 --rerank-fusion 0.5" in card
    assert f"**RSUM: {round(metrics['full']['rsum'], 2)}**" in card  # stage 1 stays the headline


@pytest.mark.parametrize("fusion", ["none", "concat"])
def test_card_describes_the_pooling_the_checkpoint_has(fusion: str, tmp_path: Path) -> None:
    """A checkpoint without a sketch is not advertised as sketch pooling; base models are not pinned on a tower."""
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", sketch_fusion=fusion)
    text = str(render_model_card(checkpoint, _evaluate_layout(), base_models=["someone/text-tower"]))
    assert ("sketch switched off" in text) == (fusion == "none")
    assert ("with **T-EMDE** sketch pooling" in text) == (fusion != "none")
    assert "- **Initialised from:** someone/text-tower" in text and "(initialised from" not in text
