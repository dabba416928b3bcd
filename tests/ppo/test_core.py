"""Tests for pipeline.ppo.core."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    exact_div,
    explained_variance,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
)


def _prefix_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


# ----------------------------------------------------------------- masked stats


def test_masked_mean_and_var() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, float("nan")]])
    mask = _prefix_mask([3, 2], 4)
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.5]))
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert masked_var(x, mask).item() == pytest.approx(valid.var(unbiased=True).item())
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(valid.var(unbiased=False).item())
    # empty slice -> 0, not NaN; a single valid element has variance 0 (no Bessel correction to divide by 0)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert masked_var(x, torch.zeros_like(mask)).item() == 0.0
    assert masked_var(x, _prefix_mask([1, 0], 4)).item() == 0.0


def test_masked_whiten_stats_and_padding_independence() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 9) * 3 + 5
    mask = _prefix_mask([9, 4, 1, 6], 9).bool()
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~mask] == 0).all()
    x2 = x.clone()
    x2[~mask] = 1e6
    x3 = x.clone()
    x3[~mask] = float("nan")
    torch.testing.assert_close(masked_whiten(x2, mask), w)
    torch.testing.assert_close(masked_whiten(x3, mask), w)
    # shift_mean=False keeps the mean, only rescales
    w_ns = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w_ns, mask).item() == pytest.approx(masked_mean(x, mask).item(), rel=1e-5)
    assert (w_ns[~mask] == 0).all()


# ----------------------------------------------------------------- logprobs/entropy


def test_logprobs_from_logits_matches_categorical() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    lp = logprobs_from_logits(logits, labels)
    expected = torch.distributions.Categorical(logits=logits).log_prob(labels)
    assert lp.shape == (3, 5)
    torch.testing.assert_close(lp, expected)
    lp.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # bf16 logits: computed in float32
    lp16 = logprobs_from_logits(logits.detach().bfloat16(), labels)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, logprobs_from_logits(logits.detach().bfloat16().float(), labels))


def test_entropy_from_logits() -> None:
    V = 13
    ent = entropy_from_logits(torch.full((2, 4, V), 0.7))
    torch.testing.assert_close(ent, torch.full((2, 4), math.log(V)))
    torch.manual_seed(0)
    logits = torch.randn(2, 3, V)
    torch.testing.assert_close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())
    logits[..., 0] = float("-inf")  # banned token
    assert torch.isfinite(entropy_from_logits(logits)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [0, 3])  # logits_to_keep=T+1, or every position (a prompt before)
def test_token_logprobs_equal_the_plain_expressions_and_their_gradient(dtype, extra) -> None:
    """``token_logprobs`` against the expressions it replaces: log-probs of the temperature-scaled logits bit for
    bit, entropies and the gradient (autograd's through those expressions) to rounding, a banned (-inf) token
    included; positions that predicted no label get a zero gradient."""
    from pipeline.sequences import response_logits

    torch.manual_seed(0)
    B, T, V, temperature = 3, 6, 50, 0.7
    logits = (torch.randn(B, T + 1 + extra, V) * 3).to(dtype)
    logits[0, extra + 2, 7] = float("-inf")
    labels = torch.randint(0, V, (B, T))
    labels[0, 2] = 8
    weights = torch.randn(B, T)

    mine = logits.clone().requires_grad_()
    lp, ent = token_logprobs(mine, labels, temperature)
    (lp * weights).sum().backward()
    plain = logits.clone().requires_grad_()
    scaled = response_logits(plain, T, temperature)
    want = logprobs_from_logits(scaled, labels)
    (want * weights).sum().backward()

    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (B, T)
    assert torch.equal(lp.detach(), want.detach())
    torch.testing.assert_close(ent, entropy_from_logits(scaled.detach()))
    assert torch.isfinite(ent).all() and not ent.requires_grad
    assert mine.grad.dtype == dtype
    torch.testing.assert_close(mine.grad, plain.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    assert not mine.grad[:, :extra].any() and not mine.grad[:, -1].any()
    assert token_logprobs(logits, labels, temperature, entropy=False)[1] is None


# ----------------------------------------------------------------- KL


def test_kl_estimators() -> None:
    torch.manual_seed(0)
    lp = torch.randn(4, 6) - 2
    assert (kl_estimate(lp, lp, "k1") == 0).all()
    assert (kl_estimate(lp, lp, "k3") == 0).all()
    ref = lp + torch.randn(4, 6)
    k3 = kl_estimate(lp, ref, "k3")
    assert (k3 >= 0).all() and (k3 > 0).any()
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), lp - ref)
    r = torch.exp(ref - lp)
    torch.testing.assert_close(k3, (r - 1) - torch.log(r))


def test_k3_is_unbiased_kl_estimate() -> None:
    torch.manual_seed(0)
    p = torch.distributions.Categorical(logits=torch.randn(5))
    q = torch.distributions.Categorical(logits=torch.randn(5))
    x = p.sample((200_000,))
    k3 = kl_estimate(p.log_prob(x)[None], q.log_prob(x)[None], "k3")
    true_kl = torch.distributions.kl_divergence(p, q).item()
    assert k3.mean().item() == pytest.approx(true_kl, rel=0.05)


# ----------------------------------------------------------------- rewards


def test_token_rewards_score_on_last_valid_token() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    scores = torch.tensor([10.0, 20.0, 30.0])
    mask = _prefix_mask([4, 2, 0], 4)
    beta = 0.5
    rewards = token_rewards(kl, scores, mask, beta)
    expected = torch.tensor(
        [
            [-0.05, -0.1, -0.15, -0.2 + 10.0],  # full row: score at the very last position
            [-0.25, -0.3 + 20.0, 0.0, 0.0],  # padded row: score at index 1, never on padding
            [0.0, 0.0, 0.0, 0.0],  # empty row: gets nothing
        ]
    )
    torch.testing.assert_close(rewards, expected)
    assert rewards.dtype == torch.float32 and not rewards.requires_grad


# ----------------------------------------------------------------- policy loss


def test_policy_loss_on_policy() -> None:
    torch.manual_seed(0)
    lp = (torch.randn(3, 5) - 1).requires_grad_()
    adv = torch.randn(3, 5)
    mask = _prefix_mask([5, 3, 1], 5)
    out = policy_loss(lp, lp.detach().clone(), adv, mask, cliprange=0.2)
    assert out["ratio_mean"].item() == pytest.approx(1.0)
    assert out["approxkl"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["clipfrac"].item() == 0.0
    torch.testing.assert_close(out["loss"], -masked_mean(adv, mask))
    for key in ("clipfrac", "approxkl", "ratio_mean"):
        assert not out[key].requires_grad
    out["loss"].backward()
    # gradient of -A*ratio at ratio=1 is -A / n_valid on valid tokens, 0 on padding
    torch.testing.assert_close(lp.grad, -adv * mask / mask.sum())


def test_policy_loss_clipping_engages() -> None:
    old = torch.zeros(1, 4)
    # ratios: 1.5 (A>0, clipped), 0.5 (A<0, clipped), 1.1 (inside), 1.5 (A<0: max picks unclipped)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    mask = torch.ones(1, 4)
    out = policy_loss(lp, old, adv, mask, cliprange=0.2)
    expected_terms = torch.tensor([-1.2, 0.8, -2.2, 1.5])
    assert out["loss"].item() == pytest.approx(expected_terms.mean().item())
    assert out["clipfrac"].item() == pytest.approx(0.5)
    ratio = torch.tensor([1.5, 0.5, 1.1, 1.5])
    assert out["ratio_mean"].item() == pytest.approx(ratio.mean().item())
    assert out["approxkl"].item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item(), rel=1e-5)
    out["loss"].backward()
    # clipped tokens carry no gradient
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() == 0.0
    assert lp.grad[0, 2].item() != 0.0 and lp.grad[0, 3].item() != 0.0


def test_policy_loss_ignores_garbage_padding() -> None:
    lp = torch.tensor([[-1.0, 80.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -80.0]])
    adv = torch.tensor([[1.0, float("nan")]])
    mask = torch.tensor([[1.0, 0.0]])
    out = policy_loss(lp, old, adv, mask, 0.2)
    assert out["loss"].item() == pytest.approx(-1.0)
    out["loss"].backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 1].item() == 0.0


# ----------------------------------------------------------------- value loss


def test_value_loss_clipping_by_hand() -> None:
    values = torch.tensor([[1.0, 0.0, 2.0, 99.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 0.0, 1.9, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 0: V=1 moved 1.0 from old -> clipped to 0.2: (1-2)^2=1 vs (0.2-2)^2=3.24 -> 3.24 (clipped)
    # token 1: unchanged: (0-1)^2=1 both -> 1 (not counted as clipped)
    # token 2: V=2, old 1.9 within range: (2-0)^2=4 both -> 4
    expected = 0.5 * (3.24 + 1.0 + 4.0) / 3
    assert out["loss"].item() == pytest.approx(expected)
    assert out["clipfrac"].item() == pytest.approx(1 / 3)
    out["loss"].backward()
    assert values.grad[0, 0].item() == 0.0  # clipped branch: no gradient
    assert values.grad[0, 3].item() == 0.0  # padding

    no_clip = value_loss(values, old_values, returns, mask, cliprange_value=None)
    assert no_clip["loss"].item() == pytest.approx(0.5 * (1.0 + 1.0 + 4.0) / 3)
    assert no_clip["clipfrac"].item() == 0.0


def test_value_loss_clipped_branch_is_smaller_when_moving_toward_target() -> None:
    # V moves far past the target; the clipped value is farther -> max picks clipped loss
    out = value_loss(torch.tensor([[3.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.5)
    # unclipped (3-1)^2=4, clipped (0.5-1)^2=0.25 -> max = 4, not clipped
    assert out["loss"].item() == pytest.approx(2.0)
    assert out["clipfrac"].item() == 0.0


# ----------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=7.0, n_steps=256)  # above target -> up
    err = 7.0 / 6.0 - 1
    assert ctl.value == pytest.approx(0.1 * (1 + err * 256 / 10_000))
    assert ctl.value > 0.1

    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    ctl.update(current_kl=1.0, n_steps=256)  # below target -> down, error clipped at -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10_000))

    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    ctl.update(current_kl=600.0, n_steps=256)  # far above -> clipped at +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))

    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    ctl.update(current_kl=6.0, n_steps=256)  # at target -> unchanged
    assert ctl.value == pytest.approx(0.1)

    ctl.update(9.0, 100)
    state = ctl.state_dict()
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.value == ctl.value and restored.target == 6.0 and restored.horizon == 10_000


def test_fixed_kl_controller() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# ----------------------------------------------------------------- misc


def test_exact_div() -> None:
    assert exact_div(12, 4, "batch") == 3
    with pytest.raises(ValueError, match="batch: 10 is not divisible by 4"):
        exact_div(10, 4, "batch")
    with pytest.raises(ValueError):
        exact_div(10, 0, "batch")


def test_running_moments() -> None:
    torch.manual_seed(0)
    data = torch.randn(1000, dtype=torch.float64) * 2 + 3
    rm = RunningMoments()
    for chunk in data.split(97):
        rm.update(chunk)
    assert rm.count == 1000
    assert rm.mean == pytest.approx(data.mean().item())
    assert rm.std == pytest.approx(data.std(unbiased=False).item())
    rm2 = RunningMoments()
    rm2.load_state_dict(rm.state_dict())
    assert rm2.state_dict() == rm.state_dict()


# ----------------------------------------------------------------- explained variance


def test_explained_variance_by_hand() -> None:
    # Valid returns 1, 2, 3 (mean 2, population variance 2/3); the last column is padding (ignored).
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = _prefix_mask([3], 4)
    perfect = explained_variance(returns.clone(), returns, mask)
    assert perfect.item() == pytest.approx(1.0)
    mean_only = explained_variance(torch.full((1, 4), 2.0), returns, mask)  # predicts the mean: explains nothing
    assert mean_only.item() == pytest.approx(0.0, abs=1e-6)
    # Errors 0.5, -0.5, 0.5: variance of (returns - values) = 2/9, so 1 - (2/9) / (2/3) = 2/3.
    values = torch.tensor([[0.5, 2.5, 2.5, -9.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(values, torch.ones(1, 4), mask).item())  # returns that do not vary
