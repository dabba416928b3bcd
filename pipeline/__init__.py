"""rlhf-pipeline: SFT -> reward model -> PPO (GAE) -> evaluation on the HuggingFace stack."""

__version__ = "0.1.0"
