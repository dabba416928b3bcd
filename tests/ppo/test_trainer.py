"""Tests of ``pipeline/ppo/trainer.py`` on tiny models built in the test: first-step invariants, masking
and reward placement, what trains and what stays frozen, bf16 bases, and the non-finite guard across ranks.
Whole runs through the stage's command line are in ``tests/test_stage_ppo.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.ppo.trainer import UPDATE_STATS
from tests.conftest import launch_two_processes, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")  # make_trainer builds on the CPU


def test_bf16_bases_train_fp32_adapters(tiny_artifacts, prompts_file, fresh_accelerate_state):
    """``--dtype bfloat16``: frozen bases in bf16, every trained weight in fp32 (the optimizer's
    master copy), forwards under autocast; policy and reference still agree exactly at the start."""
    trainer, _, batch = make_trainer(
        tiny_artifacts,
        prompts_file,
        dtype="bfloat16",
        mixed_precision="bf16",
        rollout_batch_size=8,
        local_rollout_forward_batch_size=8,
        learning_rate=1e-2,
    )
    net = trainer.unwrapped
    trained = {n: p for n, p in net.named_parameters() if p.requires_grad}
    frozen = [p for p in net.parameters() if not p.requires_grad]
    assert trained and frozen
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert any(".score." in n for n in trained)  # the value head is trained, in fp32 too
    ro = trainer.rollout(batch)
    assert ro.stats["objective/kl"] == 0.0
    before = {n: p.detach().clone() for n, p in trained.items()}
    upd = trainer.update(ro)
    assert math.isfinite(upd["loss/policy_avg"]) and math.isfinite(upd["loss/value_avg"])
    moved = [n for n, p in trained.items() if not torch.equal(before[n], p.detach())]
    assert any("lora_B" in n and "policy" in n for n in moved) and any(".score." in n for n in moved)


def test_adamw_is_fused_where_pytorch_fuses_it(tiny_artifacts, prompts_file):
    """One CPU process: the trainer's AdamW runs PyTorch's fused kernel over every trained parameter. DeepSpeed
    and FSDP, which shard the optimizer or its parameters their own way, keep PyTorch's default, as do
    parameters on a device the kernel does not cover or of another dtype."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pipeline.ppo.trainer import fused_adamw

    trainer, _, _ = make_trainer(tiny_artifacts, prompts_file)
    groups = trainer.optimizer.optimizer.param_groups
    assert [g["fused"] for g in groups] == [True]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in trainer.unwrapped.parameters())
    params = [torch.zeros(2, requires_grad=True)]
    for kind, want in ((DistributedType.MULTI_CPU, True), (DistributedType.DEEPSPEED, None),
                       (DistributedType.FSDP, None)):  # fmt: skip
        assert fused_adamw(SimpleNamespace(distributed_type=kind), params) is want
    plain = SimpleNamespace(distributed_type=DistributedType.NO)
    assert fused_adamw(plain, [torch.zeros(2, dtype=torch.float64)]) is None
    assert fused_adamw(plain, [torch.zeros(2, device="meta")]) is None and fused_adamw(plain, []) is None


@pytest.mark.parametrize("lora_alpha", [8, 4, 6], ids=["scaling2", "scaling1", "scaling1.5"])
def test_lean_lora_forwards_give_the_same_bits(tiny_artifacts, prompts_file, lora_alpha):
    """bf16 bases under bf16 autocast: the update's forward with the lean LoRA forwards (no input casts, a
    power-of-two scaling moved onto the rank-r factor's output; PEFT's order for any other scaling) gives the
    same log-probs, values and gradients, bit for bit, as PEFT's own forwards; the LoRA factors then see bf16
    inputs, and PEFT's forwards are back after."""
    from peft.tuners.lora import Linear as LoraLinear

    from pipeline.ppo.trainer import lean_lora_layers

    trainer, _, batch = make_trainer(tiny_artifacts, prompts_file, dtype="bfloat16", mixed_precision="bf16",
                                     rollout_batch_size=8, local_rollout_forward_batch_size=8,
                                     lora_alpha=lora_alpha)  # fmt: skip
    lean = trainer.lean_lora
    assert lean and lean == lean_lora_layers(trainer.unwrapped, "bf16")
    assert lean_lora_layers(trainer.unwrapped, "no") == []
    assert {layer.scaling["default"] for layer in lean if "policy" in str(layer)} <= {lora_alpha / 4}
    ro = trainer.rollout(batch)
    trainer._graph = None
    trained = {n: p for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give every factor's gradient something to carry
        for n, p in trained.items():
            if "lora_B" in n:
                p.normal_(std=0.05)
    seen, peft_forward = [], LoraLinear.forward
    policy_layers = [m for m in trainer.unwrapped.policy.modules() if type(m) is LoraLinear]
    factor = policy_layers[0].lora_A["default"]
    factor.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    outputs = {}
    for name, layers in (("peft", []), ("lean", lean)):
        trainer.lean_lora = layers
        trainer.optimizer.zero_grad()
        trainer.model.train()
        lp, _, values = trainer._train_forward(ro.query_response, ro.attention_mask, ro.context_length)
        (lp.sum() + values.float().sum()).backward()
        outputs[name] = (lp.detach(), values.detach(), {n: p.grad.clone() for n, p in trained.items()})
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16  # PEFT's cast, then none
    (lp_a, v_a, g_a), (lp_b, v_b, g_b) = outputs["peft"], outputs["lean"]
    assert torch.equal(lp_a, lp_b) and torch.equal(v_a, v_b)
    assert all(torch.equal(g_a[n], g_b[n]) for n in g_a)
    assert any(g.abs().sum() > 0 for n, g in g_b.items() if "lora_A" in n)
    assert all(layer.cast_input_dtype_enabled is not False for layer in lean)  # restored after the forward
    assert all("forward" not in vars(layer) and layer.forward.__func__ is peft_forward for layer in policy_layers)


@pytest.mark.parametrize("source", ["forward", "sampler"])
def test_first_minibatch_ratio_one_and_zero_kl(tiny_artifacts, prompts_file, source):
    """Before any step the policy is the reference and the behaviour policy. With the rollout's log-probs from a
    policy forward (the same path as the reference's) the KL is exactly 0; from the sampler (fp32) it is 0 up to
    rounding, and the sampler's token-probability error, measured on the first minibatch, is 1 up to rounding."""
    trainer, _, batch = make_trainer(
        tiny_artifacts,
        prompts_file,
        rollout_batch_size=8,
        num_mini_batches=2,
        per_device_train_batch_size=2,
        local_rollout_forward_batch_size=4,
        response_length=8,
        learning_rate=1e-2,
        rollout_logprobs=source,
    )
    assert trainer.sampler_logprobs == (source == "sampler")
    ro = trainer.rollout(batch)
    # LoRA B starts at zero: policy == reference, so through the forward the sequence KL is exactly 0, not merely
    # small; the sampler's log-probs come from another path (rounding).
    exact = source == "forward"
    assert ro.stats["objective/kl"] == pytest.approx(0.0, abs=0.0 if exact else 1e-5)
    assert ro.stats["objective/non_score_reward"] == pytest.approx(0.0, abs=0.0 if exact else 1e-6)
    assert ("val/sampler_token_prob_error" in ro.stats) == exact
    stats = trainer.update(ro)
    assert 1.0 <= stats.get("val/sampler_token_prob_error", 1.0) < 1.0 + 1e-5
    assert ("val/sampler_token_prob_error" in stats) != exact
    # num_ppo_epochs * num_mini_batches, in order: every one ran a forward and an optimizer step
    assert (
        trainer.minibatch_stats.shape[0] == 2
        and (trainer.minibatch_stats[:, :, UPDATE_STATS.index("loss/value")] > 0).all()
    )
    assert (trainer.grad_norms > 0).all()
    first = trainer.minibatch(0)
    # Nothing has been stepped before the first minibatch (2 micro-batches, one optimizer step):
    # the update forward reproduces the rollout log-probs.
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert abs(first["policy/approxkl"]) < 1e-6
    assert first["policy/clipfrac"] == 0.0
    assert math.isfinite(first["policy/grad_norm"]) and first["policy/grad_norm"] > 0
    # ...and after the first optimizer step the policy differs from the behaviour policy.
    assert trainer.minibatch(1)["policy/approxkl"] > first["policy/approxkl"]


def test_rollout_reports_explained_variance(tiny_artifacts, prompts_file):
    """The value head's explained variance is logged each rollout, from that rollout's values and returns."""
    trainer, _, batch = make_trainer(
        tiny_artifacts, prompts_file, rollout_batch_size=8, local_rollout_forward_batch_size=8
    )
    ro = trainer.rollout(batch)
    ev = ro.stats["val/explained_variance"]
    returns, values = ro.returns[ro.mask].double(), ro.values[ro.mask].double()  # valid tokens only
    assert ev == pytest.approx(1 - (returns - values).var(unbiased=False).item() / returns.var(unbiased=False).item())
    assert math.isfinite(ev)


class _EosBoost:
    """Logits processor: EOS gets probability ~p at every step (a random tiny model almost never emits it)."""

    def __init__(self, eos: int, p: float):
        self.eos, self.logit = eos, math.log(p / (1 - p))

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        others = scores.clone()
        others[:, self.eos] = -float("inf")
        scores[:, self.eos] = torch.logsumexp(others, -1) + self.logit
        return scores


def test_rollout_mask_padding_and_score_on_last_token(tiny_artifacts, prompts_file, monkeypatch):
    from transformers import LogitsProcessorList

    from pipeline.ppo.core import token_rewards
    from pipeline.sequences import response_mask

    B, R = 16, 10
    gamma, penalty = 0.5, 0.5

    def index_scores(prompts, responses):  # a distinct score per row: 1, 2, ..., B
        return torch.arange(1, len(responses) + 1, dtype=torch.float32)

    trainer, _, batch = make_trainer(
        tiny_artifacts,
        prompts_file,
        reward_fn=index_scores,
        rollout_batch_size=B,
        num_mini_batches=1,
        per_device_train_batch_size=B,
        local_rollout_forward_batch_size=4,
        response_length=R,
        temperature=1.0,
        kl_coef=0.0,
        gamma=gamma,
        lam=1.0,
        missing_eos_penalty=penalty,
    )
    tok = trainer.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    sampler = trainer.sampler or trainer.unwrapped.policy  # what the rollout samples from
    generate = sampler.generate
    # The EOS boost goes before the rollout's own processors (the last of which draws the token).
    monkeypatch.setattr(
        sampler,
        "generate",
        lambda **kw: generate(
            **{**kw, "logits_processor": LogitsProcessorList([_EosBoost(eos, 0.08), *kw.get("logits_processor", [])])}
        ),
    )

    ro = trainer.rollout(batch)
    P = ro.context_length
    responses = ro.query_response[:, P:]
    assert responses.shape == (B, R) and ro.mask.shape == (B, R)
    is_eos = responses == eos
    has_eos = is_eos.any(1)
    firsts = [int(is_eos[b].nonzero()[0]) for b in range(B) if has_eos[b]]
    assert has_eos.any() and not has_eos.all(), "need both EOS-ended and truncated responses"
    assert min(firsts) < R - 1, "need an early EOS, followed by padding"

    for b in range(B):
        if has_eos[b]:
            first = int(is_eos[b].nonzero()[0])
            assert ro.mask[b, : first + 1].all() and not ro.mask[b, first + 1 :].any()
            assert (responses[b, first + 1 :] == pad).all(), "after EOS comes pad_token_id"
        else:
            assert ro.mask[b].all(), "a response hitting the length cap is valid to its end"
    assert torch.equal(ro.attention_mask[:, P:], ro.mask.long())
    assert torch.equal(response_mask(responses, eos)[0], ro.mask)
    assert ro.stats["val/eos_rate"] == pytest.approx(has_eos.float().mean().item())
    assert ro.stats["val/response_length"] == pytest.approx(ro.mask.sum(1).float().mean().item())

    # With kl_coef 0 and lam 1 the returns are the discounted score placed on the last valid token:
    # R_t = gamma^(last - t) * score for t <= last, 0 after (independent of the value estimates).
    raw = torch.tensor([s for _, _, s in ro.texts])
    assert torch.equal(raw, torch.arange(1, B + 1, dtype=torch.float32))
    score = torch.where(has_eos, raw, raw - penalty)
    last = ro.mask.sum(1) - 1
    t = torch.arange(R).unsqueeze(0)
    expected = torch.where(ro.mask, score.unsqueeze(1) * gamma ** (last.unsqueeze(1) - t).clamp(min=0), 0.0)
    torch.testing.assert_close(ro.returns, expected, atol=1e-5, rtol=1e-5)
    assert (ro.advantages[~ro.mask] == 0).all()

    # token_rewards on this batch's mask: -beta*kl on valid tokens, plus the score on the last one only.
    kl = torch.randn(B, R)
    rewards = token_rewards(kl, score, ro.mask, 0.1)
    expected_r = torch.where(ro.mask, -0.1 * kl, 0.0)
    expected_r[torch.arange(B), last] += score
    torch.testing.assert_close(rewards, expected_r)


def _is_trained_name(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def test_adapters_train_and_base_weights_stay_frozen(tiny_artifacts, prompts_file):
    trainer, rm_fn, batch = make_trainer(
        tiny_artifacts,
        prompts_file,
        rollout_batch_size=4,
        num_mini_batches=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
    )
    net = trainer.unwrapped
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if _is_trained_name(n)}
    assert any(n.startswith("policy.") and "lora_B" in n for n in trainable)
    assert any(n.startswith("value.") and "lora_" in n for n in trainable)
    assert any(n.startswith("value.") and "modules_to_save" in n and "score" in n for n in trainable)
    assert all(torch.count_nonzero(before[n]) == 0 for n in trainable if n.startswith("policy.") and "lora_B" in n)

    # Reward model = value module with its adapter disabled; reference = policy with adapter disabled.
    probe_prompts = batch[:2]
    probe_responses = ["volcanoes erupt when magma rises.", "coffee is a drink."]
    reward_before = rm_fn(probe_prompts, probe_responses)
    ids = trainer.tokenizer(["Tell me about rain, take 1."], return_tensors="pt")
    with torch.no_grad(), net.policy.disable_adapter():
        ref_before = net.policy(**ids).logits

    for _ in range(2):
        trainer.update(trainer.rollout(batch))

    after = dict(net.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trainable, (
        f"frozen but changed: {sorted(changed - trainable)}; trainable but unchanged: {sorted(trainable - changed)}"
    )
    with torch.no_grad(), net.policy.disable_adapter():
        assert torch.equal(net.policy(**ids).logits, ref_before)
    assert torch.equal(rm_fn(probe_prompts, probe_responses), reward_before)
    with torch.no_grad():
        assert not torch.equal(net.policy(**ids).logits, ref_before)  # the adapted policy moved
    assert trainer.rollout(batch).stats["objective/kl"] != 0.0  # ... so policy and reference now differ


@pytest.mark.slow
def test_nonfinite_skip_agrees_across_ranks(tmp_path):
    """A non-finite loss on one rank makes every rank skip the step and count it."""
    proc = launch_two_processes(str(Path(__file__).with_name("nonfinite_ranks_script.py")), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["decisions"] == [False, False, False, True] and r["total"] == 3 and r["in_a_row"] == 0, r


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_critic_free_estimators_train_the_policy_only(tiny_artifacts, prompts_file, estimator):
    """No value model is loaded or trained; each prompt's k samples sit side by side; for RLOO and GRPO
    every token of a response carries its sequence's advantage, and a prompt's advantages sum to zero."""
    from pipeline.ppo.gae import grpo_advantages, rloo_advantages

    k = 4
    trainer, _, batch = make_trainer(
        tiny_artifacts, prompts_file, advantage_estimator=estimator, num_samples_per_prompt=k,
        rollout_batch_size=2, num_mini_batches=2, per_device_train_batch_size=4,
        local_rollout_forward_batch_size=8, temperature=1.0, learning_rate=1e-2, missing_eos_penalty=0.0,
        rollout_logprobs="forward",  # the KL is then exactly 0 at the start, so the advantages are the scores'
    )  # fmt: skip
    net = trainer.unwrapped
    assert net.value is None and trainer.sizes.local_mini_batch_size == 4 and trainer.sizes.episodes == 8
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("policy.") for n in trained)
    group = [p for p in batch[:2] for _ in range(k)]
    ro = trainer.rollout(group)
    assert ro.mask.shape[0] == 8 and ro.stats["objective/kl"] == 0.0
    assert "val/explained_variance" not in ro.stats and (ro.returns == 0).all()
    assert (ro.advantages[~ro.mask] == 0).all()
    if estimator != "reinforce_pp":
        per_seq = ro.advantages.sum(1) / ro.mask.sum(1)  # the one value each response's tokens carry
        assert torch.allclose(ro.advantages, torch.where(ro.mask, per_seq.unsqueeze(1), 0.0))
        scores = torch.tensor([s for _, _, s in ro.texts])  # kl_coef term is 0 at the start
        fn = rloo_advantages if estimator == "rloo" else grpo_advantages
        torch.testing.assert_close(per_seq, fn(scores, k), atol=1e-5, rtol=1e-5)
        assert torch.allclose(per_seq.view(2, k).sum(1), torch.zeros(2), atol=1e-4)
    else:
        assert abs(ro.advantages[ro.mask].mean().item()) < 1e-4  # whitened over the batch
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    stats = trainer.update(ro)
    assert trainer.minibatch(0)["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert "loss/value_avg" not in stats and math.isfinite(stats["loss/policy_avg"])
    assert any(not torch.equal(before[n], p) for n, p in net.named_parameters() if p.requires_grad)


def test_sampler_records_align_with_the_responses_when_rows_end_early(tiny_artifacts, prompts_file):
    """--rollout_logprobs sampler: the log-probs and entropies the sampler recorded sit on the response tokens
    they belong to, also for rows that end early and leave the batch (pipeline/decoding.py), and equal a policy
    forward's there to rounding; past a row's end they are 0. EOS is made a token the rows draw often."""
    from collections import Counter

    from pipeline.ppo.core import entropy_from_logits, logprobs_from_logits
    from pipeline.sequences import response_logits

    trainer, _, batch = make_trainer(
        tiny_artifacts, prompts_file, rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=4,
        response_length=8, rollout_logprobs="sampler",
    )  # fmt: skip
    assert trainer.sampler_logprobs
    tok = trainer.tokenizer
    torch.manual_seed(0)
    with torch.no_grad():
        qr, _, P, _, _, _ = trainer._generate(batch)
    common = Counter(qr[:, P + 1 :].flatten().tolist()).most_common(1)[0][0]  # drawn after the first token
    tok.eos_token = tok.convert_ids_to_tokens(common)
    torch.manual_seed(0)
    with torch.no_grad():
        qr, am, P, mask, has_eos, (logprobs, entropy) = trainer._generate(batch)
        R = qr.shape[1] - P
        rl = response_logits(trainer._scored(qr, am, P, "policy"), R, trainer.args.temperature)
        want_lp, want_ent = logprobs_from_logits(rl, qr[:, P:]), entropy_from_logits(rl)
    assert has_eos.any() and not mask.all()  # some rows ended early
    torch.testing.assert_close(logprobs[mask], want_lp[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy[mask], want_ent[mask], rtol=1e-4, atol=1e-4)
    assert (logprobs[~mask] == 0).all() and (entropy[~mask] == 0).all()
