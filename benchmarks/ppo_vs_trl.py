"""PPO speed against the anchor, TRL 1.12.0's ``PPOTrainer``, side by side in one sitting.

    make bench-anchor                                        # = the line below, on make demo's artifacts
    .venv/bin/python benchmarks/ppo_vs_trl.py --source artifacts --out runs/ppo-vs-trl

1. TRL removed its PPO trainer after 1.12.0, so the anchor runs in a virtual environment of its own,
   ``.venv-anchor/`` (made once: ``trl==1.12.0`` beside this project's versions of torch, transformers, peft,
   accelerate and datasets), through ``benchmarks/trl_ppo_anchor.py``.
2. Both run the same work: the policy ``<source>/sft/model`` with a LoRA adapter (r=16, alpha 32, every linear
   layer), the reward model ``<source>/reward/model`` (also the value model's start), 8 prompts ("Write one
   short sentence about X."), batch 8, responses of at most 32 tokens at temperature 0.7, 1 PPO epoch, 1
   minibatch, learning rate 1e-4, ``--iterations`` (6) iterations. The anchor keeps TRL's design: full fp32
   reward and value models. Ours runs each ``--ours NAME=FLAGS`` variant (default: the stage's defaults, and
   the value adapter on every layer, the default before 2026-12-03) with those flags added.
3. Order: anchor, every variant of ours, anchor, every variant again; each run a fresh process, nothing else
   running. Per run: the median seconds per iteration and episodes/s; per variant, the ratio of its
   episodes/s to the anchor's (medians pooled over both runs of each).
4. Our iterations split into phases (the stage's ``time/<phase>_s`` metrics): generation; the policy, value
   and reference forwards; reward scoring; the update.
5. Achieved FLOP/s: one more run of each variant, with the same seed, counts the FLOPs of every phase with
   ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention, forward and backward, as torch
   dispatches them; padded positions count, since the hardware computes them). Divided by the timed runs'
   seconds, against the matmul peak this process measures for the dtype in use, on the device the runs use
   (the first CUDA GPU if there is one, else the CPU), before the runs and after every round, the best of
   all (``matmul_peak``; on a CPU in bf16 also oneDNN's product on a packed operand, the kernel the stages'
   products run, which is the faster here). The output says whether the counting run drew the timed runs'
   samples (the same scores and KL per iteration). Under bf16 autocast the counter changes the rounding after
   the first update, so the samples drift; the FLOPs are then also given at the timed runs' own response
   lengths, from a line fitted to the counted iterations' FLOPs against their mean response length (an
   estimate: generation and reward scoring grow with the tokens generated, the forwards and the update with the
   batch's longest response; the line's worst residual on the counted iterations is printed with it).
6. Per variant, the stage's ``val/sampler_token_prob_error`` (the rollout path's token probabilities against the
   training forward's; 1 is exact): the check that a faster rollout path still samples the trained policy.

Two options serve a machine without the model files or a package index (a lent GPU, say):
``--init random`` builds both models from ``<source>``'s configs and tokenizers with seeded random weights (the
same architecture and sizes; responses then seldom end early, so every run generates the full 32 tokens), and
``--anchor_python PY`` runs the anchor under an existing interpreter that has ``trl==1.12.0``.

Writes ``<out>/ppo_vs_trl.json``; the figures go to ``docs/benchmarks.md`` with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANCHOR_VENV = REPO / ".venv-anchor"
ANCHOR_TRL = "trl==1.12.0"
PROMPT_TOPICS = ("the sea", "a library", "autumn", "coffee", "a mountain", "the city at night", "a bicycle", "rain")
# policy_value_forward: the two as one forward that the update reuses (one epoch, one minibatch: PPOTrainer.can_fuse)
PHASES = (
    "generate",
    "policy_forward",
    "value_forward",
    "policy_value_forward",
    "reference_forward",
    "reward",
    "update",
)
DEFAULT_VARIANTS = ["defaults=", "value-every-layer=--value_lora_layers -1"]


def anchor_python(venv: Path = ANCHOR_VENV) -> Path:
    """The anchor environment's python, made on first use with this project's library versions."""
    from importlib.metadata import version

    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists():
        return python
    pins = [f"{p}=={version(p)}" for p in ("transformers", "peft", "accelerate", "datasets")]
    torch_pin = f"torch=={version('torch').split('+')[0]}"
    print(f"ppo_vs_trl: making {venv} ({ANCHOR_TRL}, {torch_pin}, {', '.join(pins)})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", ANCHOR_TRL, *pins], check=True)
    stamp.touch()
    return python


def matmul_peak(dtype_name: str, sizes=None, repeats: int = 5) -> float:
    """Best GFLOP/s of a square matmul of random numbers in ``dtype_name`` over ``sizes``, in this process, on the
    device the stages use: the first CUDA GPU if there is one (sizes 4096 and 8192, timed with a synchronize around
    each product), else the CPU (1024 and 2048, torch's own kernels and thread count; for bf16 where the stages
    prepack weights, also oneDNN's product on a prepacked operand, ``pipeline/packed_linear.py``, which runs
    faster here). That device's attainable peak for the dtype."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = getattr(torch, dtype_name)
    packed = None
    if not cuda and dtype == torch.bfloat16:
        from pipeline import packed_linear

        packed = packed_linear if packed_linear.supported() else None
    best = 0.0
    for n in sizes or ((4096, 8192) if cuda else (1024, 2048)):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        products = [(torch.matmul, (a, b))]
        if packed is not None:  # a @ b as the stages' packed products compute it: b^T is the packed "weight"
            products.append((packed._packed_product, (a, packed._pack(b.t().contiguous()), None)))
        for product, args in products:
            product(*args)  # warm-up
            sync()
            for _ in range(repeats):
                t = time.perf_counter()
                product(*args)
                sync()
                best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    del a, b, products, args
    if cuda:
        torch.cuda.empty_cache()  # the stages run in child processes on the same GPU
    return best


def random_source(source: Path, out: Path, seed: int) -> Path:
    """An artifact dir under ``out`` whose ``sft/model`` and ``reward/model`` have ``source``'s configs and
    tokenizers and seeded random weights (``--init random``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    for part, cls, kw in (
        ("sft", AutoModelForCausalLM, {}),
        ("reward", AutoModelForSequenceClassification, {"num_labels": 1}),
    ):
        src, dst = source / part / "model", out / part / "model"
        tok = AutoTokenizer.from_pretrained(src)
        config = AutoConfig.from_pretrained(src, **kw)
        if config.pad_token_id is None:
            config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        cls.from_config(config, dtype=torch.float32).save_pretrained(dst)
        tok.save_pretrained(dst)
    return out


def write_prompts(path: Path) -> Path:
    with path.open("w") as f:
        for topic in PROMPT_TOPICS:
            row = {"prompt": [{"role": "user", "content": f"Write one short sentence about {topic}."}]}
            f.write(json.dumps(row) + "\n")
    return path


def ours_argv(a, run_dir: Path, prompts: Path, flags: list[str]) -> list[str]:
    """Our PPO stage's arguments for the benchmark's sizes plus a variant's ``flags``."""
    return [
        "--artifact_dir", str(run_dir),
        "--model_name_or_path", str(a.source / "sft" / "model"),
        "--reward_model_path", str(a.source / "reward" / "model"),
        "--dataset_name", str(prompts),
        "--rollout_batch_size", "8", "--local_rollout_forward_batch_size", "8",
        "--per_device_train_batch_size", "8", "--num_mini_batches", "1", "--num_ppo_epochs", "1",
        "--response_length", "32", "--temperature", "0.7", "--learning_rate", "1e-4",
        "--lora_r", "16", "--lora_alpha", "32",
        "--num_iterations", str(a.iterations), "--save_every", str(a.iterations), "--sample_every", "0",
        "--gold_judge", "false", "--seed", str(a.seed),
        *flags,
    ]  # fmt: skip


def run(cmd: list[str], log: Path, check: bool = True, env: dict | None = None) -> float | None:
    """Wall seconds of ``cmd`` (in ``env``, default this process's), its output appended to ``log``. A failure
    exits, or with ``check=False`` says so on stderr and returns None."""
    t = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if rc != 0:
        message = f"ppo_vs_trl: failed (exit {rc}): {' '.join(cmd[:4])} ...; see {log}"
        if check:
            sys.exit(message)
        print(message, file=sys.stderr, flush=True)
        return None
    return time.perf_counter() - t


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def counted_run(run_dir: Path, out: Path, flags: list[str]) -> dict:
    """A FLOP-counting run's counts, metrics and the base dtype it resolved (``--dtype auto`` follows the host)."""
    manifest = json.loads((run_dir / "ppo" / "manifest.json").read_text())
    return {**json.loads(out.read_text()), "flags": flags, "dtype": manifest["config"]["model"]["dtype"],
            "rows": read_rows(run_dir / "ppo" / "metrics.jsonl")}  # fmt: skip


def grouped_query_heads(count):
    """``count`` (torch's ``sdpa_flop_count`` or ``sdpa_backward_flop_count``: ``(*shapes)`` ending in query, key,
    value) with key and value shapes widened to the query's heads. The attention kernel broadcasts grouped-query
    (GQA) key and value heads to the query's, so the arithmetic is the widened one; torch before 2.12 rejects the
    narrower shapes (transformers passes them with ``enable_gqa`` on CUDA), later torch counts them as widened."""

    def counted(*shapes):
        *rest, query, key, value = shapes
        heads = query[1]
        if key[1] != heads and heads % key[1] == 0:
            key, value = (key[0], heads, *key[2:]), (value[0], heads, *value[2:])
        return count(*rest, query, key, value)

    return counted


def count_packed_linears(flop_counter) -> None:
    """Teach torch's FLOP counter oneDNN's linear on a prepacked weight (``pipeline/packed_linear.py``), which it
    does not know and would count as 0: ``x [..., K]`` times a packed ``[N, K]`` weight, ``2 * rows * K * N``."""
    import math

    import torch

    @flop_counter.register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def packed_linear_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def count_flops(out: str, argv: list[str]) -> int:
    """Run our PPO stage with ``argv``, counting each phase's FLOPs per iteration; write them to ``out``."""
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    for name in ("sdpa_flop_count", "sdpa_backward_flop_count"):  # looked up by name at each count
        setattr(flop_counter, name, grouped_query_heads(getattr(flop_counter, name)))
    count_packed_linears(flop_counter)

    sys.path.insert(0, str(REPO))
    from pipeline import stage_ppo
    from pipeline.ppo import trainer

    rows, current = [], {}
    timed, take = trainer.PhaseClock.__call__, trainer.PhaseClock.take

    class Counted:  # the clock's context, with a FLOP counter around it
        def __init__(self, clock, phase):
            self.phase, self.inner, self.counter = phase, timed(clock, phase), FlopCounterMode(display=False)

        def __enter__(self):
            self.counter.__enter__()
            return self.inner.__enter__()

        def __exit__(self, *exc):
            self.inner.__exit__(*exc)
            self.counter.__exit__(*exc)
            current[self.phase] = current.get(self.phase, 0) + self.counter.get_total_flops()

    def take_and_record(clock):
        rows.append(dict(current))
        current.clear()
        return take(clock)

    trainer.PhaseClock.__call__ = lambda clock, phase: Counted(clock, phase)
    trainer.PhaseClock.take = take_and_record
    try:
        rc = stage_ppo.cli(argv)
    finally:
        trainer.PhaseClock.__call__, trainer.PhaseClock.take = timed, take
    Path(out).write_text(json.dumps({"flops_per_iteration": rows}))
    return rc


def summarize(runs: list[dict], flops: dict, peaks: dict) -> dict:
    anchor = [s for r in runs if r["who"] == "anchor" for s in r["seconds_per_iteration"]]
    anchor_median = statistics.median(anchor)
    out = {"anchor": {"median_s_per_iteration": anchor_median, "episodes_per_s": 8 / anchor_median}, "ours": {}}
    for name in dict.fromkeys(r["who"] for r in runs if r["who"] != "anchor"):
        mine = [r for r in runs if r["who"] == name]
        rows = [row for r in mine for row in r["rows"]]
        median = statistics.median(row["time/iteration_s"] for row in rows)
        phases = {p: statistics.median(row[f"time/{p}_s"] for row in rows) for p in PHASES if f"time/{p}_s" in rows[0]}
        entry = {
            "median_s_per_iteration": median,
            "episodes_per_s": 8 / median,
            "ratio_to_anchor": anchor_median / median,
            "median_phase_s": phases,
            "median_rollout_s": statistics.median(row["time/rollout_s"] for row in rows),
        }
        if "val/sampler_token_prob_error" in rows[0]:
            errors = [row["val/sampler_token_prob_error"] for row in rows]
            entry["sampler_token_prob_error"] = {"median": statistics.median(errors), "max": max(errors)}
        counted = flops.get(name)
        if counted:
            per_iter = counted["flops_per_iteration"]
            # Whether the counting run drew the timed runs' samples: every phase's FLOPs depend on them (generation
            # and reward scoring on the tokens generated, the forwards and the update on the batch padded to its
            # longest response). Under bf16 autocast the counter itself changes the rounding after the first
            # update, so their lengths are shown.
            same = all(
                abs(a["objective/scores"] - b["objective/scores"]) < 1e-4
                and abs(a["objective/kl"] - b["objective/kl"]) < 1e-3
                for r in mine
                for a, b in zip(r["rows"], counted["rows"])
            )
            dtype = counted["dtype"]
            peak = peaks[dtype]
            total = [sum(f.values()) for f in per_iter]
            achieved = [t / row["time/iteration_s"] / 1e9 for r in mine for t, row in zip(total, r["rows"])]
            by_phase = {}
            for p in PHASES:
                rates = [f.get(p, 0) / row[f"time/{p}_s"] / 1e9 for r in mine for f, row in zip(per_iter, r["rows"])
                         if row.get(f"time/{p}_s")]  # fmt: skip
                if rates:
                    by_phase[p] = statistics.median(rates)
            # Where the counting run drew other samples, its FLOPs belong to other response lengths: a
            # least-squares line of the counted FLOPs against the mean response length, evaluated at each timed
            # iteration's mean length, estimates that iteration's FLOPs. An estimate: the padded phases follow the
            # longest response, which the metrics do not log, so the line's worst residual is reported with it.
            lengths = [row["val/response_length"] for row in counted["rows"]][: len(total)]
            fit = line_fit(lengths, total)
            adjusted = [(fit[0] + fit[1] * row["val/response_length"]) / row["time/iteration_s"] / 1e9
                        for r in mine for row in r["rows"]]  # fmt: skip
            entry.update({
                "same_samples_as_timed_runs": same,
                "length_adjusted": {
                    "achieved_gflop_per_s": statistics.median(adjusted),
                    "fraction_of_peak": statistics.median(adjusted) / peak,
                    "gflop_per_response_token": fit[1] / 8 / 1e9,
                    "fit_max_relative_residual": max(
                        abs(fit[0] + fit[1] * x - t) / t for x, t in zip(lengths, total)
                    ),
                },
                "response_length_timed_vs_counted": [
                    statistics.mean(row["val/response_length"] for row in rows),
                    statistics.mean(row["val/response_length"] for row in counted["rows"]),
                ],
                "gflop_per_iteration": statistics.median(total) / 1e9,
                "achieved_gflop_per_s": statistics.median(achieved),
                "achieved_gflop_per_s_by_phase": by_phase,
                "peak_dtype": dtype,
                "peak_gflop_per_s": peak,
                "fraction_of_peak": statistics.median(achieved) / peak,
            })  # fmt: skip
        out["ours"][name] = entry
    return out


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` (``b = 0`` where every ``x`` is the same)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


def print_table(summary: dict, runs: list[dict]) -> None:
    print("\nrun                 median s/iter   episodes/s")
    for r in runs:
        s = r["seconds_per_iteration"] if r["who"] == "anchor" else [row["time/iteration_s"] for row in r["rows"]]
        print(f"{r['who']:<20}{statistics.median(s):>14.2f}{8 / statistics.median(s):>13.3f}")
    anchor = summary["anchor"]["median_s_per_iteration"]
    print(f"\nanchor (TRL 1.12.0, fp32, full reward and value models): {anchor:.2f} s/iteration")
    for name, e in summary["ours"].items():
        print(f"ours [{name}]: {e['median_s_per_iteration']:.2f} s/iteration, "
              f"{e['ratio_to_anchor']:.2f}x the anchor's episodes/s")  # fmt: skip
        print("  phases (median s): " + ", ".join(f"{p} {s:.2f}" for p, s in e["median_phase_s"].items()))
        if "sampler_token_prob_error" in e:
            print("  sampler token-probability error: median {median:.6f}, max {max:.6f}".format(
                **e["sampler_token_prob_error"]))  # fmt: skip
        if "achieved_gflop_per_s" in e:
            print(f"  {e['gflop_per_iteration']:.0f} GFLOP/iteration, {e['achieved_gflop_per_s']:.1f} GFLOP/s = "
                  f"{100 * e['fraction_of_peak']:.1f}% of the {e['peak_dtype']} matmul peak "
                  f"({e['peak_gflop_per_s']:.0f} GFLOP/s); by phase: "
                  + ", ".join(f"{p} {g:.1f}" for p, g in e["achieved_gflop_per_s_by_phase"].items())
                  + f"; counting run drew the same samples: {e['same_samples_as_timed_runs']} (mean response length "
                  + "{:.1f} timed, {:.1f} counted)".format(*e["response_length_timed_vs_counted"]))  # fmt: skip
            adj = e["length_adjusted"]
            print(f"  at the timed runs' response lengths: {adj['achieved_gflop_per_s']:.1f} GFLOP/s = "
                  f"{100 * adj['fraction_of_peak']:.1f}% of the peak ({adj['gflop_per_response_token']:.2f} GFLOP per "
                  f"response token; the line fits the counted iterations to "
                  f"{100 * adj['fit_max_relative_residual']:.2f}%)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["count-flops"]:
        return count_flops(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("artifacts"), help="an artifact dir holding sft/ and reward/")
    ap.add_argument("--out", type=Path, default=Path("runs/ppo-vs-trl"))
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="anchor-ours rounds (each variant once per round)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--ours", action="append", help="NAME=FLAGS: a variant of our stage (repeatable)")
    ap.add_argument("--no_flops", action="store_true", help="skip the FLOP-counting runs")
    ap.add_argument(
        "--init",
        choices=("trained", "random"),
        default="trained",
        help="random: --source's configs and tokenizers with seeded random weights (no weights needed)",
    )
    ap.add_argument(
        "--anchor_malloc",
        choices=["default", "tuned"],
        default="default",
        help="glibc's malloc for the anchor: its default, as TRL runs, or the settings our stages give themselves "
        "(pipeline/allocator.py), to separate that setting from the rest",
    )
    ap.add_argument("--anchor_python", type=Path, help="an interpreter with trl==1.12.0 (default: make .venv-anchor)")
    ap.add_argument("--summarize_only", action="store_true", help="rewrite the summary from --out's runs; run nothing")
    a = ap.parse_args(argv)
    if a.summarize_only:
        result = json.loads((a.out / "ppo_vs_trl.json").read_text())
        names = dict.fromkeys(r["who"] for r in result["runs"] if r["who"] != "anchor")
        flags = {r["who"]: r["flags"] for r in result["runs"] if r["who"] != "anchor"}
        flops = {n: counted_run(a.out / f"flops-{n}", a.out / f"flops-{n}.json", flags[n])
                 for n in names if (a.out / f"flops-{n}.json").exists()}  # fmt: skip
        result["summary"] = summarize(result["runs"], flops, result["matmul_peak_gflop_per_s"])
        (a.out / "ppo_vs_trl.json").write_text(json.dumps(result, indent=1))
        print_table(result["summary"], result["runs"])
        return 0
    a.source = a.source.resolve()
    for part in ("sft/model", "reward/model"):
        if not (a.source / part / "config.json").is_file():
            print(
                f"ppo_vs_trl: {a.source / part} holds no model: run `make demo` first, or pass --source DIR",
                file=sys.stderr,
            )
            return 2
    if a.anchor_python is not None and not os.access(a.anchor_python, os.X_OK):
        print(f"ppo_vs_trl: --anchor_python {a.anchor_python} is not an executable file", file=sys.stderr)
        return 2
    variants = {}
    for spec in a.ours or DEFAULT_VARIANTS:
        name, _, flags = spec.partition("=")
        variants[name] = flags.split()
    a.out.mkdir(parents=True, exist_ok=True)
    log, prompts = a.out / "ppo_vs_trl.log", write_prompts(a.out / "prompts.jsonl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("USE_HUB_KERNELS", "NO")  # as the pipeline sets it (pipeline/__init__.py), for both sides
    if a.init == "random":
        a.source = random_source(a.source, (a.out / "random-source").resolve(), a.seed)
    python = a.anchor_python or anchor_python()
    from pipeline.modeling import native_bf16_here

    # Emulated bf16 (a CPU without AVX512-BF16 or AMX) runs near 1 GFLOP/s at any size: one small size there.
    emulated = {"bfloat16": (512,)} if not native_bf16_here() else {}
    # Measured before the runs and again after each round, the best of all: one short measurement on a shared
    # host varied by 7% between runs (415-443 GFLOP/s in bf16, docs/benchmarks.md), and a low one flatters the
    # achieved fraction.
    peak_samples = {d: [] for d in ("float32", "bfloat16")}
    peaks = {}

    def measure_peaks(when: str) -> None:
        for d, samples in peak_samples.items():
            samples.append(matmul_peak(d, emulated.get(d)))
            peaks[d] = max(samples)
        latest = ", ".join(f"{d} {s[-1]:.0f} GFLOP/s" for d, s in peak_samples.items())
        print(f"ppo_vs_trl: matmul peak ({when}) {latest}", flush=True)

    measure_peaks("before the runs")
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    result = {"command": "python benchmarks/ppo_vs_trl.py " + " ".join(argv), "device": device,
              "versions": {"torch": torch.__version__}, "matmul_peak_gflop_per_s": peaks,
              "matmul_peak_samples_gflop_per_s": peak_samples, "runs": []}  # fmt: skip
    runs = result["runs"]

    def save() -> None:  # after every run, so that a failure later keeps what was measured
        (a.out / "ppo_vs_trl.json").write_text(json.dumps(result, indent=1))

    from pipeline import allocator

    # Our stage restarts itself with the tuned malloc where it applies (pipeline/allocator.py); the anchor is TRL.
    anchor_env = allocator.tuned_env() if a.anchor_malloc == "tuned" else None
    result["malloc"] = {"ours": "tuned" if allocator.applies() else "default", "anchor": a.anchor_malloc}
    for rnd in range(a.rounds):
        anchor_out = a.out / f"anchor-{rnd}.json"
        wall = run([str(python), str(REPO / "benchmarks" / "trl_ppo_anchor.py"),
                    "--policy", str(a.source / "sft" / "model"), "--reward", str(a.source / "reward" / "model"),
                    "--prompts", str(prompts), "--iterations", str(a.iterations), "--seed", str(a.seed),
                    "--out", str(anchor_out)], log, env=anchor_env)  # fmt: skip
        runs.append({"who": "anchor", "round": rnd, "wall_s": wall, **json.loads(anchor_out.read_text())})
        save()
        print(f"ppo_vs_trl: anchor, round {rnd + 1}: {runs[-1]['seconds_per_iteration']}", flush=True)
        for name, flags in variants.items():
            run_dir = a.out / f"ours-{name}-{rnd}"
            shutil.rmtree(run_dir, ignore_errors=True)
            wall = run([sys.executable, "-m", "pipeline.stage_ppo", *ours_argv(a, run_dir, prompts, flags)], log)
            rows = read_rows(run_dir / "ppo" / "metrics.jsonl")
            runs.append({"who": name, "round": rnd, "wall_s": wall, "flags": flags, "rows": rows})
            save()
            print(f"ppo_vs_trl: ours [{name}], round {rnd + 1}: {[round(r['time/iteration_s'], 2) for r in rows]}",
                  flush=True)  # fmt: skip
        measure_peaks(f"after round {rnd + 1}")
        save()
    result["summary"] = summarize(runs, {}, peaks)
    save()  # the timings, before the counting runs
    flops = {}
    if not a.no_flops:
        for name, flags in variants.items():
            run_dir, out = a.out / f"flops-{name}", a.out / f"flops-{name}.json"
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = [sys.executable, __file__, "count-flops", str(out), *ours_argv(a, run_dir, prompts, flags)]
            if run(cmd, log, check=False) is not None:  # a failed count leaves the timings standing
                flops[name] = counted_run(run_dir, out, flags)
    summary = result["summary"] = summarize(runs, flops, peaks)
    save()
    print(f"ppo_vs_trl: on {device}")
    print_table(summary, runs)
    print(f"\nppo_vs_trl: wrote {a.out / 'ppo_vs_trl.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
