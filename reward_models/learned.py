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


def reward_scores(
    model, tokenizer, prompts, responses, batch_size: int = 16, max_length: int | None = None, split: bool = True
):
    """Score (prompt, response) pairs with a sequence-classification reward model -> float tensor [N].

    Text goes through the reward model's own tokenizer and chat template, so a reward
    model whose tokenizer differs from the policy's scores the same decoded text.

    Texts are scored in batches of ``batch_size``, sorted by length. For a decoder reward model each batch goes
    through ``pipeline.decoding.scoring_forward`` left-padded: the conversation prefix every text shares (the
    chat template's system turn) runs once, and the rows run in length-sorted chunks; the score is the head's
    output at the last token, as the model's own pooling takes it (its last non-pad token). Other models (an
    encoder reward model), and every model with ``split=False`` (for benchmarks), run one right-padded forward
    per batch.
    """
    import torch

    from pipeline.decoding import score_head_run, scoring_forward

    texts = chat_texts(tokenizer, prompts, responses)
    if not texts:
        return torch.zeros(0)
    # Batches of similar length pad less; scores go back to the input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    run = score_head_run(model) if split else None
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad_id is None:  # the model's pooling then takes the last column, padding or not: keep its forward
        run = None
    device = next(model.parameters()).device

    def encode(batch: list[str], side: str):
        return tokenizer(batch, return_tensors="pt", padding=True, padding_side=side, add_special_tokens=False,
                         truncation=max_length is not None, max_length=max_length).to(device)  # fmt: skip

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = [texts[j] for j in order[i : i + batch_size]]
            if run is not None:
                enc = encode(batch, "left")
                ids, mask = enc["input_ids"], enc["attention_mask"]
                # A text ending in the pad id (pad = EOS) is scored before those tokens by the model's pooling:
                # such a batch goes through the model's own forward.
                if not (ids[:, -1] == pad_id).any():
                    out.append(scoring_forward(run, run.model, ids, mask, ids.shape[1], 1)[:, 0].cpu())
                    continue
            out.append(model(**encode(batch, "right")).logits[:, 0].float().cpu())
    scores = torch.empty(len(texts))
    scores[torch.tensor(order)] = torch.cat(out)
    return scores


def reward_pair_scores(model, tokenizer, prompts, chosen, rejected, batch_size: int = 16):
    """Scores of both replies of preference pairs -> ``(chosen [N], rejected [N])``, as ``reward_scores`` gives
    them, with less computed: for a decoder reward model, ``batch_size`` pairs at a time (sorted by length) run
    packed as prefix trees (``pipeline.decoding.packed_last_outputs``), so a pair's rendered prompt and the system
    turn every text shares run once and no padding runs. Where packing cannot apply (an encoder, no pad id, a text
    ending in the pad id, other attention kernels) and on accelerators (where its dense mask keeps SDPA off its
    flash kernel, unmeasured), ``reward_scores`` scores the replies."""
    import torch

    from pipeline.decoding import PACK_TOKENS, packed_last_outputs, packed_scorer, score_head_run

    n = len(prompts)
    device = next(model.parameters()).device
    if not n or device.type != "cpu" or score_head_run(model) is None:  # accelerators: the trade is unmeasured
        return reward_scores(model, tokenizer, prompts, chosen, batch_size), reward_scores(
            model, tokenizer, prompts, rejected, batch_size
        )
    replies = chosen + rejected
    texts = chat_texts(tokenizer, prompts * 2, replies)
    order = sorted(range(n), key=lambda i: len(texts[i]) + len(texts[n + i]))
    scores = torch.empty(2 * n)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            pairs = order[i : i + batch_size]
            rows = pairs + [n + j for j in pairs]  # the chosen replies, then the rejected ones
            enc = tokenizer([texts[r] for r in rows], return_tensors="pt", padding=True, padding_side="right",
                            add_special_tokens=False).to(device)  # fmt: skip
            ids, mask = enc["input_ids"], enc["attention_mask"]
            run = packed_scorer(model, ids, mask)
            if run is None:
                got = reward_scores(model, tokenizer, [prompts[j] for j in pairs] * 2, [replies[r] for r in rows],
                                    batch_size)  # fmt: skip
            else:
                groups = torch.arange(len(pairs), device=device).repeat(2)
                got = packed_last_outputs(run, run.model, ids, mask, groups, budget=PACK_TOKENS).cpu()
            scores[torch.tensor(rows)] = got
    return scores[:n], scores[n:]


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter directory (``adapter_config.json``), or None for a full model."""
    import json
    from pathlib import Path

    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path")


def check_reward_model(path: str) -> None:
    """One-line error unless ``path`` holds a sequence-classification model with one output (a score), or a
    sequence-classification LoRA adapter (``reward/adapter``) whose base loads."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from pipeline.errors import PipelineError

    base = adapter_base(path)
    if base is not None:
        task = json.loads((Path(path) / "adapter_config.json").read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise PipelineError(f"{path} is a {task} adapter, not a reward adapter (SEQ_CLS): pass a reward model")
        try:
            AutoConfig.from_pretrained(base)
        except (OSError, ValueError) as e:
            raise PipelineError(f"{path}: its base model {base!r} does not load ({str(e).splitlines()[0]})") from None
        return
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
    same rendered conversation. A LoRA adapter directory without tokenizer files uses its base's."""
    from pathlib import Path

    from transformers import AutoTokenizer

    base = adapter_base(path)
    has_own = base is None or any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path if has_own else base)
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
    ``adapter=NAME`` scores with that adapter of a multi-adapter PEFT model active: ensemble members
    trained as LoRA adapters on one base share it (see :func:`load_reward_members`).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, disable_adapter: bool = False, adapter=None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.disable_adapter = disable_adapter
        self.adapter = adapter

    def __call__(self, prompts: list[list[dict]], responses: list[str]):
        if self.adapter is not None:
            self.model.set_adapter(self.adapter)
        with self.model.disable_adapter() if self.disable_adapter else nullcontext():
            return reward_scores(self.model, self.tokenizer, prompts, responses, self.batch_size)


def load_reward_members(paths: list[str], policy_tokenizer, dtype, device, batch_size: int) -> list[LearnedReward]:
    """Frozen scorers for ``paths``: full reward models load one each; LoRA reward adapters on the same base
    load that base once, as one PEFT model holding every adapter, and each member switches to its own."""
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    def load(path):
        from pipeline.modeling import inference_model

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        return inference_model(model).to(device)

    members: list[LearnedReward | None] = [None] * len(paths)
    by_base: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        base = adapter_base(path)
        if base is None:
            members[i] = LearnedReward(load(path), load_reward_tokenizer(path, policy_tokenizer), batch_size)
        else:
            by_base.setdefault(str(Path(base).resolve()) if Path(base).exists() else base, []).append(i)
    for base, idx in by_base.items():
        model = PeftModel.from_pretrained(load(base), paths[idx[0]], adapter_name=f"member{idx[0]}")
        for i in idx[1:]:
            model.load_adapter(paths[i], adapter_name=f"member{i}")
        model.eval().requires_grad_(False).to(device)
        for i in idx:
            tok = load_reward_tokenizer(paths[i], policy_tokenizer)
            if model.config.pad_token_id is None:  # the score is read at the last non-pad token
                model.config.pad_token_id = tok.pad_token_id
            members[i] = LearnedReward(model, tok, batch_size, adapter=f"member{i}")
    return members
