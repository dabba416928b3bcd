"""Advantage estimators: GAE with a value model (Schulman et al. 2016, https://arxiv.org/abs/1506.02438), and the
critic-free RLOO, GRPO and REINFORCE++ over k samples per prompt.

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


# --------------------------------------------------------------------------- critic-free estimators
# Sequence-level estimators take ``scores`` ``[B]`` with the ``k`` samples of each prompt next to each other
# (rows ``i*k .. i*k+k-1`` answer prompt ``i``) and return one advantage per sequence ``[B]``; the trainer
# gives every valid token of a response its sequence's advantage. In this project the KL penalty enters
# the reward for every estimator: ``scores`` are the reward model's score minus ``beta * sum_t KL_t``.


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): each sample's
    baseline is the mean score of the other ``k - 1`` samples of its prompt. ``[B]`` -> ``[B]``, ``k >= 2``."""
    g = scores.view(-1, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(scores: Tensor, k: int, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300): the score
    minus its prompt group's mean, over the group's (unbiased) standard deviation. ``[B]`` -> ``[B]``."""
    g = scores.view(-1, k)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).reshape(-1)


@torch.no_grad()
def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Discounted returns ``G_t = r_t + gamma * G_{t+1}`` over valid tokens, 0 on padding: ``[B, T]`` -> ``[B, T]``.
    With per-token KL rewards and the score on the last token, these are REINFORCE++'s token returns
    (Hu 2025, https://arxiv.org/abs/2501.03262), which it normalises over the whole batch (no critic, no
    per-prompt baseline)."""
    m = mask.bool()
    r = torch.where(m, rewards, torch.zeros_like(rewards))
    running = torch.zeros_like(r[:, 0])
    out: list[Tensor] = []
    for t in reversed(range(r.shape[1])):
        running = (r[:, t] + gamma * running) * m[:, t].to(r.dtype)
        out.append(running)
    return torch.stack(out[::-1], dim=1)
