"""The package as a user installs it: a wheel, a fresh venv, no checkout.

How the venv stays both clean and fast: it is created without system site-packages and without pip,
the wheel is installed into it with ``pip --python`` (``--no-deps --no-index``: nothing is downloaded),
and its only other content is a ``.pth`` file naming this interpreter's site-packages, so torch,
transformers, ... are not installed again. A path listed in a ``.pth`` file is not itself a site
directory, so the ``.pth`` files inside it, among them the editable install of this checkout, are not
run: the venv can import temde_hf only from the wheel, which the smoke test asserts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
METRIC_DIR = REPO / "temde_hf" / "evaluation" / "retrieval_metric"
SPACE_DIR = REPO / "examples" / "space"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
WHEEL_NAME = f"temde_hf-{VERSION}-py3-none-any.whl"


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH (which names the checkout), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _source_copy(target: Path) -> Path:
    """The files git knows about (tracked or new, not ignored), copied as they are (links stay links)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            dest.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, dest)
    return target


def test_space_requirements_name_the_wheel_this_version_builds() -> None:
    lines = [line.strip() for line in (SPACE_DIR / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert requirements == [f"./{WHEEL_NAME}[index,demo]"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="the wheel is built with `python -m build` (the dev extra)")
    root = tmp_path_factory.mktemp("wheel")
    source = _source_copy(root / "src")
    # --no-isolation: setuptools and wheel come from this environment (offline), never downloaded
    _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root / "dist")],
        cwd=source,
    )
    return root / "dist" / WHEEL_NAME


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv without pip, system site-packages or temde_hf; the dependencies visible through a .pth."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root)
    python = root / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root).strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return root


# Runs in the venv, in the Space's folder, after its `pip install -r requirements.txt`.
SMOKE = """
import json, shutil, sys, sysconfig
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import evaluate

space = Path.cwd()
# 1. The metric, copied out of the installed package, loads with no temde_hf import.
installed = Path(sysconfig.get_path("purelib")) / "temde_hf" / "evaluation" / "retrieval_metric"
metric_copy = space.parent / "retrieval_metric"  # evaluate loads FOLDER/FOLDER.py
shutil.copytree(installed, metric_copy)
metric = evaluate.load(str(metric_copy))
rsum = metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1])["rsum"]
metric_alone = not any(m.split(".")[0] == "temde_hf" for m in sys.modules)

# 2. The package: Auto classes, a pipeline, an export (package data: card template, handler modules).
import temde_hf
from transformers import AutoModel, pipeline
from temde_hf.gallery import build_gallery_from_folder
from temde_hf.hub.publish import export_for_hub
from temde_hf.testing import GALLERY_CAPTIONS, make_colour_gallery, save_tiny_checkpoint

checkpoint = save_tiny_checkpoint(space / "checkpoint", seed=4)
model = AutoModel.from_pretrained(checkpoint)
images = make_colour_gallery(space / "images")
labels = pipeline("zero-shot-image-classification", model=str(checkpoint))(
    str(images["red"]), candidate_labels=["red", "blue"]
)
recalls = {"R@1": 1, "R@5": 2, "R@10": 3}
report = export_for_hub(
    checkpoint, space.parent / "export", eval_json={"dataset": "x", "split": "test", "i2t": recalls, "t2i": recalls, "rsum": 12}
)

# 3. The Space's app.py on a gallery index beside it.
build_gallery_from_folder(checkpoint, space / "images", progress=False).save(space / "gallery_index")
(space / "captions.txt").write_text("\\n".join(GALLERY_CAPTIONS))
spec = spec_from_file_location("app", space / "app.py")
app = module_from_spec(spec)
spec.loader.exec_module(app)
demo = app.SearchApp(space / "checkpoint", space / "gallery_index", space / "captions.txt")
items, ranking = demo.search_images(GALLERY_CAPTIONS[0], k=3)
print(json.dumps({
    "metric_alone": metric_alone,
    "metric_file_is_link": (installed / "metrics.py").is_symlink(),
    "rsum": rsum,
    "package": temde_hf.__file__,
    "model": type(model).__name__,
    "labels": sorted(r["label"] for r in labels),
    "exported": report.files,
    "space_hits": len(items),
    "space_first": ranking.splitlines()[0],
}))
"""


@pytest.mark.slow
def test_the_wheel_installs_in_a_clean_venv_and_serves_the_space_and_metric(
    wheel: Path, venv: Path, tmp_path: Path
) -> None:
    pytest.importorskip("faiss", reason="the Space's gallery needs faiss-cpu (the `index` extra)")
    space = tmp_path / "space"  # what a Space repository holds: app.py, requirements.txt, the wheel
    space.mkdir()
    for name in ("app.py", "requirements.txt"):
        shutil.copy2(SPACE_DIR / name, space / name)
    shutil.copy2(wheel, space / wheel.name)
    python = venv / "bin" / "python"
    # the Space's own `pip install -r requirements.txt` (the dependencies are already in the venv)
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          "-r", "requirements.txt"], cwd=space)  # fmt: skip
    out = _run([str(python), "-c", SMOKE], cwd=space)
    smoke = json.loads(out.strip().splitlines()[-1])
    assert smoke["metric_alone"] and not smoke["metric_file_is_link"] and smoke["rsum"] == 600.0
    assert Path(smoke["package"]).is_relative_to(venv)  # the wheel's copy, not the checkout
    assert smoke["model"] == "TemdeModel" and smoke["labels"] == ["blue", "red"]
    assert {"README.md", "handler.py", "image_decoding.py", "model.safetensors"} <= set(smoke["exported"])
    assert smoke["space_hits"] == 3 and smoke["space_first"].startswith("1. `")
    assert (venv / "bin" / "temde-hf").is_file()  # the console script
