"""Image<->text retrieval metrics (R@1/5/10 both ways, RSUM, median and mean rank) for `evaluate`.

The module stands alone, as `evaluate` expects of a metric: it imports datasets, evaluate and torch,
and ``.metrics``, the package's one implementation of the ranks (``metrics.py`` here is a link to
``temde_hf/evaluation/metrics.py``, which imports only torch; `evaluate.load` copies it beside this
script, and a wheel holds it as a file). Nothing here imports temde_hf.

Load offline from this folder::

    import evaluate
    metric = evaluate.load("temde_hf/evaluation/retrieval_metric")   # or the .py path
    metric.compute(predictions=similarity.T, references=caption_to_image)

Each example is one caption query: ``predictions`` its scores against every image of the gallery
(a row of the `(n_captions, n_images)` text x image similarity), ``references`` the index of its
image. The image->text direction uses the same matrix transposed (an image's rank = the best rank of
its captions), so any number of captions per image works.
"""

from __future__ import annotations

import datasets
import evaluate
import torch

from .metrics import retrieval_metrics

_DESCRIPTION = __doc__
_CITATION = """\
@inproceedings{faghri2018vse,
  title={VSE++: Improving Visual-Semantic Embeddings with Hard Negatives},
  author={Faghri, Fartash and Fleet, David J. and Kiros, Jamie Ryan and Fidler, Sanja},
  booktitle={BMVC}, year={2018}
}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: `(n_captions, n_images)` scores, one row per caption.
    references: `(n_captions,)` the true image index of every caption.
    chunk_size: queries scored at once (memory bound), default 256.
Returns:
    i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_r1, t2i_r5, t2i_r10, t2i_medr, t2i_meanr, rsum
    (recalls in %, ranks 1-based).
Examples:
    >>> metric = evaluate.load("temde_hf/evaluation/retrieval_metric")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1])["rsum"]
    600.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalMetric(evaluate.Metric):
    """R@K, RSUM and ranks of cross-modal retrieval from a text x image similarity matrix."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions: list, references: list, chunk_size: int = 256) -> dict[str, float]:
        similarity = torch.as_tensor(predictions, dtype=torch.float32).T  # (n_images, n_captions)
        return retrieval_metrics(
            similarity, torch.as_tensor(references, dtype=torch.long), chunk_size=chunk_size
        )
