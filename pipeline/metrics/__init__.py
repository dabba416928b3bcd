"""Local ``evaluate`` metric modules of the pipeline, loaded by path (never from the hub).

    from pipeline.metrics import load_metric
    load_metric("distinct_n").compute(predictions=texts, n=2)["distinct_n"]
    load_metric("win_rate").compute(scores_a=ppo, scores_b=sft, n_boot=1000, seed=0)

Each metric lives in ``pipeline/metrics/<name>/<name>.py`` (the layout ``evaluate.load`` expects
for a local directory). ``distinct_n`` and ``win_rate`` below are one-call conveniences.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE = ("distinct_n", "win_rate")


def metric_path(name: str) -> Path:
    """The directory of local metric ``name`` (raises for unknown names, so nothing falls through to the hub)."""
    if name not in AVAILABLE:
        raise ValueError(f"unknown local metric {name!r}; available: {', '.join(AVAILABLE)}")
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"metric script missing: {path / (name + '.py')}")
    return path


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a local metric by absolute path; in memory (no cache files or locks) by default."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)


def distinct_n(texts, n: int = 2) -> float:
    """Distinct n-grams / total n-grams over ``texts`` (lowercased whitespace tokens; 0.0 without n-grams)."""
    return load_metric("distinct_n").compute(predictions=list(texts), n=n)["distinct_n"]


def win_rate(scores_a, scores_b, n_boot: int = 1000, seed: int = 0, tie_tol: float = 0.0) -> dict:
    """Win rate of A over B per prompt (ties 0.5) with a bootstrap 95% CI: the ``win_rate`` module's output dict."""
    return load_metric("win_rate").compute(
        scores_a=[float(x) for x in scores_a],
        scores_b=[float(x) for x in scores_b],
        n_boot=n_boot,
        seed=seed,
        tie_tol=tie_tol,
    )
