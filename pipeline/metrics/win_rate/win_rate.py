"""Pairwise win rate of system A over system B, with a percentile-bootstrap 95% CI.

A local ``evaluate`` metric module (load it by path, never from the hub)::

    metric = evaluate.load("pipeline/metrics/win_rate")
    metric.compute(scores_a=[1, 0.5, 0], scores_b=[0, 0.5, 1], n_boot=1000, seed=0)

``scores_a[i]`` and ``scores_b[i]`` are the scores of the two systems on the same prompt ``i``.
Each prompt scores 1 when A is higher, 0 when B is higher and 0.5 on a tie (``|a - b| <= tie_tol``).
The win rate is the mean over prompts. The CI is a percentile bootstrap over prompts: prompt
indices are resampled with replacement ``n_boot`` times with ``numpy.random.default_rng(seed)``,
so the same inputs and seed always give the same interval.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    scores_a (list of float): per-prompt scores of system A.
    scores_b (list of float): per-prompt scores of system B, same prompt order.
    n_boot (int, default 1000): bootstrap resamples (0 disables the CI).
    seed (int, default 0): numpy seed for the bootstrap.
    tie_tol (float, default 0.0): score differences up to this count as ties.
    confidence (float, default 0.95): coverage of the percentile interval.
Returns:
    win_rate (float or None): mean of 1 / 0.5 / 0 over prompts; None without prompts.
    ci_low, ci_high (float or None): percentile bootstrap interval; None without prompts or with n_boot=0.
    wins, ties, losses (int): counts over prompts.
    num_prompts (int)
"""


def outcomes(a, b, tie_tol: float = 0.0) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b differ in length: {a.shape} vs {b.shape}")
    diff = a - b
    return np.where(np.abs(diff) <= tie_tol, 0.5, np.where(diff > 0, 1.0, 0.0))


def bootstrap_ci(o: np.ndarray, n_boot: int, seed: int, confidence: float = 0.95, chunk: int = 256):
    rng = np.random.default_rng(seed)
    n = len(o)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):  # chunks bound memory at chunk * n indices
        k = min(chunk, n_boot - start)
        means[start : start + k] = o[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"scores_a": datasets.Value("float64"), "scores_b": datasets.Value("float64")}),
        )

    def _compute(
        self, scores_a, scores_b, n_boot: int = 1000, seed: int = 0, tie_tol: float = 0.0, confidence: float = 0.95
    ):
        if (
            np.isnan(np.asarray(scores_a, dtype=np.float64)).any()
            or np.isnan(np.asarray(scores_b, dtype=np.float64)).any()
        ):
            raise ValueError("win_rate got NaN scores")
        o = outcomes(scores_a, scores_b, tie_tol)
        out = {
            "win_rate": None,
            "ci_low": None,
            "ci_high": None,
            "wins": int((o == 1.0).sum()),
            "ties": int((o == 0.5).sum()),
            "losses": int((o == 0.0).sum()),
            "num_prompts": int(len(o)),
        }
        if len(o) == 0:
            return out
        out["win_rate"] = float(o.mean())
        if n_boot and n_boot > 0:
            out["ci_low"], out["ci_high"] = bootstrap_ci(o, int(n_boot), int(seed), float(confidence))
        return out
