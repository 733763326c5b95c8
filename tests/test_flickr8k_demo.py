"""`make demo`'s script (`examples/flickr8k_demo.py`) and the search that chooses its recipe
(`benchmarks/recipe_search.py`): what they train on, judge on and refuse, without training anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from temde_hf.testing import import_script
from temde_hf.training.arguments import parse_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    return import_script(REPO / "examples" / "flickr8k_demo.py", "temde_flickr8k_demo")


@pytest.fixture(scope="module")
def search() -> ModuleType:
    sys.path.insert(0, str(REPO / "benchmarks"))
    return import_script(REPO / "benchmarks" / "recipe_search.py", "temde_recipe_search")


def test_demo_trains_on_the_6k_set_and_is_judged_on_unseen_photos(demo: ModuleType) -> None:
    _, data_args, _ = parse_args([str(demo.CONFIG), "--vision_model_path", "v", "--text_model_path", "t"])
    assert (
        data_args.data.endswith("flickr8k-6k/dataset_flickr8k.json") and data_args.train_split == "train,val"
    )
    assert (
        demo.DEFAULT_DATA.parent.name == "flickr8k-6k"
        and demo.DEFAULT_EVAL_DATA.parent.name == "flickr8k-800"
    )
    args = demo.argparse.Namespace(
        data="train.json", image_root=None, eval_data="unseen.json", eval_image_root="photos"
    )
    # every unseen photo as one gallery (the headline) and in blocks of 200, then that set's test split
    assert demo.galleries(args) == [
        ("all", "unseen.json", "all", "photos", 200),
        ("test", "unseen.json", "test", "photos", 0),
    ]
    args.eval_data = "none"
    assert demo.galleries(args) == [("test", "train.json", "test", None, 0)]


@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
def test_demo_without_data_says_which_flag_to_point_elsewhere(
    demo: ModuleType, tmp_path: Path, flag: str
) -> None:
    missing = tmp_path / "nowhere" / "dataset_flickr8k.json"
    present = tmp_path / "dataset_flickr8k.json"
    present.write_text(json.dumps({"images": []}))
    other = "--eval-data" if flag == "--data" else "--data"
    with pytest.raises(SystemExit) as stop:
        demo.main([flag, str(missing), other, str(present)])
    message = str(stop.value)
    assert f"no dataset at {missing} ({flag})" in message and f"Point {flag} at" in message
    assert "make demo ARGS=" in message and "\n" not in message


def test_demo_launch_gives_the_training_process_every_core(
    demo: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched = []
    monkeypatch.setattr(demo.subprocess, "run", lambda command, env: launched.append(command) or
                        demo.subprocess.CompletedProcess(command, 0))  # fmt: skip
    monkeypatch.setattr(demo, "launch_threads", lambda: 2)
    args = demo.argparse.Namespace(data="d.json", image_root=None, output_dir="out", work_dir="work")
    demo.train(args, [], (Path("v"), Path("t")))
    (command,) = launched
    # without the flag accelerate launch runs a process not told --cpu on one thread
    assert command[command.index("--num_cpu_threads_per_process") + 1] == "2"
    assert command.index("--num_cpu_threads_per_process") < command.index(
        str(REPO / "examples" / "train_temde.py")
    )


def test_demo_table_has_a_stage1_row_per_gallery_and_the_measured_rerank(demo: ModuleType) -> None:
    scores = {
        "i2t_r1": 10,
        "i2t_r5": 20,
        "i2t_r10": 30,
        "t2i_r1": 5,
        "t2i_r5": 15,
        "t2i_r10": 25,
        "rsum": 105,
    }
    gallery = {"full": scores, "n_images": 800, "n_captions": 4000, "fold_size": 200, "folds": [scores] * 4,
               "folds_mean": {**scores, "rsum": 333}}  # fmt: skip
    test = {"full": scores, "n_images": 100, "n_captions": 500,
            "rerank": {"reranker": "alignment", "k": 20, "stage1_weight": 4, "full": {**scores, "rsum": 99}}}  # fmt: skip
    text = demo.results_table({"all": gallery, "test": test}, "X", 7.2, "make demo", "f")
    rows = [line for line in text.splitlines() if line.startswith(("| all", "| test"))]
    assert len(rows) == 4 and "**105.0**" in rows[0] and "99.0" in rows[3] and "alignment rerank" in rows[3]
    assert "all: 800 photos, mean of its 4 blocks of 200" in rows[1] and "333.0" in rows[1]
    assert "all: 800 photos, 4000 captions; test: 100 photos, 500 captions" in text and "7 min" in text


def test_search_runs_every_candidate_at_a_fold_before_the_next(search: ModuleType) -> None:
    order = search.schedule({"a": [], "b": []}, (0, 1), (0, 1))
    assert order[:4] == [("a", 0, 0), ("b", 0, 0), ("a", 1, 0), ("b", 1, 0)] and len(order) == 8
    screen, confirm = search.GRIDS["screen"], search.GRIDS["confirm"]
    assert set(screen[0]) < set(confirm[0]) and set(screen[1]) < set(confirm[1])  # the screen's runs count


def test_search_data_sets_keep_their_own_results(search: ModuleType) -> None:
    six, old = search.DATASETS["flickr8k-6k"], search.DATASETS["flickr8k-800"]
    assert six.results != old.results and six.section != old.section
    assert old.results.name == "recipe_search.json" and old.stages == ("head", "text", "final")
    _, data_args, _ = parse_args([str(six.base_config), "--vision_model_path", "v", "--text_model_path", "t"])
    assert "flickr8k-6k" in data_args.data  # the demo's training set, never the photos it is judged on


def test_every_6k_candidate_is_a_valid_trainer_command(search: ModuleType) -> None:
    base = search.DATASETS["flickr8k-6k"].base_config
    reference, *_ = search.STAGES["6k"]
    assert reference.startswith("demo recipe") and search.STAGES["6k"][reference] == []  # the base itself
    for stage in search.DATASETS["flickr8k-6k"].stages:  # a misspelt flag fails here, not an hour in
        for flags in search.STAGES[stage].values():
            parse_args([str(base), "--vision_model_path", "v", "--text_model_path", "t", *flags])


def test_second_round_starts_from_the_first_rounds_choice_and_reuses_its_runs(search: ModuleType) -> None:
    reference, *_ = search.STAGES["6k-tune"]
    assert search.STAGES["6k-tune"][reference] == search.STAGES["6k"][reference]  # same name, same flags
    run = {"final": {"rsum": 250.0}}
    results = {"stages": {"6k": {reference: {"fold 0 | seed 0": run}}}, "flags": {reference: search.CHOSEN}}
    assert search._same_run(results, "6k-tune", reference, "fold 0 | seed 0") is run
    assert search._same_run(results, "6k-tune", reference, "fold 1 | seed 0") is None  # not run there
    assert search._same_run(results, "6k", reference, "fold 0 | seed 0") is None  # its own stage: not a copy
    results["flags"][reference] = [*search.CHOSEN, "--learning_rate", "3e-3"]  # stored under other flags
    assert search._same_run(results, "6k-tune", reference, "fold 0 | seed 0") is None
    # the demo ships the round's choice: every flag of it is in the demo config
    _, _, demo = parse_args([str(search.CONFIG), "--vision_model_path", "v", "--text_model_path", "t"])
    assert demo.text_trainable_layers == 2 and not demo.freeze_text_tower and demo.freeze_vision_tower
    assert demo.per_device_train_batch_size == 256


def test_the_demo_is_the_tuned_t_emde_candidate_over_the_second_rounds_recipe(search: ModuleType) -> None:
    """The T-EMDE question in the fine-tuned setting moved the demo to its candidate: the demo config is the
    second round's recipe (kept byte for byte for the runs that measured it) plus the candidate's flags."""
    towers = ["--vision_model_path", "v", "--text_model_path", "t"]
    (candidate,) = [name for name in search.STAGES["6k-tuned-temde"] if "T-EMDE" in name]
    flags = search.STAGES["6k-tuned-temde"][candidate]
    assert parse_args([str(search.CONFIG), *towers]) == parse_args(
        [str(search.TEXT2_6K_CONFIG), *towers, *flags]
    )
    model, _, _ = parse_args([str(search.CONFIG), *towers])
    assert model.sketch_fusion == "concat" and model.sketch_vision_feature_layers == [11]


def test_search_refuses_a_fold_count_that_would_not_pair(search: ModuleType, tmp_path: Path) -> None:
    output = tmp_path / "search.json"
    output.write_text(json.dumps({"stages": {}, "flags": {}, "folds": 5}))
    with pytest.raises(SystemExit):
        search.main(["--dataset", "flickr8k-6k", "--folds", "3", "--output", str(output), "--report"])


def test_search_table_shows_no_spread_for_a_single_run(search: ModuleType) -> None:
    one = {"mean": 246.9, "std": 0.0, "n": 1}
    row = {"stage": "6k", "recipe": "r", "rsum": one, "i2t_r1": one, "t2i_r1": one, "seconds": 600.0,
           "paired_delta_rsum": {"mean": -6.3, "std": 0.0, "n": 1}}  # fmt: skip
    line = search.table([row], 5).splitlines()[-1]
    assert "± 0.0" not in line and "246.9 (1 run)" in line and "-6.3 (1 pair)" in line
    assert "246.9 ± 4.0 (3 runs)" in search.table([{**row, "rsum": {**one, "std": 4.0, "n": 3}}], 5)
