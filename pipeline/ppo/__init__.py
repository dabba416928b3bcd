"""PPO algorithm math (pure torch functions): GAE, losses, KL control, masked statistics."""

from . import core
from .core import (
    AdaptiveKLController,
    FixedKLController,
    PolicyLossOutput,
    RunningMoments,
    ValueLossOutput,
    entropy_from_logits,
    exact_div,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    process_scores,
    token_rewards,
    value_loss,
)
from .gae import compute_gae

__all__ = [*core.__all__, "compute_gae"]
