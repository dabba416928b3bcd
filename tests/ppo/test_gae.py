"""Tests for pipeline.ppo.gae.compute_gae."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.ppo.gae import compute_gae


def _reference_gae(
    rewards: list[list[float]], values: list[list[float]], lengths: list[int], gamma: float, lam: float
) -> tuple[list[list[float]], list[list[float]]]:
    """Independent per-element double loop using the *sum* form of GAE:
    A_t = sum_{l=0}^{L-1-t} (gamma*lam)^l delta_{t+l}, with V_L = 0."""
    adv_out, ret_out = [], []
    for r, v, length in zip(rewards, values, lengths):
        T = len(r)
        adv = [0.0] * T
        ret = [0.0] * T
        for t in range(length):
            total = 0.0
            for k in range(t, length):
                v_next = v[k + 1] if k + 1 < length else 0.0
                delta = r[k] + gamma * v_next - v[k]
                total += (gamma * lam) ** (k - t) * delta
            adv[t] = total
            ret[t] = total + v[t]
        adv_out.append(adv)
        ret_out.append(ret)
    return adv_out, ret_out


def test_constant_values_reward_at_end() -> None:
    # T=3, V=c everywhere, reward R only at the last token.
    c, R, gamma, lam = 0.5, 2.0, 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, R]])
    values = torch.full((1, 3), c)
    mask = torch.ones(1, 3)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    d2 = R - c
    d1 = gamma * c - c
    d0 = gamma * c - c
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0, a1, a2]]) + c)


def test_gamma_lam_one_gives_monte_carlo() -> None:
    torch.manual_seed(0)
    rewards = torch.randn(3, 6)
    values = torch.randn(3, 6)
    mask = torch.ones(3, 6)
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    mc = rewards.flip(1).cumsum(1).flip(1)  # sum of future rewards
    torch.testing.assert_close(ret, mc)
    torch.testing.assert_close(adv, mc - values)


def test_rows_of_different_lengths_bootstrap_zero() -> None:
    gamma, lam = 1.0, 1.0
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 99.0, 99.0], [5.0, 99.0, 99.0, 99.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 7.0, 8.0], [0.9, 7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    expected_ret = torch.tensor([[10.0, 9.0, 7.0, 4.0], [3.0, 2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(ret, expected_ret)
    expected_adv = torch.where(mask, expected_ret - values, torch.zeros(()))
    torch.testing.assert_close(adv, expected_adv)
    # last valid token of row 1: delta = r - V (value after the end is 0, not V=7.0)
    assert adv[1, 1].item() == pytest.approx(2.0 - 0.6)


def test_bootstrap_zero_with_discount() -> None:
    rewards = torch.tensor([[0.0, 1.0, 50.0]])
    values = torch.tensor([[2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    gamma, lam = 0.5, 0.5
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    a1 = 1.0 - 3.0
    a0 = (0.0 + gamma * 3.0 - 2.0) + gamma * lam * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 2.0, a1 + 3.0, 0.0]]))


@pytest.mark.parametrize("seed", range(5))
def test_matches_independent_double_loop(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B, T = rng.randint(1, 6), rng.randint(1, 9)
    gamma, lam = rng.random(), rng.random()
    lengths = [rng.randint(0, T) for _ in range(B)]
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _reference_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))


def test_zero_where_masked_even_with_nan_padding() -> None:
    torch.manual_seed(1)
    rewards = torch.randn(4, 7)
    values = torch.randn(4, 7)
    lengths = torch.tensor([7, 3, 0, 5])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    rewards[~mask] = float("nan")
    values[~mask] = float("inf")
    adv, ret = compute_gae(rewards, values, mask, 0.99, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    assert (adv[2] == 0).all()  # row without valid tokens


def test_detached_and_no_grad() -> None:
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = compute_gae(torch.randn(2, 3), values, torch.ones(2, 3), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# ----------------------------------------------------------------- critic-free estimators


def test_rloo_by_hand() -> None:
    from pipeline.ppo.gae import rloo_advantages

    # Two prompts, k = 3: scores 1, 2, 6 and 0, 0, 3.
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), k=3)
    # 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5; 0 - 1.5; 0 - 1.5; 3 - 0
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))


def test_grpo_by_hand() -> None:
    from pipeline.ppo.gae import grpo_advantages

    adv = grpo_advantages(torch.tensor([1.0, 3.0, 5.0, 2.0, 2.0, 2.0]), k=3, eps=0.0 + 1e-12)
    # Group 1: mean 3, unbiased std 2 -> -1, 0, 1. Group 2: all equal -> 0 (no signal), not NaN.
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_reward_to_go_by_hand() -> None:
    from pipeline.ppo.gae import reward_to_go

    rewards = torch.tensor([[-0.1, -0.2, 1.0, 7.0], [-0.5, 2.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    got = reward_to_go(rewards, mask, gamma=0.5)
    # Row 1: G2 = 1, G1 = -0.2 + 0.5 * 1 = 0.3, G0 = -0.1 + 0.5 * 0.3 = 0.05; padding 0.
    # Row 2: G1 = 2, G0 = -0.5 + 0.5 * 2 = 0.5.
    torch.testing.assert_close(got, torch.tensor([[0.05, 0.3, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0]]))
    torch.testing.assert_close(reward_to_go(rewards, mask, 1.0)[0, 0], torch.tensor(0.7))
