"""The PPO loop: rollout -> rewards -> GAE -> clipped updates, on Accelerate + PEFT.

Written for this project; the references read while writing it are TRL 1.12's
``trl.experimental.ppo`` trainer, CleanRL's ``ppo.py`` and [N+] Huang et al. 2024,
"The N+ Implementation Details of RLHF with PPO" (https://arxiv.org/abs/2403.17031).

Tensor names: ``B`` local rollout batch, ``P`` padded prompt length, ``R`` response length.
Responses are right of the (left-padded) prompt; ``mask`` ``[B, R]`` is 1 on response tokens
up to and including the first EOS and 0 after. Padding never decides where a response ends:
the EOS position does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.ppo.core import (
    entropy_from_logits,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    process_scores,
    token_rewards,
    value_loss,
)
from pipeline.ppo.gae import compute_gae
from pipeline.sampling import sampling_kwargs


def position_ids_from(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them (so log-probs match sampling)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def token_values(seq_cls_model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Per-token values ``[B, L]`` from a sequence-classification model: its score head on every position.

    ``seq_cls_model`` is the transformers model (inside PEFT, ``peft_model.get_base_model()``): LoRA
    layers are injected into it in place, and its ``score`` is PEFT's modules-to-save wrapper, so the
    active adapter (or none, under ``disable_adapter()``) applies.
    """
    backbone = getattr(seq_cls_model, seq_cls_model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return seq_cls_model.score(hidden).squeeze(-1).float()


class PolicyAndValue(nn.Module):
    """One module holding both trained networks, so one optimizer and one ``accelerator.prepare``
    (DDP, DeepSpeed, FSDP) cover them. ``forward`` returns policy logits and per-token values."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy = policy  # PeftModel (causal LM); reference = policy.disable_adapter()
        self.value = value  # PeftModel (seq-cls, reward = value.disable_adapter()) or a plain seq-cls model

    def value_backbone(self) -> nn.Module:
        return self.value.get_base_model() if hasattr(self.value, "get_base_model") else self.value

    def forward(self, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int = 0) -> tuple[Tensor, Tensor]:
        """``logits_to_keep=n``: policy logits of the last ``n`` positions only (0 = all), which skips
        the vocabulary projection of the prompt: half the logits memory and traffic here."""
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
            use_cache=False, logits_to_keep=logits_to_keep,
        ).logits
        return logits, token_values(self.value_backbone(), input_ids, attention_mask)


def response_mask(responses: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """``(mask [B, R] bool, has_eos [B] bool)``: valid = up to and including the first EOS."""
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(1)
    # Index of the first EOS, or R when there is none.
    first = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, responses.shape[1], dtype=torch.long))
    idx = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
    return idx <= first.unsqueeze(1), has_eos


@dataclass
class Rollout:
    """Everything one iteration's update needs (all on the local device, detached)."""

    query_response: Tensor  # [B, P+R] token ids (prompt left-padded, response right-padded)
    attention_mask: Tensor  # [B, P+R]
    context_length: int  # P
    mask: Tensor  # [B, R] bool
    logprobs: Tensor  # [B, R] behaviour-policy log-probs (temperature-scaled)
    values: Tensor  # [B, R]
    advantages: Tensor  # [B, R] whitened
    returns: Tensor  # [B, R]
    stats: dict
    texts: list[tuple[str, str, float]]  # (prompt, response, score) for sample tables


def response_logits(logits: Tensor, response_length: int, temperature: float) -> Tensor:
    """Logits that predicted the ``response_length`` response tokens (the sequence's last ones),
    scaled by the sampling temperature ([N+] detail). ``logits`` may cover every position or only
    the last ``response_length + 1`` (``logits_to_keep``).

    Upcast to float32 first: Accelerate's mixed-precision wrapper hands the policy's logits back in
    float32 while the reference's (adapter off, called directly) stay bf16, and dividing bf16 by the
    temperature rounds, so policy and reference would differ by ~1e-3 nats per token at the start.
    """
    return logits[:, -response_length - 1 : -1].float() / temperature


def response_logprobs(model, query_response: Tensor, attention_mask: Tensor, responses: Tensor, temperature: float) -> Tensor:
    """Per-token log-probs of ``responses`` (the last tokens of ``query_response``) under a causal LM,
    temperature-scaled as sampled; only the response positions are projected onto the vocabulary."""
    R = responses.shape[1]
    logits = model(input_ids=query_response, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
                   use_cache=False, logits_to_keep=R + 1).logits
    return logprobs_from_logits(response_logits(logits, R, temperature), responses)


class PPOLoop:
    """Holds the prepared model/optimizer and runs rollouts and updates. Orchestration (data,
    checkpoints, logging) lives in ``pipeline/stage_ppo.py``."""

    def __init__(self, args, accelerator, model, optimizer, scheduler, tokenizer, reward_fn, kl_ctl, score_moments,
                 sampler=None):
        self.args = args
        self.sampler = sampler  # a ``MergedPolicy`` to sample rollouts from, or None (the PEFT policy samples)
        self.accelerator = accelerator
        self.model = model  # prepared PolicyAndValue
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn  # (prompts: list[list[dict]], responses: list[str]) -> Tensor [B] on CPU
        self.kl_ctl = kl_ctl
        self.score_moments = score_moments
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ rollout
    def rollout(self, prompts: list[list[dict]]) -> Rollout:
        # Every rollout forward (generation, policy, reference, value, reward) runs under the same
        # autocast as the update's forward, so policy and reference differ only by the adapter.
        with torch.no_grad(), self.accelerator.autocast():
            return self._rollout(prompts)

    def _rollout(self, prompts: list[list[dict]]) -> Rollout:
        args, tok, device = self.args, self.tokenizer, self.accelerator.device
        net = self.unwrapped
        net.eval()
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left").to(device)
        P = enc["input_ids"].shape[1]
        gen_kwargs = dict(
            **sampling_kwargs(args.temperature, args.top_k, args.top_p),  # softmax(logits / T), without torch.multinomial
            max_new_tokens=args.response_length, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        sampler = net.policy
        if self.sampler is not None:
            self.sampler.sync()  # the merged copy takes the adapter as the last update left it
            sampler = self.sampler
        chunks = []
        for i in range(0, len(prompts), args.local_rollout_forward_batch_size):
            sl = slice(i, i + args.local_rollout_forward_batch_size)
            out = sampler.generate(input_ids=enc["input_ids"][sl], attention_mask=enc["attention_mask"][sl], **gen_kwargs)
            chunks.append(out[:, P:])
        R = args.response_length
        responses = torch.cat(
            [nn.functional.pad(c, (0, R - c.shape[1]), value=tok.pad_token_id) for c in chunks]
        )  # [B, R]
        mask, has_eos = response_mask(responses, tok.eos_token_id)
        responses = responses.masked_fill(~mask, tok.pad_token_id)
        query_response = torch.cat([enc["input_ids"], responses], 1)
        attention_mask = torch.cat([enc["attention_mask"], mask.long()], 1)

        logprobs, ref_logprobs, values, entropies = [], [], [], []
        for i in range(0, len(prompts), args.local_rollout_forward_batch_size):
            sl = slice(i, i + args.local_rollout_forward_batch_size)
            qr, am = query_response[sl], attention_mask[sl]
            logits, v = net(qr, am, logits_to_keep=R + 1)
            rl = response_logits(logits, R, args.temperature)
            logprobs.append(logprobs_from_logits(rl, responses[sl]))
            entropies.append(entropy_from_logits(rl))
            values.append(v[:, P - 1 : -1])
            with net.policy.disable_adapter():  # the reference policy is the SFT model itself
                ref_logprobs.append(response_logprobs(net.policy, qr, am, responses[sl], args.temperature))
        logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
        values, entropy = torch.cat(values), torch.cat(entropies)

        # Reward-model score of the decoded response (re-encoded by the reward model's own tokenizer).
        response_texts = tok.batch_decode(responses.masked_fill(responses == tok.eos_token_id, tok.pad_token_id),
                                          skip_special_tokens=True)
        raw_scores = self.reward_fn(prompts, response_texts).to(device).float()
        all_raw = self.accelerator.gather(raw_scores)
        scores = raw_scores
        if args.normalize_scores:
            process_scores(all_raw, running=self.score_moments)  # update stats identically on every rank
            scores = (raw_scores - self.score_moments.mean) / (self.score_moments.std + 1e-8)
        if args.score_clip is not None:
            scores = scores.clamp(-args.score_clip, args.score_clip)
        scores = torch.where(has_eos, scores, scores - args.missing_eos_penalty)

        kl = kl_estimate(logprobs, ref_logprobs, args.kl_estimator)  # [B, R]
        rewards = token_rewards(kl, scores, mask, self.kl_ctl.value)
        advantages, returns = compute_gae(rewards, values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)

        kl_seq = torch.where(mask, kl, 0.0).sum(1)  # [B] sequence KL (nats)
        non_score = (rewards.sum(1) - torch.where(mask.sum(1) > 0, scores, 0.0))
        g = self.accelerator.gather_for_metrics
        stats = {
            "objective/kl": g(kl_seq).mean().item(),
            "objective/entropy": g(torch.where(mask, entropy, 0.0).sum(1)).mean().item(),
            "objective/non_score_reward": g(non_score).mean().item(),
            "objective/rlhf_reward": g(scores + non_score).mean().item(),
            "objective/scores": all_raw.mean().item(),
            "objective/scores_std": all_raw.std().item() if all_raw.numel() > 1 else 0.0,
            "objective/kl_coef": self.kl_ctl.value,
            "val/eos_rate": g(has_eos.float()).mean().item(),
            "val/response_length": g(mask.sum(1).float()).mean().item(),
        }
        return Rollout(
            query_response=query_response, attention_mask=attention_mask, context_length=P, mask=mask,
            logprobs=logprobs, values=values, advantages=advantages, returns=returns, stats=stats,
            texts=[(p[-1]["content"], r, float(s)) for p, r, s in zip(prompts, response_texts, raw_scores.cpu())],
        )

    # ------------------------------------------------------------------ update
    def update(self, ro: Rollout) -> dict:
        """``num_ppo_epochs`` passes over ``num_mini_batches`` minibatches with gradient accumulation."""
        args, acc = self.args, self.accelerator
        self.model.train()
        B = ro.mask.shape[0]
        P, R = ro.context_length, ro.mask.shape[1]
        per_mb: list[dict] = []
        for _epoch in range(args.num_ppo_epochs):
            order = torch.randperm(B, device=ro.mask.device)
            for mb_start in range(0, B, args.local_mini_batch_size):
                mb_inds = order[mb_start : mb_start + args.local_mini_batch_size]
                mb_stats = []
                for micro_start in range(0, args.local_mini_batch_size, args.per_device_train_batch_size):
                    inds = mb_inds[micro_start : micro_start + args.per_device_train_batch_size]
                    with acc.accumulate(self.model):
                        logits, values = self.model(ro.query_response[inds], ro.attention_mask[inds], logits_to_keep=R + 1)
                        rl = response_logits(logits, R, args.temperature)
                        responses = ro.query_response[inds, P:]
                        new_logprobs = logprobs_from_logits(rl, responses)
                        mask = ro.mask[inds]
                        pg = policy_loss(new_logprobs, ro.logprobs[inds], ro.advantages[inds], mask, args.cliprange)
                        vf = value_loss(values[:, P - 1 : -1], ro.values[inds], ro.returns[inds], mask, args.cliprange_value)
                        loss = pg["loss"] + args.vf_coef * vf["loss"]
                        acc.backward(loss)
                        grad_norm = None
                        if acc.sync_gradients:
                            grad_norm = acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                            if self._finite(loss, grad_norm):
                                self.optimizer.step()
                            self.optimizer.zero_grad()
                    with torch.no_grad():
                        mb_stats.append({
                            "policy/approxkl": pg["approxkl"].item(), "policy/clipfrac": pg["clipfrac"].item(),
                            "loss/policy": pg["loss"].item(), "loss/value": vf["loss"].item(),
                            "val/clipfrac": vf["clipfrac"].item(), "val/ratio": pg["ratio_mean"].item(),
                            "policy/entropy": masked_mean(entropy_from_logits(rl.detach()), mask).item(),
                        })
                    if grad_norm is not None:
                        mb_stats[-1]["policy/grad_norm"] = float(grad_norm)
                per_mb.append({k: sum(s[k] for s in mb_stats if k in s) / max(1, sum(k in s for s in mb_stats))
                               for k in mb_stats[0] | mb_stats[-1]})
        self.scheduler.step()
        out = {f"{k}_avg" if k.startswith(("policy/approxkl", "policy/clipfrac", "loss/", "val/clipfrac")) else k:
               self._mean_across(sum(m[k] for m in per_mb if k in m) / sum(k in m for m in per_mb))
               for k in per_mb[0] | per_mb[-1]}
        ratios = torch.tensor([m["val/ratio"] for m in per_mb])
        out["val/ratio_var"] = ratios.var().item() if len(ratios) > 1 else 0.0
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["train/nonfinite_skipped"] = self.nonfinite_total
        out["minibatches"] = per_mb  # per-minibatch stats, in order (tests read the first one)
        return out

    def _finite(self, loss: Tensor, grad_norm) -> bool:
        """Count and skip a non-finite step; stop the run after too many in a row."""
        bad = torch.tensor(float(not (torch.isfinite(loss.detach()).all() and math.isfinite(float(grad_norm)))),
                           device=self.accelerator.device)
        # Every rank skips the same step. accelerate's reduce knows only mean/sum/max ("min" silently sums).
        ok = self.accelerator.reduce(bad, "max").item() == 0
        if ok:
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if self.nonfinite_in_a_row > self.args.max_nonfinite_steps:
            from pipeline.artifacts import PipelineError

            raise PipelineError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient; "
                "lower --learning_rate or --max_grad_norm, or check the reward model; no artifact was written"
            )
        return False

    def _mean_across(self, value: float) -> float:
        t = torch.tensor(value, device=self.accelerator.device, dtype=torch.float32)
        return self.accelerator.reduce(t, "mean").item()

    def kl_update(self, stats: dict, n_episodes: int) -> None:
        self.kl_ctl.update(stats["objective/kl"], n_episodes)

