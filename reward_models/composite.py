"""The PPO reward: one learned reward model or a conservative ensemble of them, plus rule functions.

``CompositeReward(members, aggregation, coef, funcs, weights)(prompts, responses) -> Tensor [N]``

* ``members``: learned scorers, each ``(prompts, responses) -> Tensor [N]``
  (:class:`reward_models.learned.LearnedReward`). Several members are aggregated per response by
  :func:`aggregate`: ``mean``, ``min`` (worst case) or ``mean_minus_std`` (uncertainty-weighted), the
  conservative ensembles of Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization".
  Members that are LoRA adapters on one base share that base in memory (PPO switches adapters).
* ``funcs``: verifiable rewards, Python callables ``(prompt messages, response text) -> float`` named
  ``package.module:function`` on the command line (``--reward_funcs``), weighted by ``--reward_weights``
  and added to the learned score, as TRL's ``reward_funcs`` and verl's custom reward functions do.
  A function that raises or returns a non-finite number stops the run with one line naming it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

from pipeline.errors import PipelineError

AGGREGATIONS = ("mean", "min", "mean_minus_std")
RuleFn = Callable[[list[dict], str], float]


def aggregate(scores, how: str = "mean", coef: float = 1.0):
    """Combine ensemble scores ``[M, N]`` (M members, N responses) into one score per response ``[N]``.

    ``mean``: the average. ``min``: the most pessimistic member (worst-case optimisation).
    ``mean_minus_std``: mean - coef * (population) std over members, uncertainty-weighted optimisation
    [Coste et al. 2023, eq. 2-4]. With one member every rule returns that member's scores.
    """
    if scores.dim() != 2:
        raise ValueError(f"aggregate expects [members, responses], got shape {tuple(scores.shape)}")
    if how == "mean":
        return scores.mean(0)
    if how == "min":
        return scores.min(0).values
    if how == "mean_minus_std":
        return scores.mean(0) - coef * scores.std(0, unbiased=False)
    raise ValueError(f"unknown aggregation {how!r}; use one of {', '.join(AGGREGATIONS)}")


def load_reward_func(spec: str) -> RuleFn:
    """``package.module:function`` -> the callable, or a one-line error saying what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PipelineError(f"--reward_funcs {spec!r}: write it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failing at import time
        raise PipelineError(f"--reward_funcs {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise PipelineError(f"--reward_funcs {spec}: {module_name} has no {attr}")
    if not callable(fn):
        raise PipelineError(f"--reward_funcs {spec}: {attr} is not callable")
    return fn


def rule_scores(name: str, fn: RuleFn, prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float]:
    """``fn`` on every (prompt, response) pair; a raise or a non-finite value is one line naming ``name``."""
    out = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        try:
            value = fn(prompt, response)
        except Exception as e:
            raise PipelineError(f"reward function {name} raised {type(e).__name__} on response {i}: {e}") from None
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise PipelineError(f"reward function {name} returned {value!r} on response {i}; return a float") from None
        if not math.isfinite(value):
            raise PipelineError(f"reward function {name} returned {value} on response {i}; return a finite float")
        out.append(value)
    return out


class CompositeReward:
    """``(prompts, responses) -> Tensor [N]`` (float32, CPU): aggregated learned score + weighted rule scores.

    ``last_components`` holds the latest call's parts (``[M, N]`` member scores, ``[F, N]`` rule scores)
    for logging.
    """

    def __init__(
        self,
        members: Sequence[Callable],
        aggregation: str = "mean",
        coef: float = 1.0,
        funcs: Sequence[tuple[str, RuleFn]] = (),
        weights: Sequence[float] | None = None,
    ):
        if not members and not funcs:
            raise ValueError("a reward needs at least one reward model or one reward function")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        weights = list(weights) if weights else [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(f"{len(weights)} weights for {len(funcs)} reward functions")
        self.members, self.aggregation, self.coef = list(members), aggregation, coef
        self.funcs, self.weights = list(funcs), weights
        self.last_components: dict = {}

    def __call__(self, prompts: list[list[dict]], responses: list[str]):
        import torch

        total = torch.zeros(len(responses))
        self.last_components = {}
        if self.members:
            member_scores = torch.stack([m(prompts, responses).float().cpu() for m in self.members])
            self.last_components["members"] = member_scores
            total += aggregate(member_scores, self.aggregation, self.coef)
        if self.funcs:
            rules = torch.tensor([rule_scores(name, fn, prompts, responses) for name, fn in self.funcs])
            self.last_components["rules"] = rules
            total += (torch.tensor(self.weights).unsqueeze(1) * rules).sum(0)
        return total
