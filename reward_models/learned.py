"""Scoring (prompt, response) pairs with a learned reward model (a sequence-classification model).

The response text goes through the reward model's own tokenizer and chat template, so a reward
model whose tokenizer differs from the policy's scores the same decoded text (the policy's tokens
are never fed to it). Used by the reward stage (held-out accuracy), PPO (the reward) and the
evaluation (the reward-model column).
"""

from __future__ import annotations

from contextlib import nullcontext


def chat_texts(tokenizer, prompts: list[list[dict]], responses: list[str]) -> list[str]:
    """Render (prompt, response) pairs with the chat template exactly as the reward trainer did."""
    return [
        tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
        for p, r in zip(prompts, responses)
    ]


def reward_scores(model, tokenizer, prompts, responses, batch_size: int = 16, max_length: int | None = None):
    """Score (prompt, response) pairs with a sequence-classification reward model -> float tensor [N].

    Text goes through the reward model's own tokenizer and chat template, so a reward model
    whose tokenizer differs from the policy's scores the same decoded text.
    """
    import torch

    texts = chat_texts(tokenizer, prompts, responses)
    if not texts:
        return torch.zeros(0)
    # Batches of similar length pad less; scores go back to the input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(
                    [texts[j] for j in order[i : i + batch_size]],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                    truncation=max_length is not None,
                    max_length=max_length,
                ).to(device)
                out.append(model(**enc).logits[:, 0].float().cpu())
    finally:
        tokenizer.padding_side = side
    scores = torch.empty(len(texts))
    scores[torch.tensor(order)] = torch.cat(out)
    return scores


def check_reward_model(path: str) -> None:
    """One-line error unless ``path`` holds a sequence-classification model with one output (a score)."""
    from transformers import AutoConfig

    from pipeline.errors import PipelineError

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PipelineError(f"could not load a reward model from {path!r} ({str(e).splitlines()[0]})") from None
    archs = config.architectures or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise PipelineError(
            f"{path} is a {archs[0]}, not a reward model (a ...ForSequenceClassification model with one output): "
            "train one with `rlhf reward` or pass another --reward_model_path"
        )
    if config.num_labels != 1:
        raise PipelineError(f"{path} has {config.num_labels} outputs; a reward model has one score (num_labels=1)")


def load_reward_tokenizer(path: str, policy_tokenizer=None):
    """The reward model's tokenizer, ready to score: a pad token (EOS when it has none) and, for a
    model without a chat template (an encoder reward model), the policy's template, so it scores the
    same rendered conversation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None and policy_tokenizer is not None:
        tokenizer.chat_template = policy_tokenizer.chat_template
    return tokenizer


class LearnedReward:
    """``(prompts, responses) -> Tensor [N]`` (float32, CPU) from a sequence-classification model.

    ``disable_adapter=True`` scores with a PEFT model's adapter switched off: PPO's value model is the
    reward model plus a LoRA adapter, so the same module with the adapter off is the frozen reward.
    Pass the module every Accelerate wrapper (DDP, DeepSpeed, FSDP) holds inside.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, disable_adapter: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.disable_adapter = disable_adapter

    def __call__(self, prompts: list[list[dict]], responses: list[str]):
        with self.model.disable_adapter() if self.disable_adapter else nullcontext():
            return reward_scores(self.model, self.tokenizer, prompts, responses, self.batch_size)
