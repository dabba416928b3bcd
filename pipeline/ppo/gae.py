"""Generalized Advantage Estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

Per-token tensors are ``[B, T]`` over response tokens; ``mask`` marks valid
tokens as a contiguous prefix of each row (see :mod:`pipeline.ppo.core`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import _check_2d, _check_prefix_mask, _check_same_shape

__all__ = ["compute_gae"]


@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE advantages and value targets for right-padded token sequences.

    With ``m`` the mask and the value after the last valid token taken as 0
    (the response is the whole episode: nothing follows its last token, so
    there is nothing to bootstrap from), for ``t = T-1 .. 0``::

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = (delta_t + gamma * lam * A_{t+1}) * m_t
        R_t     = (A_t + V_t) * m_t

    A reverse scan over ``T``, vectorised over the batch. No whitening is done
    here (whiten advantages with ``masked_whiten`` in the caller).

    Args:
        rewards: ``[B, T]`` per-token rewards (e.g. from ``token_rewards``).
        values: ``[B, T]`` value predictions at rollout time.
        mask: ``[B, T]`` bool or 0/1, valid tokens must be a prefix of each row.
        gamma: discount in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, **always float32** (float64
        if an input is float64) whatever the input dtype (bf16 inputs are
        upcast; computation happens in that dtype), detached, and exactly ``0``
        where ``mask`` is 0. Padding entries of ``rewards``/``values`` are
        ignored, even if NaN.

    Raises:
        ValueError: on shape mismatch, non-2-D inputs, non-prefix mask, or
            ``gamma``/``lam`` outside ``[0, 1]``.
    """
    _check_2d("rewards", rewards)
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    m = _check_prefix_mask(mask)

    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    zeros = torch.zeros(rewards.shape, dtype=dtype, device=rewards.device)
    r = torch.where(m, rewards.detach().to(dtype), zeros)
    v = torch.where(m, values.detach().to(dtype), zeros)  # V_t * m_t, so V_{t+1} * m_{t+1} below
    m_f = m.to(dtype)

    T = r.shape[1]
    next_value = zeros[:, 0]  # V_T := 0 (bootstrap 0 beyond the padded length)
    next_adv = zeros[:, 0]  # A_T := 0
    adv_reversed: list[Tensor] = []
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        # multiply by m_t: A stays exactly 0 on padding, so the next (earlier)
        # valid step sees A_{t+1} = 0 and V_{t+1} * m_{t+1} = 0 at the row's end.
        next_adv = (delta + gamma * lam * next_adv) * m_f[:, t]
        next_value = v[:, t]
        adv_reversed.append(next_adv)
    advantages = torch.stack(adv_reversed[::-1], dim=1)
    returns = (advantages + v) * m_f
    return advantages, returns
