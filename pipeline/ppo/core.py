"""PPO math for RLHF as small, pure torch functions.

Conventions (shared with :mod:`pipeline.ppo.gae`):

* Per-token tensors are ``[B, T]`` over *response* tokens only (the prompt is already cut off),
  ``B`` = batch, ``T`` = padded response length.
* ``mask`` is ``[B, T]``, bool or 0/1, set on valid response tokens; the valid tokens of a row are a
  contiguous prefix (right padding). Functions that need the last valid token rely on that.
* Padding positions may hold anything (even NaN/inf): every reduction selects with ``torch.where``
  instead of multiplying by the mask, so garbage never leaks into results or gradients.
* Inputs are float32 (the trainer upcasts once, where logits and values leave the models); results
  have the input's dtype. Log-probs and entropies are computed in float32 from logits of any dtype.

Nothing here validates shapes or settings: the trainer builds the tensors, and user settings are
checked where they arrive (``pipeline/stage_ppo.py``). Nothing here forces a host sync.

Sources cited in comments:

* [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
  Summarization", https://arxiv.org/abs/2403.17031
* [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
  https://arxiv.org/abs/1909.08593
* [Schulman-KL] http://joschu.net/blog/kl-approx.html
* [PPO] Schulman et al. 2017, https://arxiv.org/abs/1707.06347
* [CleanRL] Huang et al. 2022, https://github.com/vwxyzjn/cleanrl (``ppo.py``)
"""

from __future__ import annotations

import math
from typing import Literal, TypedDict

import torch
from torch import Tensor

# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set.

    Args:
        x: any shape ``S``. mask: shape ``S``, bool or 0/1.
        dim: reduce over this dim only; ``None`` reduces over all elements.

    Returns:
        Scalar if ``dim is None``, else ``S`` without ``dim``. A slice with no valid element gives 0.
    """
    m = mask.bool()
    total = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / m.sum().clamp(min=1).to(x.dtype)
    return total.sum(dim) / m.sum(dim).clamp(min=1).to(x.dtype)


def token_prob_error(sampler_logprobs: Tensor, train_logprobs: Tensor, mask: Tensor) -> Tensor:
    """How far the sampler's per-token probabilities stray from the training forward's: the mean over response
    tokens of ``exp(|log p_sampler - log p_train|)``, 1 when they agree (NeMo-RL's multiplicative token
    probability error, docs/adding-new-models.md). All arguments ``[B, R]``; returns a scalar."""
    return masked_mean(torch.exp((sampler_logprobs - train_logprobs).abs()), mask)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all positions where ``mask`` is set (scalar).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` (none for a single valid element).
    No valid element gives 0.
    """
    m = mask.bool()
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        var = var * (n / (n - 1).clamp(min=1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to mean 0 and (unbiased) variance 1 over valid positions; 0 on padding.

    With ``shift_mean=False`` the mean is added back (values are only rescaled: the variant for
    rewards, whose sign and offset matter; advantages use the default).
    """
    m = mask.bool()
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over valid tokens ([CleanRL] ``explained_var``).

    1: the value head predicts the returns; 0: no better than their mean; negative: worse.
    NaN when the returns do not vary.
    """
    var_y = masked_var(returns, mask, unbiased=False)
    ev = 1 - masked_var(returns - values, mask, unbiased=False) / var_y
    return torch.where(var_y > 0, ev, torch.full_like(ev, float("nan")))


# --------------------------------------------------------------------------- log-probs, entropy, KL


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``log softmax(logits)[labels]`` per token: ``[B, T, V]``, ``[B, T]`` -> ``[B, T]`` float32.

    No shifting is done: ``logits[:, t]`` must be the distribution that generated ``labels[:, t]``.
    Divide the logits by the sampling temperature first, or these log-probs do not match the
    sampling distribution ([N+]). One row at a time, so only a ``[T, V]`` float32 temporary exists
    besides ``logits`` (never a full ``[B, T, V]`` log-softmax). The trainer and the evaluation compute these
    through :func:`token_logprobs`; this plain form is the reference its tests compare against.
    """
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        z = row_logits.float()  # [T, V]
        picked = z.gather(-1, row_labels.long().unsqueeze(-1)).squeeze(-1)  # [T]
        rows.append(picked - torch.logsumexp(z, dim=-1))
    return torch.stack(rows, dim=0)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``-sum_v p_v log p_v`` of the softmax per token: ``[B, T, V]`` -> ``[B, T]`` float32.

    Row by row in float32, like :func:`logprobs_from_logits`; ``-inf`` logits (banned tokens) add 0.
    """
    rows = []
    for row_logits in logits:
        logp = torch.log_softmax(row_logits.float(), dim=-1)  # [T, V]
        p = logp.exp()
        # p == 0 where logp == -inf; avoid 0 * -inf = NaN.
        rows.append(-(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1))
    return torch.stack(rows, dim=0)


class _TokenLogprobs(torch.autograd.Function):
    """``token_logprobs``' autograd: forward and backward one row at a time through one ``[T, V]`` float32
    temporary, the backward's softmax recomputed in place from the saved logits and log-normalisers."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool):
        T = labels.shape[1]
        start = logits.shape[1] - T - 1  # the last T + 1 positions; the last one predicted past the labels
        out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        entropy = torch.empty_like(out) if with_entropy else None
        for i in range(labels.shape[0]):
            z = logits[i, start : start + T].float() / temperature  # [T, V]; as ``response_logits`` divides
            lse[i] = torch.logsumexp(z, dim=-1)
            out[i] = z.gather(-1, labels[i].long().unsqueeze(-1)).squeeze(-1) - lse[i]
            if with_entropy:
                z = z.sub_(lse[i].unsqueeze(-1)).clamp_(min=torch.finfo(z.dtype).min)  # log p; -inf adds 0 below
                entropy[i] = -(z.exp() * z).sum(-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.start = temperature, start
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_entropy):
        logits, labels, lse = ctx.saved_tensors
        T, t, start = labels.shape[1], ctx.temperature, ctx.start
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad[:, :start] = 0  # positions that predicted no label
        grad[:, start + T :] = 0
        for i in range(labels.shape[0]):
            g = grad_out[i].float().unsqueeze(-1)  # [T, 1]
            # d/dz (z[label] - logsumexp z) = onehot - softmax z, and z = logits / temperature
            p = logits[i, start : start + T].to(torch.float32, copy=True).div_(t).sub_(lse[i].unsqueeze(-1)).exp_()
            p.mul_(-g).scatter_add_(-1, labels[i].long().unsqueeze(-1), g).div_(t)
            grad[i, start : start + T] = p
        return grad, None, None, None


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0, entropy: bool = True):
    """``(log-probs [B, T], entropies [B, T] or None)``, float32, of ``labels`` under ``softmax(logits[:, t] /
    temperature)``: what :func:`logprobs_from_logits` and :func:`entropy_from_logits` return for the
    temperature-scaled logits (``sequences.response_logits``), without building them.

    ``logits`` is ``[B, L, V]`` of any float dtype with ``L > T``, as ``response_logits`` takes them: the last
    ``T + 1`` positions hold the distributions that generated ``labels`` and, last, one past them (a causal
    LM's last position), which is ignored, as are positions before them (all logits, or ``logits_to_keep=T+1``).
    The log-probs are differentiable with respect to ``logits``; the entropies (a statistic) are not.

    Why not autograd through the plain expressions: they build the ``[B, T, V]`` float32 scaled logits, and
    their backward a zero-filled gradient per operation, several passes over the largest tensors of a small
    model's step (the vocabulary is 49,152 for SmolLM2). Here each row runs through one ``[T, V]``
    temporary, forward and backward; the log-probs equal :func:`logprobs_from_logits`' bit for bit (the same
    operations per row) and the gradient equals autograd's up to rounding (tests compare both)."""
    return _TokenLogprobs.apply(logits, labels, temperature, entropy)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token single-sample estimate of KL(pi || pi_ref) on tokens sampled from pi, ``[B, T]``.

    From [Schulman-KL], with ``log r = log pi_ref - log pi``:

    * ``"k1"``: ``-log r``: unbiased, can be negative per token; the penalty of [Ziegler] and [N+].
    * ``"k3"``: ``(r - 1) - log r``: unbiased, lower variance, always >= 0.

    Padding positions are not masked (the caller does that).
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    log_r = ref_logprobs - logprobs
    # expm1 keeps (r - 1) accurate for r ~ 1; clamp removes -1e-9 rounding noise.
    return (torch.expm1(log_r) - log_r).clamp(min=0.0)


# --------------------------------------------------------------------------- rewards


def token_rewards(kl: Tensor, scores: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards ``[B, T]``: the KL penalty on every valid token, the score on the last one.

    ``R_t = -kl_coef * kl_t`` on valid tokens, plus ``scores[b]`` at the last valid token
    ``t = mask.sum(1) - 1`` ([Ziegler] sec. 2.2: reward ``r(x, y) - beta * KL``; [N+] spreads the KL
    per token and adds the score at the final response token). Padding gets 0, and a row with no
    valid token gets nothing (its score is dropped).

    Args:
        kl: ``[B, T]`` per-token KL estimate (:func:`kl_estimate`). scores: ``[B]``.
        mask: ``[B, T]`` prefix mask. kl_coef: the penalty coefficient beta.
    """
    m = mask.bool()
    rewards = torch.where(m, -kl_coef * kl.detach(), torch.zeros_like(kl))
    lengths = m.sum(dim=1)  # [B]
    last = (lengths - 1).clamp(min=0)  # a row without tokens -> index 0 ...
    score_or_zero = torch.where(lengths > 0, scores.detach(), torch.zeros_like(scores))  # ... adds 0
    return rewards.scatter_add(1, last.unsqueeze(1), score_or_zero.unsqueeze(1).to(rewards.dtype))


# --------------------------------------------------------------------------- losses


class PolicyLossOutput(TypedDict):
    loss: Tensor  # scalar, differentiable
    clipfrac: Tensor  # scalar, detached
    approxkl: Tensor  # scalar, detached
    ratio_mean: Tensor  # scalar, detached


class ValueLossOutput(TypedDict):
    loss: Tensor  # scalar, differentiable
    clipfrac: Tensor  # scalar, detached


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> PolicyLossOutput:
    """PPO clipped surrogate objective ([PPO] eq. 7) as a loss to minimise, over ``[B, T]`` tokens.

    ``ratio = exp(logp - logp_old)``;
    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)))``, a token-level mean over
    the valid tokens of the (micro)batch. ``old_logprobs`` and ``advantages`` are detached here.

    Returns ``loss`` and, detached: ``clipfrac`` (share of valid tokens where the clipped branch is
    active), ``approxkl`` (k3 estimate of KL(pi_old || pi) [Schulman-KL], as [CleanRL]) and ``ratio_mean``.
    """
    m = mask.bool()
    # Sanitise padding *before* exp, so garbage cannot give inf/NaN forward or (0 * inf) backward.
    logratio = torch.where(m, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    adv = torch.where(m, advantages.detach(), torch.zeros_like(advantages)).to(logratio.dtype)
    ratio = torch.exp(logratio)

    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses2), m)

    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).to(logratio.dtype), m)
        # k3 = (r - 1) - log r with r = pi/pi_old: KL(pi_old || pi) on samples from pi_old [Schulman-KL].
        approxkl = masked_mean(torch.expm1(logratio) - logratio, m)
        ratio_mean = masked_mean(ratio, m)
    return PolicyLossOutput(loss=loss, clipfrac=clipfrac, approxkl=approxkl, ratio_mean=ratio_mean)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float | None
) -> ValueLossOutput:
    """Clipped value loss ``0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))`` over ``[B, T]`` tokens.

    ``V_clip = V_old + clip(V - V_old, -c, c)`` (value clipping of the OpenAI reference code discussed
    in [N+]; [CleanRL] ``clip_vloss``). ``cliprange_value=None``: plain ``0.5 * MSE``, clipfrac 0.
    ``vf_coef`` is applied by the caller. ``old_values`` and ``returns`` are detached here.
    """
    m = mask.bool()
    zeros = torch.zeros_like(values)
    v = torch.where(m, values, zeros)
    v_old = torch.where(m, old_values.detach(), zeros)
    ret = torch.where(m, returns.detach(), zeros)

    vf_losses1 = (v - ret) ** 2
    if cliprange_value is None:
        return ValueLossOutput(loss=0.5 * masked_mean(vf_losses1, m), clipfrac=v.new_zeros(()))
    v_clipped = v_old + torch.clamp(v - v_old, -cliprange_value, cliprange_value)
    vf_losses2 = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_losses1, vf_losses2), m)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).to(v.dtype), m)
    return ValueLossOutput(loss=loss, clipfrac=clipfrac)


# --------------------------------------------------------------------------- KL coefficient controllers


class AdaptiveKLController:
    """Adaptive KL coefficient of [Ziegler] section 2.2.

    ``e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e_t * n_steps / horizon)``.
    ``current_kl`` is the sequence-level KL (summed over response tokens, averaged over the batch
    across all processes), as in the reference code.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update ``value`` after ``n_steps`` samples (episodes) with observed ``current_kl``."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


class FixedKLController:
    """Constant KL coefficient; the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------- bookkeeping


def exact_div(a: int, b: int, what: str) -> int:
    """``a // b``, raising ``ValueError`` instead of rounding when ``b`` does not divide ``a``.

    For batch-size bookkeeping, where silent rounding would drop samples.
    """
    if b == 0 or a % b:
        raise ValueError(f"exact_div failed for {what}: {a} is not divisible by {b}")
    return a // b


class RunningMoments:
    """Running mean and population variance of a scalar stream (Chan et al. parallel update).

    ``mean``, ``var`` and ``std`` are Python floats. In multi-process training, gather the values from
    all ranks before :meth:`update`, so every rank keeps identical statistics.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, xs: Tensor) -> None:
        """Fold in every element of ``xs`` (non-empty)."""
        x = xs.detach().reshape(-1).to(torch.float64)
        n = x.numel()
        batch_mean = float(x.mean())
        batch_var = float(x.var(unbiased=False))
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, n
            return
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
