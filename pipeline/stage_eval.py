"""Stage 4: side-by-side evaluation of base, SFT and PPO checkpoints on held-out prompts.

For every checkpoint: generate (sampled with a fixed seed, and greedy), then measure the
reward-model score, the independent gold judge's score (embedded task), the sequence KL to
the SFT model (nats, Monte-Carlo over the sampled responses), response length, EOS rate and
distinct-2; pairwise PPO vs SFT win rates with bootstrap 95% intervals. Intermediate PPO
checkpoints give the reward/gold-vs-KL curves that show over-optimisation.

    rlhf eval --artifact_dir artifacts
    rlhf eval --dataset_name my_prompts.jsonl --max_eval_samples 500 --no_greedy

Writes ``<artifact_dir>/eval/``: ``report.json``, ``report.md``, ``report.html``, ``results.json``
(every response and score), ``manifest.json``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import artifacts as art
from pipeline.allocator import restart_with_tuned_malloc
from pipeline.config import StageArguments, exit_process, run_cli
from pipeline.errors import PipelineError
from pipeline.modeling import inference_model, warn_if_emulated_bf16

CHECKPOINT_KINDS = ("base", "sft", "ppo")


@dataclass
class EvalArguments:
    """What to compare and how to decode. Data and artifact paths are the shared ``StageArguments``
    (``--dataset_name``, ``--dataset_test_split``, ``--max_eval_samples``, ``--artifact_dir``, ``--force``)."""

    checkpoints: list[str] = field(
        default_factory=lambda: list(CHECKPOINT_KINDS), metadata={"help": "Which of base, sft, ppo to compare."}
    )
    include_intermediate: bool = field(
        default=True,
        metadata={"help": "Also evaluate intermediate PPO checkpoints (sampled decoding) for the curves."},
    )
    greedy: bool = field(default=True, metadata={"help": "Also generate greedily for base, sft and ppo."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (the PPO default)."})
    response_length: int = field(default=64, metadata={"help": "Maximum new tokens."})
    batch_size: int = field(default=16, metadata={"help": "Scoring batch size, and generation's by default."})
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts sampled at once (default: --batch_size). Finished responses leave the batch, so a "
            "larger one is faster on CPUs (docs/benchmarks.md); the scoring still goes by --batch_size."
        },
    )
    seed: int = field(default=1234, metadata={"help": "Sampling seed (the same for every checkpoint)."})
    heldout_phrasing: bool = field(
        default=True,
        metadata={
            "help": "Embedded task: also sample every policy but the base model on the same prompts with their "
            "constraints in words no training prompt uses (eval_prompts_rephrased.jsonl), scored by the gold judge."
        },
    )
    kl_budget: float = field(
        default=4.0,
        metadata={
            "help": "The recommended checkpoint: the highest reward-model score on the held-out prompts among SFT "
            "and the PPO checkpoints whose KL to SFT is at most this (nats); the gold judge is not consulted."
        },
    )
    publish_recommended: bool = field(
        default=False,
        metadata={
            "help": "Also publish the recommended PPO checkpoint's adapter as <artifact_dir>/eval/policy_adapter."
        },
    )
    bf16: bool = field(
        default=False,
        metadata={
            "help": "Load every model in bfloat16 (faster sampling and scoring on CPUs with AVX512-BF16 and on "
            "GPUs). Scores and the KL to SFT are then those of the bf16 models."
        },
    )


def decode_responses(tok, resp):
    """``(texts, resp, mask, has_eos)`` of generated responses ``[B, T]``: the texts as they are judged (cut at
    the EOS, which is left out), the responses with pad after their EOS, the response mask (EOS included) and
    whether each row drew its EOS."""
    from pipeline.sequences import response_mask

    mask, has_eos = response_mask(resp, tok.eos_token_id)
    resp = resp.masked_fill(~mask, tok.pad_token_id)
    texts = tok.batch_decode(resp.masked_fill(resp == tok.eos_token_id, tok.pad_token_id), skip_special_tokens=True)
    return texts, resp, mask, has_eos


def generate(model, tok, prompts, args: EvalArguments, do_sample: bool, desc: str):
    """Batched generation -> (response texts, lengths, has_eos, batches, own log-probs).

    ``batches`` holds (prompt ids, prompt mask, response ids, response mask) per batch, for scoring the
    samples under another model. Sampled responses also come with their summed log-prob under the
    sampling distribution (temperature-scaled), recorded while drawing, so the KL to SFT needs no second
    forward pass of the sampled model; greedy ones with None.
    """
    import torch
    from tqdm.auto import tqdm

    from pipeline import decoding
    from pipeline.sampling import GREEDY, InverseCDFSampler, sampling_kwargs

    texts, lengths, eos, batches, own = [], [], [], [], []
    device = next(model.parameters()).device
    sampler = InverseCDFSampler(record_logprobs=True) if do_sample else None
    if do_sample:
        torch.manual_seed(args.seed)
    step = args.generation_batch_size or args.batch_size
    for i in tqdm(range(0, len(prompts), step), desc=desc, leave=False):
        chunk = prompts[i : i + step]
        rendered = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in chunk]
        enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left").to(
            device
        )
        mode = sampling_kwargs(args.temperature, sampler=sampler) if do_sample else GREEDY
        kw = dict(**enc, **mode, max_new_tokens=args.response_length, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)  # fmt: skip
        with torch.no_grad():  # finished rows leave the batch (pipeline/decoding.py) where that loop applies
            out = decoding.generate(model, **kw) if decoding.can_compact(model) is None else model.generate(**kw)
        chunk_texts, resp, mask, has_eos = decode_responses(tok, out[:, enc["input_ids"].shape[1] :])
        if do_sample:
            own += torch.where(mask, sampler.take_logprobs().to(mask.device), 0.0).sum(1).tolist()
        texts += chunk_texts
        lengths += mask.sum(1).tolist()
        eos += has_eos.tolist()
        for j in range(0, len(chunk), args.batch_size):  # scoring batches, without the left padding all rows share
            ids, am = enc["input_ids"][j : j + args.batch_size], enc["attention_mask"][j : j + args.batch_size]
            lead = int(am.shape[1] - am.sum(1).max())
            batches.append((ids[:, lead:], am[:, lead:], resp[j : j + args.batch_size], mask[j : j + args.batch_size]))
    return texts, lengths, eos, batches, (own if do_sample else None)


def sequence_logprobs(model, batches, temperature: float):
    """Summed log-prob of each sampled response under ``model`` (temperature-scaled, as sampled). The shared
    prompt prefix runs once and the rows in length-sorted chunks (``decoding.scoring_forward``)."""
    import torch

    from pipeline.decoding import causal_lm_run, scoring_forward
    from pipeline.ppo.core import token_logprobs

    run, out = causal_lm_run(model), []
    with torch.no_grad():
        for ids, am, resp, mask in batches:
            R = resp.shape[1]
            qr, qm = torch.cat([ids, resp], 1), torch.cat([am, mask.long()], 1)
            logits = scoring_forward(run, model, qr, qm, ids.shape[1], R + 1)
            lp = token_logprobs(logits, resp, temperature, entropy=False)[0]
            out += torch.where(mask, lp, 0.0).sum(1).tolist()
    return out


def load_merged_policy(sft_path: str, adapter: Path, dtype):
    """The SFT model with a PPO adapter merged in float32, then copied into a fresh SFT model of
    ``dtype``: as fast to sample from as the SFT model (a merged PeftModel, even cast, sampled
    markedly slower) and without losing the adapter's small updates to bf16 rounding first."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(sft_path, dtype=torch.float32)
    weights = PeftModel.from_pretrained(full, str(adapter)).merge_and_unload().state_dict()
    model = AutoModelForCausalLM.from_pretrained(sft_path, dtype=dtype).eval()
    model.load_state_dict(weights)
    return inference_model(model)


def plan_checkpoints(args: EvalArguments, layout) -> list[tuple[str, str, int | None, Path | None]]:
    """The policies to evaluate, in order: ``(name, kind, PPO iteration, adapter path)``."""
    plan = []
    if "base" in args.checkpoints:
        plan.append(("base", "base", None, None))
    if "sft" in args.checkpoints:
        plan.append(("sft", "sft", None, None))
    if "ppo" in args.checkpoints:
        from pipeline.ppo.checkpoint import list_checkpoints

        final_iter = art.read_manifest(layout.stage("ppo"))["metrics"]["iterations"]
        for c in list_checkpoints(layout.ppo_checkpoints) if args.include_intermediate else []:
            it = int(c.name.split("-")[1])
            if it < final_iter:
                plan.append((f"ppo-{c.name}", "ppo_checkpoint", it, c / art.POLICY_ADAPTER))
        plan.append(("ppo", "ppo", final_iter, layout.stage("ppo") / art.POLICY_ADAPTER))
    return plan


def load_base_model(sft_manifest: dict, vocab_size: int, dtype):
    """The model the SFT stage started from (its manifest names it), with room for the SFT tokenizer."""
    from transformers import AutoModelForCausalLM

    from pipeline.embedded import resolve_model_path

    rec = sft_manifest["inputs"]["base_model"]
    path = resolve_model_path(None if rec.get("name") == "embedded" else rec.get("name", rec["path"]))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    return inference_model(model)


def evaluate_policy(model, sft, tok, prompts, args: EvalArguments, score, name: str, greedy: bool) -> dict:
    """``{"sampled": ..., "greedy": ... or None}``: responses, lengths, EOS, ``score(texts)``'s reward and
    gold columns, and (sampled) the per-response KL to the SFT model."""
    entry = {"greedy": None}
    modes = [("sampled", True)] + ([("greedy", False)] if args.greedy and greedy else [])
    for mode, do_sample in modes:
        texts, lengths, eos, batches, own = generate(model, tok, prompts, args, do_sample, f"{name} ({mode})")
        part = {"responses": texts, "length": lengths, "eos": eos, **score(texts)}
        if do_sample:
            if model is sft:
                part["kl_to_sft"] = [0.0] * len(texts)
            else:
                ref = sequence_logprobs(sft, batches, args.temperature)
                part["kl_to_sft"] = [a - b for a, b in zip(own, ref)]
        entry[mode] = part
    return entry


def finished_checkpoints(run_dir: Path, fingerprint: str, force: bool) -> dict[str, dict]:
    """Results of the policies an interrupted evaluation with this fingerprint finished (``<name>.json`` in
    ``run_dir``); another run's results are refused unless ``force``, which starts ``run_dir`` afresh."""
    import json

    done = {p.stem: json.loads(p.read_text()) for p in sorted(run_dir.glob("*.json"))}
    recorded = art.run_fingerprint(run_dir) if done else None
    return done if art.continue_run(run_dir, fingerprint, recorded, force, "evaluation") else {}


def main(stage: StageArguments, args: EvalArguments) -> dict | None:
    import json
    import os
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.data import load_for, prompt_text, source_record
    from pipeline.eval_report import aggregate, summary_table, write_reports
    from pipeline.modeling import load_tokenizer
    from reward_models.learned import load_reward_tokenizer, reward_scores

    unknown = sorted(set(args.checkpoints) - set(CHECKPOINT_KINDS))
    if unknown or not args.checkpoints:
        raise PipelineError(
            f"--checkpoints {' '.join(args.checkpoints)}: name one or more of {', '.join(CHECKPOINT_KINDS)}"
        )
    layout = art.Layout(stage.artifact_dir)
    sft_manifest = art.require_stage(stage.artifact_dir, "sft", "eval")
    art.require_stage(stage.artifact_dir, "reward", "eval")
    want_ppo = "ppo" in args.checkpoints
    if want_ppo:
        ppo_manifest = art.require_stage(stage.artifact_dir, "ppo", "eval")
        trained_on = ppo_manifest.get("inputs", {}).get("policy", {})
        if trained_on.get("sha256") not in (None, art.artifact_hash(layout.stage("sft"))):
            raise PipelineError(
                f"{layout.stage('ppo')} was trained on another SFT model than {layout.stage('sft')} holds now; "
                "rerun PPO (`accelerate launch pipeline/stage_ppo.py --force`) or evaluate without --checkpoints ppo"
            )
    split = stage.dataset_test_split
    rows = load_for("prompt", stage.dataset_name, split, stage.dataset_config, stage.max_eval_samples)
    prompts = [r["prompt"] for r in rows]
    has_gold = stage.dataset_name is None
    judge, rephrased = None, None
    if has_gold:
        from reward_models.gold_judge import score as judge

        if args.heldout_phrasing:
            rephrased = load_for("prompt", None, f"{split}_rephrased", None, stage.max_eval_samples)
            rephrased = [r["prompt"] for r in rephrased]
    if args.kl_budget < 0:
        raise PipelineError(f"--kl_budget {args.kl_budget}: use a value >= 0 (nats)")
    for flag in ("batch_size", "generation_batch_size", "response_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise PipelineError(f"--{flag} {getattr(args, flag)}: use a whole number >= 1")

    inputs = {s: art.input_record(layout.stage(s)) for s in ("sft", "reward") + (("ppo",) if want_ppo else ())}
    inputs["dataset"] = source_record("prompt", stage.dataset_name, split)
    if rephrased is not None:
        inputs["dataset_rephrased"] = source_record("prompt", None, f"{split}_rephrased")
    config = art.resolved_config(stage=stage, eval=args)
    fingerprint = art.fingerprint(config, inputs)
    if art.skip_if_complete(stage.artifact_dir, "eval", fingerprint, stage.force):
        return None
    warn_if_emulated_bf16("eval", args.bf16)
    run_dir = layout.run_dir("eval")
    finished = finished_checkpoints(run_dir, fingerprint, stage.force)

    torch.manual_seed(args.seed)
    sft_path = str(layout.model("sft"))
    tok = load_tokenizer(sft_path, padding_side="left")
    rm_path = layout.model("reward")
    rm_tok = load_reward_tokenizer(rm_path, tok)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # one device; models follow it
    rm = inference_model(
        AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1, dtype=dtype).to(device)
    )
    sft = inference_model(AutoModelForCausalLM.from_pretrained(sft_path, dtype=dtype).to(device))

    def score(texts: list[str]) -> dict:
        return {
            "reward": reward_scores(rm, rm_tok, prompts, texts, args.batch_size).tolist(),
            "gold": [judge(p, r) for p, r in zip(prompts, texts)] if judge else None,
        }

    results = {"config": config, "prompts": [prompt_text(p) for p in prompts], "has_gold": has_gold, "checkpoints": {}}
    for name, kind, iteration, adapter in plan_checkpoints(args, layout):
        if name in finished:  # evaluated before an interruption: every policy samples with its own seed
            results["checkpoints"][name] = entry = finished[name]
            print(f"eval: {name:<22} kept from the interrupted run", flush=True)
            continue
        if kind == "base":
            model = load_base_model(sft_manifest, len(tok), dtype).to(device)
        elif kind == "sft":
            model = sft
        else:
            model = load_merged_policy(sft_path, adapter, dtype).to(device)
        entry = {"kind": kind, "iteration": iteration, "path": str(adapter or (sft_path if kind == "sft" else "base"))}
        entry.update(evaluate_policy(model, sft, tok, prompts, args, score, name, greedy=kind != "ppo_checkpoint"))
        if rephrased is not None and kind != "base":  # the same sampling seed, prompts in other words
            texts = generate(model, tok, rephrased, args, True, f"{name} (held-out phrasing)")[0]
            entry["rephrased"] = {"responses": texts, "gold": [judge(p, r) for p, r in zip(rephrased, texts)]}
        results["checkpoints"][name] = entry
        tmp = run_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, run_dir / f"{name}.json")
        msg = f"eval: {name:<22} reward {sum(entry['sampled']['reward']) / len(prompts):+.3f}"
        if judge:
            msg += f"  gold {sum(entry['sampled']['gold']) / len(prompts):.3f}"
        if "rephrased" in entry:
            msg += f"  gold (held-out phrasing) {sum(entry['rephrased']['gold']) / len(rephrased):.3f}"
        print(msg + f"  kl {sum(entry['sampled']['kl_to_sft']) / len(prompts):.2f}", flush=True)
        if model is not sft:
            del model

    report = aggregate(results, kl_budget=args.kl_budget)
    pick = report["recommended"]
    with art.stage_output(stage.artifact_dir, "eval", config, inputs) as out:
        (out.path / "results.json").write_text(json.dumps(results))
        write_reports(report, results, out.path)
        adapter = results["checkpoints"].get(pick.get("name") or "", {}).get("path")
        if args.publish_recommended and pick.get("kind") in ("ppo", "ppo_checkpoint"):
            art.link_tree(Path(adapter), out.path / art.POLICY_ADAPTER)
            pick = {**pick, "published": art.POLICY_ADAPTER}
        out.write_manifest({**{k: report[k] for k in ("checkpoints", "pairwise")}, "recommended": pick}, tok)
    shutil.rmtree(run_dir, ignore_errors=True)
    final = layout.stage("eval")
    print(summary_table(report))
    print(f"eval: report at {final / 'report.html'} (also report.md, report.json)")
    return report


def make_parser():
    from trl import TrlParser

    return TrlParser((StageArguments, EvalArguments), prog="rlhf eval")


def cli(argv: list[str] | None = None) -> int:
    return run_cli(make_parser, main, argv)


if __name__ == "__main__":
    restart_with_tuned_malloc()
    exit_process(cli())
