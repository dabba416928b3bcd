"""distinct-n: the ratio of distinct n-grams to all n-grams over a set of texts.

A local ``evaluate`` metric module (load it by path, never from the hub)::

    metric = evaluate.load("pipeline/metrics/distinct_n")
    metric.compute(predictions=["a b a b"], n=2)["distinct_n"]   # bigrams ab, ba, ab -> 2/3

Texts are lowercased and split on whitespace. N-grams are taken inside each text (never across
two texts) and counted over the whole set, so the score measures diversity across all responses
of a model as well as inside each one. With no n-grams at all (no texts, or every text shorter
than n tokens) the score is 0.0.
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = __doc__
_CITATION = """\
@inproceedings{li-etal-2016-diversity,
  title = {A Diversity-Promoting Objective Function for Neural Conversation Models},
  author = {Li, Jiwei and Galley, Michel and Brockett, Chris and Gao, Jianfeng and Dolan, Bill},
  booktitle = {NAACL-HLT},
  year = {2016}
}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts (e.g. all sampled responses of one checkpoint).
    n (int, default 2): n-gram order.
Returns:
    distinct_n (float): distinct n-grams / total n-grams, 0.0 when there are no n-grams.
    num_distinct (int): number of distinct n-grams.
    num_ngrams (int): total number of n-grams.
    n (int): the n-gram order used.
"""


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    toks = text.lower().split()
    return [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DistinctN(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, n: int = 2):
        n = int(n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        total = 0
        seen: set[tuple[str, ...]] = set()
        for text in predictions:
            grams = ngrams(text or "", n)
            total += len(grams)
            seen.update(grams)
        return {
            "distinct_n": len(seen) / total if total else 0.0,
            "num_distinct": len(seen),
            "num_ngrams": total,
            "n": n,
        }
