#!/usr/bin/env python
"""Generate the embedded default task's data sets under ``data/embedded/``.

Steps:
  1. base answers: sample the embedded model (SmolLM2-135M-Instruct) on bare training
     questions (no constraint) and cache the raw samples in ``base_answers.jsonl``; a
     re-run reuses that file unless ``--resample`` is given (so it is fast and deterministic);
  2. clean them: keep the first paragraph, cut to complete sentences, keep the ones of
     8..60 words that pass the gold judge's quality gates;
  3. build prompts (question + 1-2 constraint sentences) and, with ``comply`` rewrites of the
     base answers, the SFT set, the preference pairs (train / held-out test split by base
     answer) and the PPO / evaluation prompt sets; every SFT completion and chosen answer is
     verified to score 1.0 and every pair to have judge(chosen) > judge(rejected).

Run from anywhere: ``python scripts/make_embedded_data.py [--resample]``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reward_models import constraints as C  # noqa: E402
from reward_models.gold_judge import judge, parse_prompt, prompt_text, split_sentences, word_count  # noqa: E402
from reward_models.topics import EVAL_TOPICS, QUESTION_TEMPLATES, TRAIN_TOPICS, make_question  # noqa: E402

OUT_DIR = REPO / "data" / "embedded"
BASE_FILE = "base_answers.jsonl"
POLICY_FILE = "policy_samples.jsonl"
SEED = 1234


# --------------------------------------------------------------------------- sampling
def pick_sampling_questions(n: int, seed: int) -> list[dict]:
    """``n`` distinct (topic, template) training questions, spread evenly over topics."""
    rng = random.Random(seed)
    per_topic = {t: rng.sample(QUESTION_TEMPLATES, len(QUESTION_TEMPLATES)) for t in TRAIN_TOPICS}
    order = list(TRAIN_TOPICS)
    out: list[dict] = []
    k = 0
    while len(out) < n:
        rng.shuffle(order)
        for topic in order:
            if len(out) >= n:
                break
            template = per_topic[topic][k % len(QUESTION_TEMPLATES)]
            out.append({"topic": topic, "template": template, "question": make_question(template, topic)})
        k += 1
    return out


def sample_base_answers(
    path: Path, n: int, batch_size: int, max_new_tokens: int, temperature: float, seed: int
) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.embedded import ensure_embedded_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_path = ensure_embedded_model()
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.eval()
    questions = pick_sampling_questions(n, seed)
    torch.manual_seed(seed)
    rows: list[dict] = []
    t0 = time.time()
    n_tokens = 0
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": q["question"]}], tokenize=False, add_generation_prompt=True
            )
            for q in batch
        ]
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        gen = out[:, enc["input_ids"].shape[1] :]
        n_tokens += int((gen != tok.pad_token_id).sum())
        for q, g in zip(batch, gen):
            finished = bool((g == tok.eos_token_id).any())
            text = tok.decode(g, skip_special_tokens=True)
            rows.append({**q, "raw": text, "finished": finished})
        dt = time.time() - t0
        print(f"  sampled {len(rows)}/{len(questions)}  {n_tokens / dt:.0f} tok/s  {dt:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": i, **r}, ensure_ascii=False) + "\n")
    return rows


def policy_name(policy: str) -> str:
    """A model directory as its last two path parts (``.../artifacts/sft/model`` -> ``sft/model``)."""
    return "/".join(Path(policy).resolve().parts[-2:])


def sample_policy_answers(
    path: Path,
    policy: str,
    prompts: list[dict],
    n_per_prompt: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[dict]:
    """``n_per_prompt`` sampled responses of ``policy`` (a model directory, e.g. ``artifacts/sft/model``) to each
    prompt, through its chat template, cached in ``path`` with the policy and settings they came from."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.modeling import load_tokenizer
    from pipeline.sampling import sampling_kwargs

    tok = load_tokenizer(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.bfloat16).eval()
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(n_per_prompt)]
    torch.manual_seed(seed)
    rows: list[dict] = []
    t0 = time.time()
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        texts = [tok.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True) for _, p in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
        with torch.no_grad():
            out = model.generate(
                **enc,
                **sampling_kwargs(temperature),
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        for (i, p), g in zip(batch, out[:, enc["input_ids"].shape[1] :]):
            ids = g.tolist()
            finished = tok.eos_token_id in ids
            if finished:
                ids = ids[: ids.index(tok.eos_token_id)]
            rows.append(
                {
                    "prompt_id": i,
                    "prompt": p["prompt"],
                    "response": tok.decode(ids, skip_special_tokens=True),
                    "finished": finished,
                }
            )
        print(f"  sampled {len(rows)}/{len(jobs)}  {time.time() - t0:.0f}s", flush=True)
    # The policy as "<stage>/<folder>" (e.g. "sft/model"): no path of the machine that sampled goes into the repo.
    meta = {"policy": policy_name(policy), "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}, ensure_ascii=False) + "\n")
    return rows


def load_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def rephrased_row(row: dict) -> dict:
    """An evaluation row with its constraint sentences in their held-out phrasings."""
    prompt = [{**m, "content": C.rephrase(m["content"])} if m["role"] == "user" else m for m in row["prompt"]]
    return {**row, "prompt": prompt}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- base answers
BAD_MARKERS = (
    "**",
    "##",
    "`",
    "SmolLM",
    "Hugging Face",
    "AI assistant",
    "As an AI",
    "I'm sorry",
    "I am sorry",
    "http",
    "@",
    "|",
)
MIN_WORDS, MAX_WORDS = 8, 60
WORK_MAX_WORDS = 45  # base answers are cut to this many words of whole sentences before use
MAX_COMPLETION_TOKENS = 60  # a 64-token response cap must fit every completion / chosen answer


def cut_to_sentences(text: str, max_words: int | None = None) -> str:
    kept: list[str] = []
    total = 0
    for s in split_sentences(text):
        if not C.ends_with_terminal(s):
            break
        w = word_count(s)
        if max_words is not None and total + w > max_words:
            break
        kept.append(s)
        total += w
    return " ".join(kept)


def clean_answer(row: dict) -> str | None:
    """The first paragraph cut to whole sentences, or None when unusable."""
    raw = row["raw"].strip()
    if not raw or any(b in raw for b in BAD_MARKERS):
        return None
    para = raw.split("\n")[0].strip()
    if re.match(r"^(?:[-*\u2022]|\d+[.)])\s", para):
        return None
    text = cut_to_sentences(para)
    if not (MIN_WORDS <= word_count(text) <= MAX_WORDS):
        return None
    if not all(ch.isascii() or ch in "\u2019\u2014\u2013" for ch in text):
        return None
    r = judge(row["question"], text)
    if r.score < 1.0:
        return None
    work = cut_to_sentences(text, WORK_MAX_WORDS)
    if word_count(work) < MIN_WORDS or judge(row["question"], work).score < 1.0:
        return None
    return work


# --------------------------------------------------------------------------- constraint combos
class ComboSampler:
    """Samples 1-2 compatible constraints, keeping the families about evenly used."""

    def __init__(self, rng: random.Random, p_two: float = 0.6):
        self.rng = rng
        self.p_two = p_two
        self.counts: Counter = Counter({n: 0 for n in C.FAMILY_NAMES})

    def _least_used(self, names: list[str]) -> str:
        low = min(self.counts[n] for n in names)
        return self.rng.choice([n for n in names if self.counts[n] <= low + 1])

    def sample(self, text: str | None = None) -> list[tuple[str, dict]]:
        first = self._least_used(C.FAMILY_NAMES)
        names = [first]
        if self.rng.random() < self.p_two:
            names.append(self._least_used([n for n in C.FAMILY_NAMES if C.compatible(first, n)]))
        self.rng.shuffle(names)
        return [(n, C.BY_NAME[n].sample_params(self.rng, text)) for n in names]

    def commit(self, combo: list[tuple[str, dict]]) -> None:
        for n, _ in combo:
            self.counts[n] += 1


def build_prompt(question: str, combo: list[tuple[str, dict]]) -> str:
    return " ".join([question] + [C.BY_NAME[n].instruction(p) for n, p in combo])


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


# --------------------------------------------------------------------------- rejected answers
def violate_variant(name: str, params: dict, text: str, rng: random.Random):
    """How to break constraint ``name``: (replacement params or None to omit it, post-transform)."""
    if name == "word_limit":
        return {"n": params["n"] + rng.randint(8, 20)}, None
    if name == "end_phrase":
        if rng.random() < 0.6:
            return {"phrase": rng.choice([p for p in C.END_PHRASES if p != params["phrase"]])}, None
        return None, None
    if name == "keyword":
        if rng.random() < 0.7:
            options = [k for k in C.KEYWORDS if k != params["word"] and not C._has_word(text, k)]
            if options:
                return {"word": rng.choice(options)}, None
        return None, None
    if name == "starts_with":
        if rng.random() < 0.7:
            return {"word": rng.choice([w for w in C.START_WORDS if w != params["word"]])}, None
        return None, None
    if name == "bullets":
        if rng.random() < 0.5:
            n = params["n"] + rng.choice([-1, 1]) if params["n"] > 2 else params["n"] + 1
            return {"n": n}, None
        return None, None
    if name == "n_sentences":
        n = params["n"] + rng.choice([-1, 1])
        return {"n": max(1, n)}, None
    if name == "json":
        u = rng.random()
        if u < 0.35:
            return {"key": rng.choice([k for k in C.JSON_KEYS if k != params["key"]])}, None
        if u < 0.65:
            return params, lambda s: "```json\n" + s + "\n```"
        return None, None
    if name == "quotes":
        if rng.random() < 0.5:
            return None, lambda s: "'" + s.strip() + "'"
        return None, None
    return None, None  # lowercase, no_commas: the plain version


def make_violation(prompt: str, work: str, combo, target: str, rng: random.Random) -> str | None:
    by = dict(combo)
    alt, post = violate_variant(target, by[target], work, rng)
    others = [(n, p) for n, p in combo if n != target]
    if alt is not None:
        others.append((target, alt))
    rejected = C.comply_all(work, others, rng)
    if post is not None:
        rejected = post(rejected)
    r = judge(prompt, rejected)
    ok = dict(r.constraints)
    if not r.passed_gates or ok.get(target, True) or not all(v for n, v in r.constraints if n != target):
        return None
    return rejected


def make_gate_failure(
    prompt: str, work: str, chosen: str, combo, kind: str, rng: random.Random, others_pool: list[dict], topic: str
) -> str | None:
    if kind == "off_topic":
        cands = [b for b in others_pool if b["topic"] != topic]
        wc = word_count(work)
        cands.sort(key=lambda b: abs(word_count(b["work"]) - wc) + rng.random() * 6)
        for b in cands[:12]:
            rejected = C.comply_all(b["work"], combo, rng)
            r = judge(prompt, rejected)
            if r.gate_failures == ["off_topic"] and all(v for _, v in r.constraints):
                return rejected
        return None
    if kind in ("short", "generic"):
        # Reward hacks seen in PPO samples: a stub that only carries the format (the end phrase alone,
        # {"summary": "Noodles."}) or a filler sentence that never names the topic.
        if kind == "short":
            first = split_sentences(work)[0].rstrip(".!?").split()
            stub = rng.choice(
                [" ".join(first[: rng.randint(1, 3)]), topic[:1].upper() + topic[1:], rng.choice(SHORT_STUBS)]
            )
            rejected = C.comply_all(stub.rstrip(",;:") + ".", combo, rng)
        else:
            rejected = C.comply_all(rng.choice(GENERIC_FILLERS), combo, rng)
        r = judge(prompt, rejected)
        if r.passed_gates or (kind == "generic" and r.gate_failures != ["off_topic"]):
            return None
        return rejected
    if kind == "repetitive":
        sents = split_sentences(work)
        if rng.random() < 0.5 and len(sents) >= 1:
            sents = sents[:1] + sents[:1] + sents[1:]  # a sentence said twice
        else:  # a looping tail, as in degenerate sampling
            ws = sents[0].rstrip(".!?").split()
            if len(ws) < 6:
                return None
            k = rng.randint(3, 4)
            sents = [" ".join(ws + ws[-k:] * 3) + "."] + sents[1:]
        rejected = C.comply_all(" ".join(sents), combo, rng)
    elif kind == "truncated":
        toks = chosen.split(" ")
        if len(toks) < 6:
            return None
        cut = rng.randint(int(len(toks) * 0.55), max(int(len(toks) * 0.55), len(toks) - 2))
        rejected = " ".join(toks[:cut]).rstrip(" ,;:.!?-")
    else:
        raise ValueError(kind)
    r = judge(prompt, rejected)
    if r.passed_gates or kind not in r.gate_failures:
        return None
    return rejected


# --------------------------------------------------------------------------- building
class TokenCounter:
    """Counts tokens with the embedded model's tokenizer (falls back to a word estimate)."""

    def __init__(self):
        try:
            from transformers import AutoTokenizer

            from pipeline.embedded import ensure_embedded_model

            self.tok = AutoTokenizer.from_pretrained(ensure_embedded_model())
        except Exception as e:  # noqa: BLE001 - the token check is a safety margin only
            print(f"warning: no tokenizer ({e}); estimating tokens from words")
            self.tok = None

    def __call__(self, text: str) -> int:
        if self.tok is None:
            return int(len(text.split()) * 1.4) + 2
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


def build_sft(bases, target, rng, ntok):
    sampler = ComboSampler(rng)
    rows, seen = [], set()
    attempts = 0
    while len(rows) < target and attempts < target * 20:
        b = bases[attempts % len(bases)]
        attempts += 1
        if attempts % len(bases) == 0:
            rng.shuffle(bases)
        combo = sampler.sample(b["work"])
        prompt = build_prompt(b["question"], combo)
        if prompt in seen:
            continue
        completion = C.comply_all(b["work"], combo, rng)
        if judge(prompt, completion).score < 1.0 or ntok(completion) > MAX_COMPLETION_TOKENS:
            continue
        sampler.commit(combo)
        seen.add(prompt)
        rows.append(
            {
                "prompt": user(prompt),
                "completion": assistant(completion),
                "_families": [n for n, _ in combo],
                "_question": b["question"],
            }
        )
    return rows


GATE_KINDS = ["off_topic", "repetitive", "truncated", "short", "generic"]
SHORT_STUBS = ["Sure", "Yes", "Of course", "Here it is", "Okay", "Good question"]
GENERIC_FILLERS = [
    "That is a great question to think about.",
    "There is a lot that could be said about this subject.",
    "Many people find this a really interesting thing to learn about.",
    "It depends on many different factors and on who you ask.",
    "This is something that a lot of people are curious about.",
    "The answer is simpler than most people expect it to be.",
    "It has a long history and it matters to many people today.",
    "There are several important points to keep in mind here.",
]


def build_pref(bases, target, rng, ntok, p_gate=0.3):
    sampler = ComboSampler(rng)
    violated: Counter = Counter({n: 0 for n in C.FAMILY_NAMES})
    gates: Counter = Counter({k: 0 for k in GATE_KINDS})
    rows, seen = [], set()
    attempts = 0
    order = list(bases)
    while len(rows) < target and attempts < target * 30:
        b = order[attempts % len(order)]
        attempts += 1
        if attempts % len(order) == 0:
            rng.shuffle(order)
        combo = sampler.sample(b["work"])
        prompt = build_prompt(b["question"], combo)
        if prompt in seen:
            continue
        chosen = C.comply_all(b["work"], combo, rng)
        if judge(prompt, chosen).score < 1.0 or ntok(chosen) > MAX_COMPLETION_TOKENS:
            continue
        if rng.random() < p_gate:
            kind = min(GATE_KINDS, key=lambda k: (gates[k], rng.random()))
            rejected = make_gate_failure(prompt, b["work"], chosen, combo, kind, rng, bases, b["topic"])
            label = "gate:" + kind
        else:
            names = [n for n, _ in combo]
            target_name = min(names, key=lambda n: (violated[n], rng.random()))
            rejected = make_violation(prompt, b["work"], combo, target_name, rng)
            if rejected is None and len(names) == 2:  # try the other constraint
                target_name = [n for n in names if n != target_name][0]
                rejected = make_violation(prompt, b["work"], combo, target_name, rng)
            label = target_name
        if rejected is None or rejected.strip() == chosen.strip():
            continue
        if not judge(prompt, chosen).score > judge(prompt, rejected).score:
            continue
        sampler.commit(combo)
        if label.startswith("gate:"):
            gates[label[5:]] += 1
        else:
            violated[label] += 1
        seen.add(prompt)
        rows.append(
            {
                "prompt": user(prompt),
                "chosen": assistant(chosen),
                "rejected": assistant(rejected),
                "_families": [n for n, _ in combo],
                "_question": b["question"],
                "_rejected_kind": label,
            }
        )
    return rows


def build_onpolicy_pairs(samples: list[dict], rng: random.Random, pairs_per_prompt: int = 3) -> list[dict]:
    """Preference pairs from a policy's own samples, labelled by the gold judge (which stands in for the
    human labellers of InstructGPT-style RLHF, whose comparisons are of SFT-model outputs): for each prompt,
    up to ``pairs_per_prompt`` pairs of distinct responses with different judge scores, drawn at random, the
    higher-scored one chosen."""
    by_prompt: dict[int, list[dict]] = {}
    for r in samples:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    rows = []
    for pid in sorted(by_prompt):
        group = by_prompt[pid]
        prompt = group[0]["prompt"]
        scored, seen = [], set()
        for r in group:
            text = r["response"].strip()
            if text in seen:
                continue
            seen.add(text)
            scored.append((judge(prompt, text).score, text))
        rng.shuffle(scored)
        candidates = [(a, b) for i, a in enumerate(scored) for b in scored[i + 1 :] if a[0] != b[0]]
        rng.shuffle(candidates)
        parsed = parse_prompt(prompt_text(prompt))
        for a, b in candidates[:pairs_per_prompt]:
            (hi, lo) = (a, b) if a[0] > b[0] else (b, a)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": assistant(hi[1]),
                    "rejected": assistant(lo[1]),
                    "_families": [n for n, _ in parsed.constraints],
                    "_question": parsed.question,
                    "_rejected_kind": "onpolicy",
                }
            )
    return rows


def build_prompt_set(topics, target, rng):
    sampler = ComboSampler(rng)
    questions = [(t, make_question(tpl, t)) for t in topics for tpl in QUESTION_TEMPLATES]
    rng.shuffle(questions)
    rows, seen = [], set()
    i = 0
    while len(rows) < target:
        topic, q = questions[i % len(questions)]
        i += 1
        combo = sampler.sample()
        prompt = build_prompt(q, combo)
        if prompt in seen:
            continue
        sampler.commit(combo)
        seen.add(prompt)
        rows.append({"prompt": user(prompt), "_families": [n for n, _ in combo]})
    return rows


def scarce_split(sft, pref_train, ppo, fraction: float, seed: int):
    """Setting (b), scarce demonstrations: the demonstrations of a random set of training questions, at most
    ``fraction`` of all demonstrations, for SFT; the comparisons and PPO prompts of every other question for the
    reward model and PPO, so neither sees a question SFT was shown."""
    by_q: dict[str, int] = Counter(r["_question"] for r in sft)
    order = sorted(by_q)
    random.Random(seed).shuffle(order)
    cap, kept, n = int(len(sft) * fraction), set(), 0
    for q in order:
        if n + by_q[q] <= cap:
            kept.add(q)
            n += by_q[q]
    question = lambda r: r.get("_question") or parse_prompt(prompt_text(r["prompt"])).question  # noqa: E731
    return (
        [r for r in sft if r["_question"] in kept],
        [r for r in pref_train if question(r) not in kept],
        [r for r in ppo if question(r) not in kept],
    )


def strip_private(rows):
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def family_counts(rows) -> Counter:
    c: Counter = Counter()
    for r in rows:
        c.update(r["_families"])
    return c


def mean(xs):
    xs = list(xs)
    return sum(xs) / max(len(xs), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out_dir", default=str(OUT_DIR.relative_to(REPO)), help="output folder (relative to the repo root)"
    )
    ap.add_argument("--resample", action="store_true", help="sample new base answers even if the cache exists")
    ap.add_argument("--n_samples", type=int, default=576, help="base answers to sample (with --resample)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--n_sft", type=int, default=1200)
    ap.add_argument("--n_pref_train", type=int, default=1200, help="built pairs (the on-policy pairs come on top)")
    ap.add_argument("--n_pref_test", type=int, default=400)
    ap.add_argument("--n_ppo", type=int, default=600)
    ap.add_argument("--n_eval", type=int, default=250)
    ap.add_argument("--test_fraction", type=float, default=0.2, help="share of base answers held out for pref_test")
    ap.add_argument(
        "--scarce_fraction", type=float, default=0.2, help="share of the demonstrations SFT gets in setting (b)"
    )
    ap.add_argument(
        "--policy",
        default=None,
        help="sample the on-policy preference pairs from this model (the SFT stage's model/ folder) "
        f"into {POLICY_FILE}; without it the cached samples are reused",
    )
    ap.add_argument("--n_onpolicy_prompts", type=int, default=640)
    ap.add_argument("--onpolicy_samples", type=int, default=4, help="responses sampled per on-policy prompt")
    ap.add_argument("--onpolicy_temperature", type=float, default=1.0)
    ap.add_argument("--onpolicy_batch_size", type=int, default=64)
    args = ap.parse_args(argv)

    out = (REPO / args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_path = out / BASE_FILE
    t0 = time.time()
    if args.resample or not base_path.exists():
        print(f"sampling {args.n_samples} base answers from the embedded model ...")
        raw = sample_base_answers(
            base_path, args.n_samples, args.batch_size, args.max_new_tokens, args.temperature, args.seed
        )
    else:
        raw = load_jsonl(base_path)
        print(f"reusing {len(raw)} cached base answers from {base_path.relative_to(REPO)} (--resample to redo)")

    bases = []
    for row in raw:
        work = clean_answer(row)
        if work is not None:
            bases.append({**row, "work": work})
    print(
        f"usable base answers: {len(bases)}/{len(raw)} (mean {mean(word_count(b['work']) for b in bases):.1f} words)"
    )

    rng = random.Random(args.seed)
    questions = sorted({b["question"] for b in bases})
    rng.shuffle(questions)
    n_test_q = int(round(len(questions) * args.test_fraction))
    test_q = set(questions[:n_test_q])
    train_bases = [b for b in bases if b["question"] not in test_q]
    test_bases = [b for b in bases if b["question"] in test_q]
    print(f"base answers: {len(train_bases)} train / {len(test_bases)} held out for pref_test")

    ntok = TokenCounter()
    sft = build_sft(list(train_bases), args.n_sft, random.Random(args.seed + 1), ntok)
    pref_train = build_pref(list(train_bases), args.n_pref_train, random.Random(args.seed + 2), ntok)
    pref_test = build_pref(list(test_bases), args.n_pref_test, random.Random(args.seed + 3), ntok)
    ppo = build_prompt_set(TRAIN_TOPICS, args.n_ppo, random.Random(args.seed + 4))
    evalp = build_prompt_set(EVAL_TOPICS, args.n_eval, random.Random(args.seed + 5))

    # On-policy pairs: the SFT model's own samples on training-topic prompts, ranked by the judge.
    policy_path = out / POLICY_FILE
    onpolicy_prompts = build_prompt_set(TRAIN_TOPICS, args.n_onpolicy_prompts, random.Random(args.seed + 6))
    if args.policy:
        print(
            f"sampling {args.onpolicy_samples} responses to each of {len(onpolicy_prompts)} prompts "
            f"from {args.policy} ..."
        )
        samples = sample_policy_answers(
            policy_path,
            args.policy,
            onpolicy_prompts,
            args.onpolicy_samples,
            args.onpolicy_batch_size,
            args.max_new_tokens,
            args.onpolicy_temperature,
            args.seed + 6,
        )
    elif policy_path.exists():
        samples = load_jsonl(policy_path)
        print(f"reusing {len(samples)} cached policy samples from {policy_path.relative_to(REPO)} (--policy to redo)")
    else:
        samples = []
        print(f"warning: no {POLICY_FILE} and no --policy: the preference sets get no on-policy pairs")
    onpolicy = build_onpolicy_pairs(samples, random.Random(args.seed + 7))
    # Split by question, as the built pairs: the held-out questions, plus a share of the on-policy questions
    # that no built pair or demonstration uses, so no held-out question is seen in training.
    on_q = [r["_question"] for r in onpolicy]
    seen_q = {b["question"] for b in train_bases}
    fresh = sorted(set(on_q) - seen_q - test_q)
    random.Random(args.seed + 8).shuffle(fresh)
    test_on_q = test_q | set(fresh[: int(round(len(set(on_q)) * args.test_fraction))])
    held_out = [q in test_on_q for q in on_q]
    pref_train += [r for r, h in zip(onpolicy, held_out) if not h]
    pref_test += [r for r, h in zip(onpolicy, held_out) if h]
    random.Random(args.seed + 9).shuffle(pref_train)
    random.Random(args.seed + 10).shuffle(pref_test)  # any prefix (--max_eval_samples) mixes both kinds

    sft_scarce, pref_scarce, ppo_scarce = scarce_split(sft, pref_train, ppo, args.scarce_fraction, args.seed + 11)
    files = {
        "sft_train.jsonl": sft,
        "pref_train.jsonl": pref_train,
        "pref_test.jsonl": pref_test,
        "ppo_prompts.jsonl": ppo,
        "eval_prompts.jsonl": evalp,
        "eval_prompts_rephrased.jsonl": [rephrased_row(r) for r in evalp],
        "sft_scarce.jsonl": sft_scarce,
        "pref_scarce.jsonl": pref_scarce,
        "ppo_prompts_scarce.jsonl": ppo_scarce,
    }
    for name, rows in files.items():
        write_jsonl(out / name, strip_private(rows))

    # ----- stats
    lines = []

    def say(s=""):
        print(s)
        lines.append(s)

    say("| file | rows |")
    say("|---|---|")
    for name, rows in files.items():
        say(f"| `{name}` | {len(rows)} |")
    say(f"| `{BASE_FILE}` | {len(raw)} raw samples ({len(bases)} usable) |")
    say()
    say("Prompts containing each constraint family:")
    say()
    say("| family | " + " | ".join(n.split(".")[0] for n in files) + " |")
    say("|---|" + "---|" * len(files))
    counts = {name: family_counts(rows) for name, rows in files.items()}
    for fam in C.FAMILY_NAMES:
        say(f"| {fam} | " + " | ".join(str(counts[n][fam]) for n in files) + " |")
    say()
    for name in ("pref_train.jsonl", "pref_test.jsonl"):
        rows = files[name]
        kinds = Counter(r["_rejected_kind"] for r in rows)
        cw = [word_count(r["chosen"][0]["content"]) for r in rows]
        rw = [word_count(r["rejected"][0]["content"]) for r in rows]
        ratio = mean(cw) / max(mean(rw), 1e-9)
        n_gate = sum(v for k, v in kinds.items() if k.startswith("gate:"))
        say(
            f"`{name}`: mean words chosen {mean(cw):.1f} / rejected {mean(rw):.1f} "
            f"(ratio {ratio:.3f}); rejected fails a gate in {n_gate} pairs ({n_gate / max(len(rows), 1):.0%})."
        )
        say("Rejected kind counts: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
        say()
    if samples:
        sample_scores = [judge(r["prompt"], r["response"]).score for r in samples]
        scores = Counter(sample_scores)
        n_on = {
            name: sum(r["_rejected_kind"] == "onpolicy" for r in files[name])
            for name in ("pref_train.jsonl", "pref_test.jsonl")
        }
        say(
            f"Policy samples: {len(samples)} ({samples[0]['policy']}, temperature {samples[0]['temperature']}); "
            "gold judge scores " + ", ".join(f"{k:g}: {v}" for k, v in sorted(scores.items())) + f"; "
            f"mean {mean(sample_scores):.3f}. On-policy pairs: "
            f"{n_on['pref_train.jsonl']} in `pref_train.jsonl`, {n_on['pref_test.jsonl']} in `pref_test.jsonl`."
        )
        say()
    sft_wc = [word_count(r["completion"][0]["content"]) for r in sft]
    sft_tok = [ntok(r["completion"][0]["content"]) for r in sft]
    say(
        f"SFT completions: mean {mean(sft_wc):.1f} words, max {max(sft_wc)} words, "
        f"max {max(sft_tok)} tokens; one-constraint prompts "
        f"{sum(len(r['_families']) == 1 for r in sft)}, two-constraint prompts "
        f"{sum(len(r['_families']) == 2 for r in sft)}."
    )
    write_readme(out, lines, args, len(raw), len(bases), len(train_bases), len(test_bases))
    print(f"wrote {', '.join(files)} and README.md to {out.relative_to(REPO)} in {time.time() - t0:.0f}s")
    return 0


def write_readme(out: Path, stat_lines, args, n_raw, n_usable, n_train, n_test) -> None:
    text = (
        f"""# Embedded task data: instruction following with verifiable format constraints

Generated by `python scripts/make_embedded_data.py` (seed {args.seed}; add `--resample` to
sample new base answers, which takes about 8 minutes on 2 CPU cores when the machine is idle).
All files are JSON lines in TRL's conversational format.

## How it is made

1. **Base answers** (`{BASE_FILE}`): the embedded model SmolLM2-135M-Instruct, through its chat
   template, answers {n_raw} bare training questions (`reward_models/topics.py`: a question
   template with a training topic, no constraint), batch {args.batch_size}, sampling at
   temperature {args.temperature}, top-p 1, at most {args.max_new_tokens} new tokens, seeded.
   The raw samples are cached; a re-run reuses them and is deterministic.
2. **Cleaning**: first paragraph, cut to whole sentences, {MIN_WORDS}..{MAX_WORDS} words, no markdown,
   passing every quality gate of the gold judge (`reward_models/gold_judge.py`); then cut to at
   most {WORK_MAX_WORDS} words of whole sentences. {n_usable} usable answers.
3. **Prompts**: the question plus 1 or 2 compatible constraint sentences
   (`reward_models/constraints.py`; families kept about evenly used).
4. **SFT** (`sft_train.jsonl`, `prompt` + `completion`): the base answer rewritten by each
   constraint's `comply`; every completion scores 1.0 with the gold judge and fits in
   {MAX_COMPLETION_TOKENS} tokens.
5. **Preferences** (`pref_train.jsonl`, `pref_test.jsonl`, `prompt` + `chosen` + `rejected`):
   chosen and rejected are built from the *same* base answer (no topic or length cue). Chosen
   satisfies every constraint (judge 1.0). About 70% of the rejected answers violate exactly one
   constraint (a different end phrase / keyword / first word / JSON key, the plain instead of
   lowercased / comma-free / bulleted / quoted version, fenced JSON, one bullet or sentence
   too many or too few, a looser word limit) while satisfying the others and passing every
   gate; about 30% fail a quality gate instead (off-topic: the compliant rewrite of an answer
   to another topic; repetitive: a repeated sentence or looping tail; truncated: cut
   mid-sentence; short: a 1-3 word stub dressed in the format, such as the end phrase alone
   or `{{"summary": "Noodles."}}`; generic: a filler sentence that never names the topic).
   The last two are the reward hacks PPO found against a reward model that had not seen
   them. Every pair has judge(chosen) > judge(rejected).
   Split by base answer (by question): {n_train} base answers for train (also used by SFT),
   {n_test} held out for `pref_test`.
   **On-policy pairs** (mixed into both files): the SFT model's own samples
   (`{POLICY_FILE}`: {args.onpolicy_samples} responses at temperature {args.onpolicy_temperature} to each of
   {args.n_onpolicy_prompts} further training-topic prompts, from the model the SFT stage of `make demo`
   trains; `--policy artifacts/sft/model` resamples them, ~11 minutes on 2 CPU cores), ranked by the gold
   judge, which here plays the human labeller of InstructGPT-style RLHF, whose comparisons are of
   SFT-model outputs. Per prompt, up to 3 pairs of distinct responses with different scores, drawn at
   random; ties are dropped. The built pairs teach what a rewrite of a good answer gets wrong; the
   sampled ones show the reward model the SFT model's own failures (drifting off topic, cut off at the
   token limit, a dropped end phrase or bullet), which is where PPO starts. Held out by question: the
   held-out questions above, plus on-policy questions that no built pair or demonstration uses,
   as many as {args.test_fraction:.0%} of all on-policy questions.
6. **PPO prompts** (`ppo_prompts.jsonl`, training topics) and **evaluation prompts**
   (`eval_prompts.jsonl`, the {len(EVAL_TOPICS)} evaluation topics only, disjoint from the
   {len(TRAIN_TOPICS)} training topics): `prompt` only.
7. **Held-out phrasings** (`eval_prompts_rephrased.jsonl`): the same evaluation prompts with every
   constraint sentence said in words no training prompt uses (`constraints.HELD_OUT_PHRASINGS`, e.g.
   "Keep your reply to 20 words or fewer." for "Answer in at most 20 words."), same parameters; the
   judge parses both. Gold on this split shows whether a gain holds beyond the training phrasing.
8. **Scarce demonstrations** (setting (b) of `benchmarks/quality.py --setting b`; split `train_scarce`):
   `sft_scarce.jsonl` holds the demonstrations of a random set of training questions, at most
   {args.scarce_fraction:.0%} of `sft_train.jsonl`; `pref_scarce.jsonl` and `ppo_prompts_scarce.jsonl` hold the rows of
   `pref_train.jsonl` and `ppo_prompts.jsonl` whose question is not in that set, so the reward model and PPO
   learn from comparisons and prompts SFT never saw. The on-policy pairs among them were sampled from the
   demo's SFT model, not from the one trained on the scarce demonstrations.

## Sizes and statistics

"""
        + "\n".join(stat_lines)
        + "\n"
    )
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
