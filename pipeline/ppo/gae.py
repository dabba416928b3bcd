"""Generalized Advantage Estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

Per-token tensors are ``[B, T]`` over response tokens; ``mask`` marks valid tokens as a contiguous
prefix of each row (see :mod:`pipeline.ppo.core` for the conventions).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE advantages and value targets for right-padded token sequences.

    With ``m`` the mask and the value after the last valid token taken as 0 (the response is the
    whole episode: nothing follows its last token to bootstrap from), for ``t = T-1 .. 0``::

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = (delta_t + gamma * lam * A_{t+1}) * m_t
        R_t     = (A_t + V_t) * m_t

    A reverse scan over ``T``, vectorised over the batch, in the dtype of ``rewards``. No whitening
    (the caller whitens advantages with ``masked_whiten``).

    Args:
        rewards: ``[B, T]`` per-token rewards (``token_rewards``).
        values: ``[B, T]`` value predictions at rollout time.
        mask: ``[B, T]`` bool or 0/1 prefix mask.
        gamma: discount in ``[0, 1]``. lam: GAE lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, detached and exactly 0 where ``mask`` is 0;
        padding entries of ``rewards`` and ``values`` are ignored, even NaN.
    """
    m = mask.bool()
    zeros = torch.zeros_like(rewards)
    r = torch.where(m, rewards, zeros)
    v = torch.where(m, values.to(rewards.dtype), zeros)  # V_t * m_t, so V_{t+1} * m_{t+1} below
    m_f = m.to(rewards.dtype)

    next_value = zeros[:, 0]  # V_T := 0 (nothing beyond the padded length)
    lastgaelam = zeros[:, 0]  # A_T := 0
    advantages_reversed: list[Tensor] = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        # Times m_t: A stays exactly 0 on padding, so the row's last valid step sees A_{t+1} = 0
        # and V_{t+1} * m_{t+1} = 0.
        lastgaelam = (delta + gamma * lam * lastgaelam) * m_f[:, t]
        next_value = v[:, t]
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = (advantages + v) * m_f
    return advantages, returns
