"""PPO math for RLHF as small, pure torch functions.

Conventions (shared with :mod:`pipeline.ppo.gae`):

* Per-token tensors are ``[B, T]`` over *response* tokens only (the prompt is
  already cut off), ``B`` = batch, ``T`` = padded response length.
* ``mask`` is ``[B, T]``, bool or float, ``1``/``True`` on valid response tokens
  and ``0``/``False`` on padding. It must be binary; functions that need the
  position of the last valid token additionally require each row's valid tokens
  to be a contiguous prefix (right padding) and check this.
* Padding positions may hold arbitrary values (even NaN/inf): every reduction
  selects with ``torch.where`` instead of multiplying by the mask, so garbage
  never leaks into results or gradients.

Sources cited in comments:

* [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A
  Case Study on TL;DR Summarization", https://arxiv.org/abs/2403.17031
* [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human
  Preferences", https://arxiv.org/abs/1909.08593
* [Schulman-KL] http://joschu.net/blog/kl-approx.html
* [PPO] Schulman et al. 2017, https://arxiv.org/abs/1707.06347
"""

from __future__ import annotations

import math
from typing import Literal, TypedDict

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PolicyLossOutput",
    "RunningMoments",
    "ValueLossOutput",
    "entropy_from_logits",
    "exact_div",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "process_scores",
    "token_rewards",
    "value_loss",
]


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #


def _bool_mask(mask: Tensor) -> Tensor:
    """Binary mask -> bool tensor (non-zero means valid)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _check_same_shape(**tensors: Tensor) -> None:
    """Raise ``ValueError`` unless all tensors have one and the same shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"expected tensors of identical shape, got {desc}")


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, T], got shape {tuple(t.shape)}")


def _check_prefix_mask(mask: Tensor) -> Tensor:
    """Validate a ``[B, T]`` mask whose valid tokens form a prefix of each row.

    Returns:
        The mask as a bool tensor ``[B, T]``.

    Raises:
        ValueError: if ``mask`` is not 2-D, not binary, or some row has a valid
            token after a padding token (e.g. left padding or holes).
    """
    _check_2d("mask", mask)
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must be binary (0/1 or bool)")
    m = _bool_mask(mask)
    if m.shape[1] > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError(
            "mask must be a contiguous prefix of valid tokens in each row "
            "(right padding); found a valid token after a padding token"
        )
    return m


# --------------------------------------------------------------------------- #
# masked statistics
# --------------------------------------------------------------------------- #


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set.

    Args:
        x: any shape ``S``.
        mask: shape ``S``, binary (bool or 0/1).
        dim: reduce over this dim only; ``None`` reduces over all elements.

    Returns:
        Scalar if ``dim is None``, else ``S`` without ``dim``; dtype of ``x``.
        A slice with no valid element yields ``0`` (not NaN) and zero gradient.
    """
    _check_same_shape(x=x, mask=mask)
    m = _bool_mask(mask)
    total = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / m.sum().clamp(min=1).to(x.dtype)
    return total.sum(dim) / m.sum(dim).clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all positions where ``mask`` is set (scalar).

    Computed in float32 (or float64 if ``x`` is float64), returned in ``x.dtype``.
    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)``.

    Raises:
        ValueError: if there is no valid element, or only one with ``unbiased``.
    """
    _check_same_shape(x=x, mask=mask)
    m = _bool_mask(mask)
    n = int(m.sum().item())
    if n == 0:
        raise ValueError("masked_var: mask has no valid element")
    if unbiased and n == 1:
        raise ValueError("masked_var: unbiased variance needs at least 2 valid elements")
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = masked_mean(xf, m)
    var = masked_mean((xf - mean) ** 2, m)
    if unbiased:
        var = var * (n / (n - 1))
    return var.to(x.dtype)


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Normalise ``x`` to mean 0 / (unbiased) variance 1 over valid positions.

    Statistics come from valid positions only, so padding never influences
    them. With ``shift_mean=False`` the mean is added back, i.e. values are
    only rescaled (the variant used when whitening rewards, so their sign /
    offset survives; advantages use the default ``shift_mean=True``).

    Args:
        x: any shape ``S``. mask: shape ``S``, binary.

    Returns:
        Shape ``S``, dtype of ``x``; exactly ``0`` where ``mask`` is 0.
    """
    m = _bool_mask(mask)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = masked_mean(xf, m)
    var = masked_var(xf, m, unbiased=True)
    whitened = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened)).to(x.dtype)


# --------------------------------------------------------------------------- #
# log-probabilities, entropy, KL
# --------------------------------------------------------------------------- #


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``log softmax(logits)[labels]`` per token.

    No shifting is done: ``logits[:, t]`` must already be the distribution that
    generated ``labels[:, t]`` (for a causal LM, slice ``logits[:, :-1]`` against
    ``input_ids[:, 1:]`` and then cut out the response part). Divide the logits
    by the sampling temperature first, otherwise these log-probs do not match
    the sampling distribution (an implementation detail stressed in [N+]). Labels must be valid vocabulary ids everywhere
    (replace ignore indices such as -100 by e.g. 0 and mask those positions).

    Memory: processes one batch row at a time, so only a ``[T, V]`` float32
    temporary exists besides ``logits`` (never a full ``[B, T, V]`` log-softmax).

    Args:
        logits: ``[B, T, V]`` any float dtype (bf16 is upcast per row).
        labels: ``[B, T]`` integer ids.

    Returns:
        ``[B, T]`` float32 (float64 for float64 logits), differentiable w.r.t. logits.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits.shape[:2]={tuple(logits.shape[:2])}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        z = row_logits.to(compute_dtype)  # [T, V]
        picked = z.gather(-1, row_labels.long().unsqueeze(-1)).squeeze(-1)  # [T]
        rows.append(picked - torch.logsumexp(z, dim=-1))
    return torch.stack(rows, dim=0)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of the softmax distribution per token.

    Row-by-row in float32 (like :func:`logprobs_from_logits`); ``-inf`` logits
    (banned tokens) contribute 0.

    Args:
        logits: ``[B, T, V]``.

    Returns:
        ``[B, T]`` float32 (float64 for float64 logits), differentiable.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for row_logits in logits:
        logp = torch.log_softmax(row_logits.to(compute_dtype), dim=-1)  # [T, V]
        p = logp.exp()
        # p == 0 where logp == -inf; avoid 0 * -inf = NaN.
        plogp = p * torch.where(p > 0, logp, torch.zeros_like(logp))
        rows.append(-plogp.sum(-1))
    return torch.stack(rows, dim=0)


def kl_estimate(
    logprobs: Tensor, ref_logprobs: Tensor, kind: Literal["k1", "k3"] = "k1"
) -> Tensor:
    """Per-token single-sample estimate of KL(pi || pi_ref) for tokens sampled from pi.

    From [Schulman-KL], with ``log r = log pi_ref - log pi``:

    * ``"k1"``: ``-log r = logp - logp_ref`` — unbiased, can be negative per
      token; this is the penalty used by [Ziegler] and [N+].
    * ``"k3"``: ``(r - 1) - log r`` — unbiased, lower variance, always >= 0.

    Args:
        logprobs, ref_logprobs: ``[B, T]`` log-probs of the sampled tokens.

    Returns:
        ``[B, T]``; padding positions are *not* masked (do that downstream).
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k3":
        log_r = ref_logprobs - logprobs
        # expm1 keeps (r - 1) accurate for r ~ 1; clamp removes -1e-9 rounding noise.
        return (torch.expm1(log_r) - log_r).clamp(min=0.0)
    raise ValueError(f"kind must be 'k1' or 'k3', got {kind!r}")


# --------------------------------------------------------------------------- #
# rewards
# --------------------------------------------------------------------------- #


def token_rewards(kl: Tensor, scores: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: KL penalty everywhere, reward-model score at the end.

    ``R_t = -kl_coef * kl_t`` on valid tokens, plus ``score`` at the last valid
    token ``t = mask.sum(1) - 1`` ([Ziegler] sec. 2.2: reward ``r(x, y) - beta
    * KL``; [N+] spreads the KL per token and adds the score at the final
    response token). Padding gets 0.
    A row with *no* valid token gets nothing at all (all zeros, score dropped).

    Args:
        kl: ``[B, T]`` per-token KL estimate (see :func:`kl_estimate`).
        scores: ``[B]`` scalar reward per sequence.
        mask: ``[B, T]`` prefix mask (validated).
        kl_coef: penalty coefficient beta (e.g. ``controller.value``).

    Returns:
        ``[B, T]`` float32 (float64 if an input is float64), detached.
    """
    _check_2d("kl", kl)
    _check_same_shape(kl=kl, mask=mask)
    if scores.dim() != 1 or scores.shape[0] != kl.shape[0]:
        raise ValueError(
            f"scores must be [B]={kl.shape[0]}, got shape {tuple(scores.shape)}"
        )
    m = _check_prefix_mask(mask)
    dtype = torch.promote_types(torch.promote_types(kl.dtype, scores.dtype), torch.float32)
    kl_f, scores_f = kl.detach().to(dtype), scores.detach().to(dtype)
    rewards = torch.where(m, -kl_coef * kl_f, torch.zeros_like(kl_f))
    lengths = m.sum(dim=1)  # [B]
    last = (lengths - 1).clamp(min=0)  # [B]; row without tokens -> index 0 ...
    score_or_zero = torch.where(lengths > 0, scores_f, torch.zeros_like(scores_f))  # ... adds 0
    return rewards.scatter_add(1, last.unsqueeze(1), score_or_zero.unsqueeze(1))


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #


class PolicyLossOutput(TypedDict):
    loss: Tensor  # scalar, differentiable
    clipfrac: Tensor  # scalar, detached
    approxkl: Tensor  # scalar, detached
    ratio_mean: Tensor  # scalar, detached


class ValueLossOutput(TypedDict):
    loss: Tensor  # scalar, differentiable
    clipfrac: Tensor  # scalar, detached


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
) -> PolicyLossOutput:
    """PPO clipped surrogate objective ([PPO] eq. 7), as a loss to minimise.

    ``ratio = exp(logp - logp_old)``;
    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)))``,
    a token-level mean over all valid tokens of the (micro)batch.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (with grad).
        old_logprobs: ``[B, T]`` rollout-time log-probs (detached here).
        advantages: ``[B, T]`` (detached here; whiten beforehand if desired).
        mask: ``[B, T]`` binary.
        cliprange: epsilon ``c``, e.g. 0.2.

    Returns:
        dict with ``loss`` (scalar, differentiable), and detached scalars
        ``clipfrac`` (fraction of valid tokens where the clipped branch is
        active), ``approxkl`` (k3 estimate of KL(pi_old || pi), [Schulman-KL],
        as in CleanRL) and ``ratio_mean``.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    m = _bool_mask(mask)
    # Sanitise padding *before* exp so garbage cannot produce inf/NaN in the
    # forward pass or (via 0 * inf) in the backward pass.
    logratio = torch.where(m, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    adv = torch.where(m, advantages.detach(), torch.zeros_like(advantages)).to(logratio.dtype)
    ratio = torch.exp(logratio)

    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses2), m)

    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).to(logratio.dtype), m)
        # k3 = (r - 1) - log r with r = pi/pi_old: estimates KL(pi_old || pi) on
        # samples from pi_old [Schulman-KL]; same formula as CleanRL's approx_kl.
        approxkl = masked_mean(torch.expm1(logratio) - logratio, m)
        ratio_mean = masked_mean(ratio, m)
    return PolicyLossOutput(
        loss=loss,
        clipfrac=clipfrac.detach(),
        approxkl=approxkl.detach(),
        ratio_mean=ratio_mean.detach(),
    )


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float | None,
) -> ValueLossOutput:
    """Clipped value loss ``0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``.

    ``V_clip = V_old + clip(V - V_old, -c, c)`` (value clipping as in the
    OpenAI reference code discussed in [N+]; CleanRL ``clip_vloss``). ``cliprange_value=None`` disables
    clipping (plain 0.5 * MSE, clipfrac 0). ``vf_coef`` is applied by the caller.

    Args:
        values: ``[B, T]`` current value predictions (with grad).
        old_values: ``[B, T]`` rollout-time values (detached here).
        returns: ``[B, T]`` GAE returns (detached here).
        mask: ``[B, T]`` binary.

    Returns:
        dict with ``loss`` (scalar, differentiable) and detached ``clipfrac``.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    m = _bool_mask(mask)
    zeros = torch.zeros_like(values)
    v = torch.where(m, values, zeros)
    v_old = torch.where(m, old_values.detach(), zeros)
    ret = torch.where(m, returns.detach(), zeros)

    vf_losses1 = (v - ret) ** 2
    if cliprange_value is None:
        return ValueLossOutput(
            loss=0.5 * masked_mean(vf_losses1, m),
            clipfrac=torch.zeros((), dtype=v.dtype, device=v.device),
        )
    v_clipped = v_old + torch.clamp(v - v_old, -cliprange_value, cliprange_value)
    vf_losses2 = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_losses1, vf_losses2), m)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).to(v.dtype), m)
    return ValueLossOutput(loss=loss, clipfrac=clipfrac.detach())


# --------------------------------------------------------------------------- #
# KL coefficient controllers
# --------------------------------------------------------------------------- #


class AdaptiveKLController:
    """Adaptive KL coefficient of [Ziegler] section 2.2.

    ``e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)`` and
    ``beta <- beta * (1 + e_t * n_steps / horizon)``, so one update changes beta
    by at most a factor ``1 +/- 0.2 * n_steps / horizon``.

    ``current_kl`` should be the *sequence-level* KL (sum over response tokens,
    averaged over the batch, across all processes), as in the reference code.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value: float = float(init_kl_coef)
        self.target: float = float(target)
        self.horizon: int = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update ``value`` after ``n_steps`` samples (episodes) with observed ``current_kl``."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


class FixedKLController:
    """Constant KL coefficient; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value: float = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------- #
# misc
# --------------------------------------------------------------------------- #


def exact_div(a: int, b: int, what: str) -> int:
    """``a // b``, raising ``ValueError`` instead of rounding when ``b`` does not divide ``a``.

    Used for batch-size bookkeeping (e.g. rollout batch / minibatches /
    processes), where silent rounding would drop samples.
    """
    if b == 0:
        raise ValueError(f"exact_div failed for {what}: {a} is not divisible by {b} (division by zero)")
    q, r = divmod(a, b)
    if r != 0:
        raise ValueError(f"exact_div failed for {what}: {a} is not divisible by {b}")
    return q


class RunningMoments:
    """Running mean / variance of a scalar stream (Chan et al. parallel update).

    ``mean``, ``var`` (population variance of everything seen) and ``std`` are
    Python floats. In multi-process training, gather the values from all ranks
    before :meth:`update` so every rank keeps identical statistics.
    """

    def __init__(self) -> None:
        self.mean: float = 0.0
        self.var: float = 1.0
        self.count: int = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, xs: Tensor) -> tuple[float, float]:
        """Fold in all elements of ``xs``; returns this batch's (mean, population std)."""
        x = xs.detach().reshape(-1).to(torch.float64)
        n = x.numel()
        if n == 0:
            raise ValueError("RunningMoments.update: empty tensor")
        batch_mean = float(x.mean())
        batch_var = float(x.var(unbiased=False))
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, n
        else:
            total = self.count + n
            delta = batch_mean - self.mean
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
            self.mean += delta * n / total
            self.var = m2 / total
            self.count = total
        return batch_mean, math.sqrt(batch_var)

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])


@torch.no_grad()
def process_scores(
    scores: Tensor,
    clip: float | None = None,
    running: RunningMoments | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Optionally normalise and clip reward-model scores ``[B]``.

    If ``running`` is given it is first updated with ``scores`` (mutated!), then
    ``scores <- (scores - mean) / (std + eps)`` (mean not subtracted when
    ``shift_mean=False``). Then, if ``clip`` is given, scores are clamped to
    ``[-clip, clip]``. Returns a detached tensor of ``scores.dtype``.
    """
    out = scores.detach()
    if running is not None:
        running.update(out)
        shift = running.mean if shift_mean else 0.0
        out = (out - shift) / (running.std + eps)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out.to(scores.dtype)
