"""End-to-end tests of the PPO stage (``pipeline/stage_ppo.py`` + ``pipeline/ppo/trainer.py``) on tiny
models built in the test: first-step invariants, masking and reward placement, what trains and what
stays frozen, learning on a rule reward, resume equivalence, a 2-process run, a reward model with
another tokenizer, and the clean-error paths."""

from __future__ import annotations

import json
import math
import os
import socket
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import fake_stage, make_causal_lm, make_seq_cls, make_tokenizer, prompt_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]

# Small, fast settings shared by every run; tests override what they exercise.
BASE = dict(
    num_iterations=2, rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2,
    local_rollout_forward_batch_size=4, response_length=6, save_every=100, sample_every=0,
    lora_r=4, lora_alpha=8, seed=0,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls are far slower with 2 spinning OpenMP threads on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(32))


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k}", str(v)]
    return out


def run_ppo(art: Path, prompts: Path, **kw) -> int:
    from pipeline.stage_ppo import cli

    return cli(["--artifact_dir", str(art), "--dataset_name", str(prompts)] + _flags({**BASE, **kw}))


def replace_reward(monkeypatch, reward_fn=None, wrap=None) -> None:
    """Make the stage use ``reward_fn(prompts, responses) -> Tensor[B]`` instead of the reward model
    (or ``wrap(real_reward_fn)``)."""
    import pipeline.stage_ppo as stage_ppo

    real_build = stage_ppo.build

    def build(*a, **k):
        out = list(real_build(*a, **k))
        out[2] = wrap(out[2]) if wrap is not None else reward_fn
        return tuple(out)

    monkeypatch.setattr(stage_ppo, "build", build)


def make_loop(art: Path, prompts: Path, reward_fn=None, **kw):
    """The objects ``main()`` builds, without the orchestration: (loop, build's reward_fn, prompts)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from pipeline.config import StageArguments
    from pipeline.ppo.core import FixedKLController, RunningMoments
    from pipeline.ppo.trainer import PPOLoop
    from pipeline.stage_ppo import PPOArguments, build, derive_sizes

    stage = StageArguments(artifact_dir=str(art), dataset_name=str(prompts))
    args = PPOArguments(**{**BASE, **kw})
    acc = Accelerator(cpu=True, mixed_precision=args.mixed_precision)
    derive_sizes(args, acc.num_processes)
    acc.gradient_accumulation_steps = args.gradient_accumulation_steps
    set_seed(args.seed)
    model, tok, rm_fn, _inputs, _paths = build(args, stage, acc)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-5)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=args.num_iterations)
    model, optimizer = acc.prepare(model, optimizer)
    loop = PPOLoop(args, acc, model, optimizer, scheduler, tok, reward_fn or rm_fn,
                   FixedKLController(args.kl_coef), RunningMoments())
    batch = [r["prompt"] for r in prompt_rows(args.rollout_batch_size)]
    return loop, rm_fn, batch


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_lines(err: str) -> list[str]:
    """The ``error: ...`` lines of a run's stderr; the message, if any, must be its last line (one line)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    if lines:
        assert err.rstrip().splitlines()[-1] == lines[-1], err[-2000:]
    return lines


# ----------------------------------------------------------------------------- 1. first step


def test_bf16_bases_train_fp32_adapters(tiny_artifacts, prompts_file, fresh_accelerate_state):
    """``--dtype bfloat16``: frozen bases in bf16, every trained weight in fp32 (the optimizer's
    master copy), forwards under autocast; policy and reference still agree exactly at the start."""
    loop, _, batch = make_loop(tiny_artifacts, prompts_file, dtype="bfloat16", mixed_precision="bf16",
                               rollout_batch_size=8, local_rollout_forward_batch_size=8, learning_rate=1e-2)
    net = loop.unwrapped
    trained = {n: p for n, p in net.named_parameters() if p.requires_grad}
    frozen = [p for p in net.parameters() if not p.requires_grad]
    assert trained and frozen
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert any(".score." in n for n in trained)  # the value head is trained, in fp32 too
    ro = loop.rollout(batch)
    assert ro.stats["objective/kl"] == 0.0
    before = {n: p.detach().clone() for n, p in trained.items()}
    upd = loop.update(ro)
    assert math.isfinite(upd["loss/policy_avg"]) and math.isfinite(upd["loss/value_avg"])
    moved = [n for n, p in trained.items() if not torch.equal(before[n], p.detach())]
    assert any("lora_B" in n and "policy" in n for n in moved) and any(".score." in n for n in moved)


@pytest.mark.parametrize("settings, message", [
    (dict(dtype="bfloat16"), "--dtype bfloat16 needs autocast in the same precision: add --mixed_precision bf16"),
    (dict(dtype="bfloat16", mixed_precision="fp16"), "--mixed_precision fp16 needs a CUDA GPU; on a CPU use --mixed_precision bf16"),
    (dict(dtype="bf16"), "--dtype 'bf16': use one of float32, bfloat16, float16"),
])
def test_precision_settings_are_checked(tiny_artifacts, prompts_file, capsys, settings, message):
    from pipeline.config import StageArguments
    from pipeline.stage_ppo import PPOArguments, main

    from pipeline.artifacts import PipelineError

    # Through main(), as a YAML recipe would set them (argparse `choices` never sees YAML values).
    with pytest.raises(PipelineError) as e:
        main(StageArguments(artifact_dir=str(tiny_artifacts), dataset_name=str(prompts_file)), PPOArguments(**{**BASE, **settings}))
    assert str(e.value) == message
    assert not (tiny_artifacts / "ppo").exists()


def test_precision_error_is_one_line(tiny_artifacts, prompts_file, capsys):
    assert run_ppo(tiny_artifacts, prompts_file, dtype="float16") == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --dtype float16 needs autocast in the same precision: add --mixed_precision fp16"]


def test_response_logits_with_logits_to_keep_match_full_logits(tiny_artifacts):
    """Computing logits only for the response positions selects exactly what slicing the full
    logits would, and position t predicts token t+1 (checked against generate's own scores)."""
    from transformers import AutoModelForCausalLM

    from pipeline.ppo.trainer import position_ids_from, response_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_artifacts / "sft" / "model").eval()
    prompt = torch.tensor([[0, 0, 5, 9, 14], [3, 7, 5, 9, 14]])  # left-padded (pad id 0)
    am = (prompt != 0).long()
    R = 4
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=am, max_new_tokens=R, min_new_tokens=R, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        qr = out.sequences
        full_am = torch.cat([am, torch.ones(2, R, dtype=torch.long)], 1)
        kw = dict(input_ids=qr, attention_mask=full_am, position_ids=position_ids_from(full_am), use_cache=False)
        full = response_logits(model(**kw).logits, R, 0.5)
        kept = response_logits(model(**kw, logits_to_keep=R + 1).logits, R, 0.5)
    assert full.shape == kept.shape == (2, R, model.config.vocab_size)
    torch.testing.assert_close(kept, full)
    scores = torch.stack(out.scores, 1)
    shown = torch.isfinite(scores)  # min_new_tokens sets EOS to -inf in generate's scores
    assert shown.float().mean() > 0.99
    torch.testing.assert_close((full * 0.5)[shown], scores[shown], atol=1e-4, rtol=1e-4)


def test_first_minibatch_ratio_one_and_zero_kl(tiny_artifacts, prompts_file):
    loop, _, batch = make_loop(tiny_artifacts, prompts_file, rollout_batch_size=8, num_mini_batches=2,
                               per_device_train_batch_size=2, local_rollout_forward_batch_size=4,
                               response_length=8, learning_rate=1e-2)
    ro = loop.rollout(batch)
    # LoRA B starts at zero: policy == reference, so the sequence KL is exactly 0, not merely small.
    assert ro.stats["objective/kl"] == 0.0
    assert ro.stats["objective/non_score_reward"] == 0.0
    upd = loop.update(ro)
    mbs = upd["minibatches"]
    assert len(mbs) == 2  # num_ppo_epochs * num_mini_batches, in order
    first = mbs[0]
    # Nothing has been stepped before the first minibatch (2 micro-batches, one optimizer step):
    # the update forward reproduces the rollout log-probs.
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert abs(first["policy/approxkl"]) < 1e-6
    assert first["policy/clipfrac"] == 0.0
    assert math.isfinite(first["policy/grad_norm"]) and first["policy/grad_norm"] > 0
    # ...and after the first optimizer step the policy differs from the behaviour policy.
    assert mbs[1]["policy/approxkl"] > first["policy/approxkl"]


# ----------------------------------------------------------------------------- 2. masks and reward placement


def test_response_mask_pad_inside_response_does_not_end_it():
    from pipeline.ppo.trainer import response_mask

    pad, eos = 0, 2
    responses = torch.tensor([
        [5, 0, 7, 2, 0, 0],  # pad id inside the response, then EOS: valid up to and including EOS
        [0, 0, 9, 9, 9, 9],  # starts with pad ids, no EOS: the whole row is valid (truncated)
        [2, 0, 0, 0, 0, 0],  # EOS first: only the EOS is valid
        [4, 4, 4, 4, 4, 2],  # EOS at the cap
        [4, 2, 4, 2, 0, 0],  # two EOS: the first one ends it
    ])
    mask, has_eos = response_mask(responses, eos)
    assert pad != eos
    expected = torch.tensor([
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0],
    ], dtype=torch.bool)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    assert has_eos.tolist() == [True, False, True, True, True]


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
    from pipeline.ppo.trainer import response_mask

    B, R = 16, 10
    gamma, penalty = 0.5, 0.5

    def index_scores(prompts, responses):  # a distinct score per row: 1, 2, ..., B
        return torch.arange(1, len(responses) + 1, dtype=torch.float32)

    loop, _, batch = make_loop(tiny_artifacts, prompts_file, reward_fn=index_scores, rollout_batch_size=B,
                               num_mini_batches=1, per_device_train_batch_size=B, local_rollout_forward_batch_size=4,
                               response_length=R, temperature=1.0, kl_coef=0.0, gamma=gamma, lam=1.0,
                               missing_eos_penalty=penalty)
    tok = loop.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    policy = loop.unwrapped.policy
    generate = policy.generate
    # The EOS boost goes before the rollout's own processors (the last of which draws the token).
    monkeypatch.setattr(policy, "generate", lambda **kw: generate(**{
        **kw, "logits_processor": LogitsProcessorList([_EosBoost(eos, 0.08), *kw.get("logits_processor", [])])}))

    ro = loop.rollout(batch)
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


# ----------------------------------------------------------------------------- 3. what trains


def _is_trained_name(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def test_adapters_train_and_base_weights_stay_frozen(tiny_artifacts, prompts_file):
    loop, rm_fn, batch = make_loop(tiny_artifacts, prompts_file, rollout_batch_size=4, num_mini_batches=2,
                                   per_device_train_batch_size=2, learning_rate=1e-2)
    net = loop.unwrapped
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
    ids = loop.tokenizer(["Tell me about rain, take 1."], return_tensors="pt")
    with torch.no_grad(), net.policy.disable_adapter():
        ref_before = net.policy(**ids).logits

    for _ in range(2):
        loop.update(loop.rollout(batch))

    after = dict(net.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trainable, (
        f"frozen but changed: {sorted(changed - trainable)}; trainable but unchanged: {sorted(trainable - changed)}")
    with torch.no_grad(), net.policy.disable_adapter():
        assert torch.equal(net.policy(**ids).logits, ref_before)
    assert torch.equal(rm_fn(probe_prompts, probe_responses), reward_before)
    with torch.no_grad():
        assert not torch.equal(net.policy(**ids).logits, ref_before)  # the adapted policy moved
    assert loop.rollout(batch).stats["objective/kl"] != 0.0  # ... so policy and reference now differ


# ----------------------------------------------------------------------------- 4. learning

LETTERS = set(string.ascii_lowercase)


def letter_share(prompts, responses):
    """Rule reward: share of lowercase ASCII letters in the decoded response."""
    return torch.tensor([sum(c in LETTERS for c in r) / max(1, len(r)) for r in responses])


def test_learns_rule_reward(tmp_path, tiny_tok, prompts_file, monkeypatch):
    art = tmp_path / "artifacts"
    # A larger init than the default 0.02 gives the tiny model logits big enough that a LoRA can move them.
    fake_stage(art, "sft", make_causal_lm, tiny_tok, initializer_range=0.3)
    fake_stage(art, "reward", make_seq_cls, tiny_tok)
    replace_reward(monkeypatch, letter_share)
    rc = run_ppo(art, prompts_file, num_iterations=30, rollout_batch_size=8, num_mini_batches=1,
                 per_device_train_batch_size=8, local_rollout_forward_batch_size=8, response_length=8,
                 learning_rate=3e-2, lr_scheduler_type="constant", temperature=1.0, num_ppo_epochs=2,
                 lora_r=8, lora_alpha=16, kl_coef=0.01, missing_eos_penalty=0.0, seed=3)
    assert rc == 0
    scores = [row["objective/scores"] for row in read_metrics(art / "ppo" / "metrics.jsonl")]
    assert len(scores) == 30
    first5, last5 = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last5 > first5 + 0.25, f"mean reward did not rise: {[round(s, 2) for s in scores]}"


# ----------------------------------------------------------------------------- 5. resume


def _same(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("nan_first_iteration", [False, True], ids=["clean", "skipped-step-before-checkpoint"])
def test_resume_matches_uninterrupted_run(tmp_path, tiny_tok, prompts_file, monkeypatch, nan_first_iteration):
    from safetensors.torch import load_file

    settings = dict(num_iterations=4, save_every=2, learning_rate=1e-2)
    if nan_first_iteration:
        # NaN scores for the batch holding the first prompt of iteration 1 (the stage's epoch-0 shuffle), so
        # steps are skipped before the checkpoint and the skip counter must survive the resume.
        first = torch.randperm(32, generator=torch.Generator().manual_seed(BASE["seed"])).tolist()[0]
        marker = f"take {first}."

        def wrap(real):
            def reward_fn(prompts, responses):
                scores = real(prompts, responses)
                return scores * float("nan") if any(p[-1]["content"].endswith(marker) for p in prompts) else scores
            return reward_fn

        replace_reward(monkeypatch, wrap=wrap)
    arts = {}
    for name in ("full", "resumed"):
        arts[name] = tmp_path / name
        fake_stage(arts[name], "sft", make_causal_lm, tiny_tok)
        fake_stage(arts[name], "reward", make_seq_cls, tiny_tok)

    assert run_ppo(arts["full"], prompts_file, **settings) == 0

    art = arts["resumed"]
    assert run_ppo(art, prompts_file, **settings, stop_after_iterations=2) == 0
    assert not (art / "ppo").exists()
    assert (art / "ppo-run" / "checkpoints" / "iter-000002" / "checkpoint.json").exists()
    assert len(read_metrics(art / "ppo-run" / "metrics.jsonl")) == 2
    assert run_ppo(art, prompts_file, **settings, resume_from_checkpoint="latest") == 0
    assert (art / "ppo" / "manifest.json").exists() and not (art / "ppo-run").exists()

    full = read_metrics(arts["full"] / "ppo" / "metrics.jsonl")
    resumed = read_metrics(art / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4] == [r["iteration"] for r in full]
    for a, b in zip(full, resumed):
        keys = {k for k, v in a.items() if isinstance(v, (int, float)) and not k.startswith("time/")}
        assert keys == {k for k, v in b.items() if isinstance(v, (int, float)) and not k.startswith("time/")}
        for k in sorted(keys):
            assert _same(a[k], b[k]), (a["iteration"], k, a[k], b[k])
    skipped = [r["train/nonfinite_skipped"] for r in full]
    assert skipped == ([2, 2, 2, 2] if nan_first_iteration else [0, 0, 0, 0])  # 2 minibatch steps per iteration

    wa = load_file(str(arts["full"] / "ppo" / "policy_adapter" / "adapter_model.safetensors"))
    wb = load_file(str(art / "ppo" / "policy_adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert any(torch.count_nonzero(v) for k, v in wa.items() if "lora_B" in k)


# ----------------------------------------------------------------------------- 6. two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: str, *script_args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 CPU processes (``--cpu --num_processes 2`` would silently run one)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", script, *script_args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("precision", [{}, {"dtype": "bfloat16", "mixed_precision": "bf16"}], ids=["fp32", "bf16"])
def test_two_process_run(tiny_artifacts, prompts_file, precision):
    n_iter, rbs = 2, 4
    proc = launch_two_processes(
        "pipeline/stage_ppo.py", "--artifact_dir", str(tiny_artifacts), "--dataset_name", str(prompts_file),
        *_flags({**BASE, "num_iterations": n_iter, "rollout_batch_size": rbs, "save_every": 1, **precision}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tiny_artifacts / "ppo"
    assert (out / "manifest.json").exists()
    for it in range(1, n_iter + 1):
        ck = out / "checkpoints" / f"iter-{it:06d}"
        assert json.loads((ck / "state.json").read_text())["world_size"] == 2
        assert (ck / "rng-0.safetensors").exists() and (ck / "rng-1.safetensors").exists()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["episode"] for r in rows] == [2 * rbs * i for i in range(1, n_iter + 1)]
    assert json.loads((out / "manifest.json").read_text())["config"]["ppo"]["world_size"] == 2


@pytest.mark.slow
def test_nonfinite_skip_agrees_across_ranks(tmp_path):
    """A non-finite loss on one rank makes every rank skip the step and count it."""
    proc = launch_two_processes(str(Path(__file__).with_name("ppo_finite_ranks_script.py")), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["decisions"] == [False, False, False, True] and r["total"] == 3 and r["in_a_row"] == 0, r


# ----------------------------------------------------------------------------- 7. other reward tokenizer

OTHER_CORPUS = [
    "Reward models score answers; a higher score means a better answer.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
    "ZEBRAS, QUOKKAS & YAKS: an inventory of 42 unusual animals.",
]


def test_reward_model_with_other_tokenizer(tiny_artifacts, tiny_tok, prompts_file, tmp_path):
    rtok = make_tokenizer(tmp_path / "rtok", vocab_size=280, seed_text=OTHER_CORPUS)
    assert rtok.get_vocab() != tiny_tok.get_vocab()
    rm_path = tmp_path / "other_rm"
    make_seq_cls(rm_path, rtok, seed=5)
    assert run_ppo(tiny_artifacts, prompts_file, reward_model_path=str(rm_path)) == 0
    manifest = json.loads((tiny_artifacts / "ppo" / "manifest.json").read_text())
    models = manifest["metrics"]["models"]
    assert models["same_tokenizer"] is False
    assert models["reward_path"] == str(rm_path)
    assert models["value_path"] == models["policy_path"] == str(tiny_artifacts / "sft" / "model")
    rows = read_metrics(tiny_artifacts / "ppo" / "metrics.jsonl")
    assert rows and all(math.isfinite(r["objective/scores"]) and math.isfinite(r["loss/value_avg"]) for r in rows)
    assert len({r["objective/scores"] for r in rows}) > 1 or rows[0]["objective/scores_std"] > 0


# ----------------------------------------------------------------------------- 8. clean errors


@pytest.mark.parametrize("missing, command", [("sft", "rlhf sft"), ("reward", "rlhf rm")])
def test_missing_input_stage_is_a_clean_error(tmp_path, tiny_tok, prompts_file, capsys, missing, command):
    art = tmp_path / "artifacts"
    present = {"sft": ("reward", make_seq_cls), "reward": ("sft", make_causal_lm)}[missing]
    fake_stage(art, present[0], present[1], tiny_tok)
    assert run_ppo(art, prompts_file) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1, errs
    assert str(art / missing) in errs[0] and command in errs[0] and "first" in errs[0]
    assert not (art / "ppo").exists() and not (art / "ppo-run").exists()


def test_non_divisible_batch_is_a_clean_error(tiny_artifacts, prompts_file, capsys):
    assert run_ppo(tiny_artifacts, prompts_file, rollout_batch_size=6, num_mini_batches=4) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "is not divisible" in errs[0], errs
    assert not (tiny_artifacts / "ppo").exists()


# ----------------------------------------------------------------------------- 9. non-finite guard


def test_nonfinite_loss_stops_run_without_artifact(tiny_artifacts, prompts_file, monkeypatch, capsys):
    replace_reward(monkeypatch, lambda prompts, responses: torch.full((len(responses),), float("nan")))
    max_bad = 2
    rc = run_ppo(tiny_artifacts, prompts_file, num_iterations=6, num_mini_batches=1, per_device_train_batch_size=4,
                 max_nonfinite_steps=max_bad)
    assert rc == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "non-finite" in errs[0], errs
    assert f"{max_bad + 1} optimizer steps in a row" in errs[0]
    assert not (tiny_artifacts / "ppo").exists()
    # One optimizer step per iteration: iterations 1..max_bad were skipped and logged, the next one stopped the run.
    rows = read_metrics(tiny_artifacts / "ppo-run" / "metrics.jsonl")
    assert [r["train/nonfinite_skipped"] for r in rows] == list(range(1, max_bad + 1))
