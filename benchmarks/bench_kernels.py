"""Kernel-level timings behind the CPU speed choices (docs/benchmarks.md, 2026-12-03 afternoon).

    .venv/bin/python benchmarks/bench_kernels.py attention [--rows 8] [--lengths 70 128 256]
    .venv/bin/python benchmarks/bench_kernels.py grouped-attention [--rows 8] [--lengths 72 128] [--repeats 3]
    .venv/bin/python benchmarks/bench_kernels.py adamw [--rank 16] [--repeats 5]
    .venv/bin/python benchmarks/bench_kernels.py linear
    .venv/bin/python benchmarks/bench_kernels.py backward-products [--rows 560 2000]
    .venv/bin/python benchmarks/bench_kernels.py fused-decoding --model DIR [--repeats 5]
    .venv/bin/python benchmarks/bench_kernels.py sft-step --model DIR [--length 118] [--repeats 3]
    .venv/bin/python benchmarks/bench_kernels.py generation --model DIR [--threads 2] [--static_cache]
        [--compile] [--continuous_batching]
    .venv/bin/python benchmarks/bench_kernels.py eval-batch --model DIR [--batches 64 100 200]
        [--modes generate static compact compact-1pass] [--profile] [--dtype auto] [--quality --repeats 5]
    .venv/bin/python benchmarks/bench_kernels.py scoring --model DIR [--rows 32] [--chunks 512 1024 2048 4096]
    .venv/bin/python benchmarks/bench_kernels.py reward --model DIR [--pairs 100] [--batches 32] [--repeats 3]
    .venv/bin/python benchmarks/bench_kernels.py reward-chunks --model DIR [--steps 10] [--chunks 1024] [--pairs 1024]
    .venv/bin/python benchmarks/bench_kernels.py update-chunks --source DIR [--iterations 3] [--chunks 512 1024]
    .venv/bin/python benchmarks/bench_kernels.py ppo-profile --source DIR [--iteration 3]
    .venv/bin/python benchmarks/bench_kernels.py rollout-split --source DIR [--iterations 6] [--commits REV ...]
    .venv/bin/python benchmarks/bench_kernels.py rollout-logprobs --source DIR [--iterations 3] [--rounds 2]
    .venv/bin/python benchmarks/bench_kernels.py stage-vs-trl --stage sft|reward [--source DIR] [--max_steps 20]
    .venv/bin/python benchmarks/bench_kernels.py malloc --stage sft|reward|ppo|eval --source DIR [--rounds 2]
        [--flags "--max_eval_samples 100"]

- ``attention``: forward, and forward + backward, of one layer's attention (9 heads of 64, SmolLM2-135M's)
  with torch's flash and math CPU kernels, causal and with a padding mask, in bf16 and fp32 (ms, mean of 20).
- ``grouped-attention``: one layer's attention as the PPO training forwards run it on a CPU under bf16 (9 query
  heads and 3 key/value heads of 64, SmolLM2-135M's; rows left-padded by 0 to 11 tokens): transformers' SDPA
  function (key/value heads repeated, torch's math kernel) against ``pipeline.grouped_attention``, forward
  without gradients and forward + backward, alternating, best of ``--repeats`` means of 20; how many outputs
  have the same bits and the largest difference.
- ``adamw``: one AdamW step over the PPO demo's trained parameters (LoRA rank ``--rank`` on every projection
  of SmolLM2-135M's 30 layers for the policy and of its top 8 for the value, plus the value head; float32),
  PyTorch's per-operation (``foreach``) update against its fused kernel, alternating: best-of-``--repeats``
  milliseconds per step, and the largest difference between the two after five steps.
- ``linear``: a batch-8 bf16/fp32 matrix product against each of SmolLM2's weight shapes, in cache and from
  memory, plus oneDNN's linear on a weight packed once (``pipeline/packed_linear.py``; what decoding does 211
  times per token: the weight bytes it reads per second from memory), and whether the two give the same bits;
  then the memory's read rate for comparison (a float32 sum over 256 MB).
- ``backward-products``: a frozen layer's input gradient in a LoRA update, ``grad @ W`` against the packed
  product on ``W^T`` packed once (``PackedLinear``'s backward), for a layer's seven projections at ``--rows``
  rows and the vocabulary projection at 264: best-of-three times and whether the bits are the same.
- ``packed-generation``: the PPO benchmark's 8 prompts x 32 sampled tokens through ``pipeline.decoding.generate``
  on the bf16 model and on a copy with prepacked weights, alternating, one seed per pair: seconds per call and
  whether the tokens and log-probs are the same bits.
- ``fused-decoding``: the same 8 x 32 sampled tokens on the packed bf16 model, its decoding steps through the
  model's forward and through ``pipeline.fast_decode.Decoder`` (fused products), alternating, one seed per pair:
  seconds per call, whether the tokens and log-probs are the same bits, and one step's products alone.
- ``sft-step``: forward + backward of an SFT-shaped batch (LoRA r=16 on every linear layer, bf16 autocast,
  8 rows of ``--length`` tokens) under the default kernels and under ``pipeline.modeling.training_attention``,
  alternating.
- ``generation``: PPO's rollout sampling at the ppo_vs_trl sizes (8 prompts, 32 tokens, bf16 weights).
- ``eval-batch``: the evaluation's sampling of 200 held-out prompts x 64 tokens at several batch sizes, through
  ``generate`` (dynamic or static KV cache) or ``pipeline/decoding.py`` (finished rows leave the batch; with
  ``compact-1pass``, its prompts as one forward rather than a shared prefix and length-sorted chunks), after a
  warm-up, alternating. ``--quality``: a new seed per repeat, and each pass's gold score, response length and
  EOS rate, so that two decoding paths can be compared over seeds.
- ``scoring``: the PPO rollout's log-prob forward over 32 PPO prompts and sampled responses, as one padded
  forward and through ``pipeline.decoding.scoring_forward`` (shared prefix once, length-sorted chunks).
- ``reward``: ``reward_scores`` on held-out preference pairs, one right-padded forward per batch against
  ``scoring_forward`` (shared system turn once, length-sorted chunks) and ``reward_pair_scores`` (pairs packed as
  prefix trees), alternating; ``--model`` is a reward model.
- ``reward-chunks``: the reward stage's training loss, forward + backward, on its recipe's first random
  batches: one forward over the padded batch, length-sorted chunks of rows (``--chunks`` token budgets), and
  ``stage_reward.PairForward``'s default (packed prefix trees: each pair's prompt once, ``--pairs`` budgets).
- ``update-chunks``: the PPO update's forward + backward on the demo recipe's own rollouts, one padded forward
  per micro-batch against length-sorted chunks of rows at several token budgets.
- ``ppo-profile``: our PPO stage at the ppo_vs_trl sizes with ``torch.profiler`` around one iteration's update;
  prints the operators by self time. ``--source`` holds ``sft/model`` and ``reward/model``.
- ``rollout-split``: our PPO stage at the ppo_vs_trl sizes with timers (no profiler) around the rollout's
  pieces (weight sync, packing, prompt forward, decoding steps, sampler), the forwards with gradients and the
  update: ms per iteration after the first; with ``--commits``, each revision's code in turn.
- ``rollout-logprobs``: the PPO stage with the demo recipe (``configs/ppo_demo.yaml``, four minibatches, so the
  update does not reuse the rollout's forward) on ``--source``'s ``sft/`` and ``reward/``, its first
  ``--iterations`` iterations, with ``--rollout_logprobs forward`` and ``sampler`` alternating for ``--rounds``
  rounds, each run a fresh process, in ``--dtype`` (auto: the stage's default): median seconds per iteration,
  rollout and policy forward, and each iteration's KL and mean score, which show whether the two runs learn the
  same.
- ``ppo-checkouts``: the same demo-recipe PPO runs (``--source``'s ``sft/`` and ``reward/``, the first
  ``--iterations`` iterations) from each of ``--commits`` (git revisions, each checked out as a temporary
  worktree), alternating for ``--rounds`` rounds, each run a fresh ``python -m pipeline.stage_ppo`` in that
  checkout: median seconds per iteration and per phase, over every iteration and over the first alone, and each
  iteration's KL, mean score, entropy and response length, which show whether two versions of the code learn the
  same.
- ``stage-checkouts``: the demo recipe's SFT or reward stage (``--stage``; the reward stage on ``--source``'s
  ``sft/``) for ``--max_steps`` steps from each of ``--commits``, alternating for ``--rounds`` rounds: the
  trainer's runtime, the stage's wall time, the final training loss (equal bits: the same training) and the
  reward stage's held-out accuracy.
- ``stage-vs-trl``: the demo recipe's SFT or reward stage (the reward stage on ``--source``'s ``sft/``) for
  ``--max_steps`` steps with the stage's trainer and with TRL's own ``SFTTrainer`` / ``RewardTrainer`` at the
  same settings (without the stage's model set-up either: the contiguous vocabulary-projection input, the
  prepacked frozen weights), alternating for ``--rounds`` rounds, each a fresh process under the stages' malloc
  settings: the trainer's runtime, steps per second and final training loss.
- ``malloc``: one demo-recipe stage (``configs/<stage>_demo.yaml`` plus ``--flags``) on ``--source``'s artifacts
  of the stages before it, with glibc's default malloc (``RLHF_TUNE_MALLOC=0``) and with the stages' tuned one
  (``pipeline/allocator.py``), alternating for ``--rounds`` rounds, each a fresh process: wall, user and system
  seconds, minor page faults and peak RSS (the child's ``rusage``), and a digest of what the stage wrote (its
  weight files; the evaluation's results), equal when the two runs computed the same.
- ``value-layers``: one rollout of ``--rows`` prompts with the demo recipe (``--source``'s ``sft/`` and ``reward/``,
  ``--dtype``), then the update's values over it computed from the rollout's output of the value model's frozen
  layers (``Rollout.value_hidden``) and by running every layer: how far apart they are, and each from the
  rollout's own values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def model_dtype(name: str):
    """``--dtype``: ``auto`` is bf16 where bf16 matmuls are native, else fp32."""
    import torch

    from pipeline.modeling import native_bf16_here

    if name == "auto":
        return torch.bfloat16 if native_bf16_here() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def mean_ms(fn, *args, n: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn(*args)`` over ``n`` calls after ``warmup``."""
    for _ in range(warmup):
        fn(*args)
    t = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - t) / n * 1e3


def _attention(q, k, v, backend, kw: dict, backward: bool) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    with torch.set_grad_enabled(backward), sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    if backward:
        out.sum().backward()


def attention(a) -> None:
    import torch
    from torch.nn.attention import SDPBackend

    for length in a.lengths:
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(a.rows, 9, length, 64, dtype=dtype, requires_grad=True) for _ in range(3))
            mask = torch.ones(a.rows, 1, length, length, dtype=torch.bool).tril()
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
                for how, kw in (("causal", dict(is_causal=True)), ("mask", dict(attn_mask=mask))):
                    fwd = mean_ms(_attention, q, k, v, backend, kw, False)
                    both = mean_ms(_attention, q, k, v, backend, kw, True)
                    print(f"attention {a.rows}x{length} {str(dtype)[6:]:8} {name:5} {how:6} "
                          f"forward {fwd:6.2f} ms  forward+backward {both:6.2f} ms", flush=True)  # fmt: skip


def _layer_attention(fn, q, k, v, mask, grad):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Layer(torch.nn.Module):  # what transformers' attention functions read from the module
        num_key_value_groups, is_causal = q.shape[1] // k.shape[1], True

    with torch.set_grad_enabled(grad is not None), sdpa_kernel(SDPBackend.MATH):
        out = fn(Layer(), q, k, v, mask, dropout=0.0, scaling=q.shape[-1] ** -0.5)[0]
    if grad is not None:
        out.backward(grad)
    return out


def grouped_attention(a) -> None:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeline.grouped_attention import grouped_attention as grouped

    gen = torch.Generator().manual_seed(0)
    for length in a.lengths:
        B, H, KV, D = a.rows, 9, 3, 64
        q = torch.randn(B, length, H, D, generator=gen).bfloat16().transpose(1, 2).requires_grad_()
        k, v = (torch.randn(B, length, KV, D, generator=gen).bfloat16().transpose(1, 2).requires_grad_()
                for _ in range(2))  # fmt: skip
        real = torch.arange(length)[None] >= torch.randint(0, 12, (B,), generator=gen)[:, None]
        mask = (torch.ones(length, length, dtype=torch.bool).tril()[None] & real[:, None, :])[:, None]
        grad = torch.randn(B, length, H, D, generator=gen).bfloat16()
        fns = {"sdpa (math)": sdpa_attention_forward, "grouped": grouped}
        best = {name: [float("inf"), float("inf")] for name in fns}
        for _ in range(a.repeats):
            for name, fn in fns.items():
                best[name][0] = min(best[name][0], mean_ms(_layer_attention, fn, q, k, v, mask, None))
                best[name][1] = min(best[name][1], mean_ms(_layer_attention, fn, q, k, v, mask, grad))
        want, got = (_layer_attention(fn, q, k, v, mask, None) for fn in fns.values())
        for name, (fwd, both) in best.items():
            print(f"grouped-attention {B}x{length} {name:12} forward {fwd:6.2f} ms  forward+backward {both:6.2f} ms",
                  flush=True)  # fmt: skip
        print(f"grouped-attention {B}x{length} outputs with the same bits: {(got == want).float().mean().item():.5f}, "
              f"largest difference {(got.float() - want.float()).abs().max().item():.3g}", flush=True)  # fmt: skip


def adamw(a) -> None:
    import torch

    hidden, inter, r = 576, 1536, a.rank  # SmolLM2-135M: q, k, v, o, gate, up, down (in, out)
    projections = [(hidden, 576), (hidden, 192), (hidden, 192), (576, hidden), (hidden, inter), (hidden, inter),
                   (inter, hidden)]  # fmt: skip
    shapes = [s for _ in range(30 + 8) for i, o in projections for s in ((r, i), (o, r))] + [(1, hidden)]
    gen = torch.Generator().manual_seed(0)

    def setup(**kind):
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return params, torch.optim.AdamW(params, lr=1e-4, eps=1e-5, **kind)

    kinds = {"foreach": dict(foreach=True), "fused": dict(fused=True)}
    runs = {name: setup(**kind) for name, kind in kinds.items()}
    best = dict.fromkeys(kinds, float("inf"))
    for _ in range(a.repeats):
        for name, (_, opt) in runs.items():
            best[name] = min(best[name], mean_ms(opt.step, n=10, warmup=1))
    print(f"adamw: {sum(p.numel() for p in runs['fused'][0]) / 1e6:.2f} M parameters in {len(shapes)} tensors; "
          + ", ".join(f"{name} {ms:.1f} ms per step" for name, ms in best.items()), flush=True)  # fmt: skip
    same = []
    for kind in kinds.values():  # the same start and gradients for both
        gen.manual_seed(1)
        same.append(setup(**kind))
    for _ in range(5):
        for _, opt in same:
            opt.step()
    diff = max((x - y).abs().max().item() for x, y in zip(same[0][0], same[1][0]))
    print(f"adamw: largest parameter difference after five steps {diff:.3g}", flush=True)


def _products(x, weights) -> None:
    import torch.nn.functional as F

    for w in weights:
        F.linear(x, w)


def _packed_products(x, packed) -> None:
    from pipeline.packed_linear import _packed_product

    for w in packed:
        _packed_product(x, w, None)


def linear(a) -> None:
    import torch
    import torch.nn.functional as F

    for dtype in (torch.bfloat16, torch.float32):
        for out_f, in_f in ((1536, 576), (576, 1536), (576, 576), (49152, 576)):
            w, x = torch.randn(out_f, in_f, dtype=dtype), torch.randn(8, in_f, dtype=dtype)
            hot = mean_ms(_products, x, [w], n=100) * 1e3
            many = [torch.randn(out_f, in_f, dtype=dtype) for _ in range(max(1, 40_000_000 // (out_f * in_f)))]
            cold = mean_ms(_products, x, many, n=5) * 1e3 / len(many)
            line = (
                f"linear 8 x {in_f} -> {out_f} {str(dtype)[6:]:8} in cache {hot:7.0f} us  from memory {cold:7.0f} us"
            )
            if dtype == torch.bfloat16:
                from pipeline.packed_linear import _pack, _packed_product, supported

                if supported():  # the weight packed once (pipeline/packed_linear.py), in cache and from memory
                    hot_packed = mean_ms(_packed_products, x, [_pack(w)], n=100) * 1e3
                    packed = [_pack(m) for m in many]
                    cold_packed = mean_ms(_packed_products, x, packed, n=5) * 1e3 / len(packed)
                    same = torch.equal(_packed_product(x, packed[0], None), F.linear(x, many[0]))
                    gbs = out_f * in_f * 2 / cold_packed / 1e3  # the weight's bytes over the time
                    line += f"  prepacked: in cache {hot_packed:7.0f} us  from memory {cold_packed:7.0f} us"
                    line += f" ({gbs:.1f} GB/s of weights)  (the same bits: {same})"
                else:
                    line += "  prepacked: no oneDNN bf16 linear on this CPU"
            print(line, flush=True)
    # What the host's memory delivers to this process's threads: a sum over 256 MB, far larger than any cache.
    big = torch.ones(64 * 2**20)
    ms = mean_ms(lambda t: t.sum(), big, n=10)
    print(f"memory read: {big.numel() * 4 / ms / 1e6:.1f} GB/s (a float32 sum over 256 MB)", flush=True)


def backward_products(a) -> None:
    """A frozen layer's input gradient in a LoRA update, ``grad @ W`` (``F.linear``'s backward) against the
    packed product on ``W^T`` packed once (``PackedLinear``'s backward): SmolLM2-135M's seven projections of a
    layer at ``--rows`` rows and its vocabulary projection at 264 (8 responses x 33 positions), in bf16; best of
    three means, and whether the bits are the same."""
    import torch

    from pipeline.packed_linear import _pack, _packed_product, transposed_supported

    torch.set_num_threads(a.threads)
    print(f"backward-products: packed W^T gives the same bits here (checked once per process): "
          f"{transposed_supported()}", flush=True)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    for rows in a.rows:
        total = [0.0, 0.0]
        for n_out, n_in in layer + [(49152, 576)]:
            r = 264 if n_out == 49152 else rows
            w = (torch.randn(n_out, n_in, generator=gen) * 0.05).to(torch.bfloat16)
            g = torch.randn(r, n_out, generator=gen).to(torch.bfloat16)
            wt = _pack(w.t().contiguous())
            plain = min(mean_ms(torch.mm, g, w, n=10) for _ in range(3))
            packed = min(mean_ms(_packed_product, g, wt, None, n=10) for _ in range(3))
            same = torch.equal(torch.mm(g, w), _packed_product(g, wt, None))
            if n_out != 49152:
                total[0], total[1] = total[0] + plain, total[1] + packed
            gflops = 2 * r * n_out * n_in / packed / 1e6
            print(f"backward-products: {r} x {n_out} -> {n_in}: grad @ W {plain:.3f} ms, packed W^T {packed:.3f} ms "
                  f"({gflops:.0f} GFLOP/s), the same bits: {same}", flush=True)  # fmt: skip
        print(f"backward-products: a layer's seven at {rows} rows: grad @ W {total[0]:.2f} ms, packed W^T "
              f"{total[1]:.2f} ms ({total[0] / total[1]:.3f}x)", flush=True)  # fmt: skip


def sft_step(a) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.modeling import contiguous_head, training_attention

    model = contiguous_head(AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (8, a.length))
    mask = torch.ones_like(ids)
    mask[:4, :20] = 0  # some padding, as in a real batch

    def step(math: bool) -> float:
        ctx = training_attention(torch.device("cpu"), "bf16") if math else nullcontext()
        t = time.perf_counter()
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        model.zero_grad()
        return time.perf_counter() - t

    step(False), step(True)  # warm-up
    times = {"default (flash)": [], "training_attention (math)": []}
    for _ in range(a.repeats):
        times["default (flash)"].append(step(False))
        times["training_attention (math)"].append(step(True))
    for name, ts in times.items():
        print(f"sft-step 8x{a.length} {name:26} median {statistics.median(ts):.3f} s  {[round(t, 2) for t in ts]}")


def prompts_of(tok, messages: list[list[dict]]) -> list[str]:
    return [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]


def generation(a) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import benchmarks.ppo_vs_trl as bench
    from pipeline.modeling import contiguous_head
    from pipeline.sampling import InverseCDFSampler, sampling_kwargs

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = contiguous_head(AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).eval())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [json.loads(line) for line in bench.write_prompts(Path(tmp) / "p.jsonl").open()]
    texts = prompts_of(tok, [r["prompt"] for r in rows])  # the PPO benchmark's 8 prompts
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    draw = InverseCDFSampler(record_logprobs=True)
    kw = dict(**sampling_kwargs(0.7, 0, 1.0, draw), max_new_tokens=32, min_new_tokens=32,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    if a.static_cache:
        kw["cache_implementation"] = "static"
    if a.compile:  # transformers compiles the decoding forward only with a static cache, and on a CPU only if asked
        from transformers import CompileConfig

        config = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
        config._compile_all_devices = True  # a class attribute, not an argument
        kw.update(cache_implementation="static", compile_config=config)

    def go_generate() -> float:
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.generate(**enc, **kw)
        draw.take_logprobs()
        return time.perf_counter() - t

    if a.continuous_batching:
        # transformers' continuous batching (paged KV cache, its own scheduler thread) on the same prompts and
        # token count, with its own sampler (no log-probs recorded, so it does strictly less work than ours).
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=32,
                                  eos_token_id=-1, pad_token_id=tok.pad_token_id)  # fmt: skip
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

        def go_batch() -> float:
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model.generate_batch(ids, generation_config=config)
            assert all(len(o.generated_tokens) == 32 for o in out.values()), "continuous batching stopped early"
            return time.perf_counter() - t

    go = go_batch if a.continuous_batching else go_generate
    first = go()
    ts = [go() for _ in range(a.repeats)]
    print(
        f"generation 8 x 32 tokens, {a.threads} threads, static cache {a.static_cache}, torch.compile {a.compile}, "
        f"continuous batching {a.continuous_batching}: {[round(t, 2) for t in ts]} s (the first call: {first:.1f} s)"
    )
    if a.profile:
        from torch.profiler import profile

        with profile() as p:
            go()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


def _benchmark_prompts(tok) -> dict:
    """The PPO benchmark's 8 prompts (``ppo_vs_trl.write_prompts``), chat-formatted and left-padded."""
    import benchmarks.ppo_vs_trl as bench

    with tempfile.TemporaryDirectory() as tmp:
        rows = [json.loads(line) for line in bench.write_prompts(Path(tmp) / "p.jsonl").open()]
    return tok(prompts_of(tok, [r["prompt"] for r in rows]), return_tensors="pt", padding=True,
               add_special_tokens=False, padding_side="left")  # fmt: skip


def _paired_rollouts(label: str, tok, enc, variants: dict, repeats: int) -> None:
    """32 sampled tokens per prompt of ``enc`` through ``pipeline.decoding.generate`` under bf16 autocast (what
    the rollout runs), for each ``{name: (model, generate keywords)}`` of ``variants``: a warm-up, then the
    variants alternating, one seed per round. Prints each one's median seconds per call and whether every round
    drew the same tokens and sampler log-probs in all of them."""
    import torch

    from pipeline import decoding
    from pipeline.sampling import InverseCDFSampler, sampling_kwargs

    def sample(model, seed: int, **kw):
        draw = InverseCDFSampler(record_logprobs=True)
        torch.manual_seed(seed)
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = decoding.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=32,
                                    eos_token_id=-1, pad_token_id=tok.pad_token_id,
                                    **sampling_kwargs(0.7, 0, 1.0, draw), **kw)  # fmt: skip
        return time.perf_counter() - t, out, draw.take_logprobs()

    for model, kw in variants.values():  # warm-up: packs the weights (and the fused copies)
        sample(model, 0, **kw)
    times, same = {name: [] for name in variants}, True
    for seed in range(1, repeats + 1):
        results = [sample(model, seed, **kw) for model, kw in variants.values()]
        for name, (t, _, _) in zip(variants, results):
            times[name].append(t)
        same = same and all(torch.equal(r[1], results[0][1]) and torch.equal(r[2], results[0][2]) for r in results)
    for name, ts in times.items():
        print(f"{label} {name:7}: median {statistics.median(ts):.3f} s ({[round(t, 3) for t in ts]})")
    print(f"{label}: the same tokens and log-probs: {same}")


def packed_generation(a) -> None:
    """The PPO benchmark's 8 prompts x 32 sampled tokens with ``pipeline.decoding.generate`` (what the rollout
    runs), on the model as loaded and on a copy with prepacked linear weights, alternating, each pair from one
    seed: seconds per call, and whether tokens and the sampler's log-probs are the same bits."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.modeling import contiguous_head
    from pipeline.packed_linear import pack_linears

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    plain = contiguous_head(AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).eval())
    plain.requires_grad_(False)
    packed = pack_linears(copy.deepcopy(plain))
    variants = {"plain": (plain, {"fused_steps": False}), "packed": (packed, {"fused_steps": False})}
    _paired_rollouts("packed-generation", tok, _benchmark_prompts(tok), variants, a.repeats)


def fused_decoding(a) -> None:
    """The PPO benchmark's 8 prompts x 32 sampled tokens through ``pipeline.decoding.generate`` on the packed
    bf16 model, its decoding steps through the model's forward and through ``pipeline.fast_decode.Decoder``,
    alternating, one seed per pair: seconds per call, whether tokens and log-probs are the same bits, and one
    step's products alone (seven packed products per layer, and the decoder's four)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import fast_decode, packed_linear
    from pipeline.modeling import inference_model

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = inference_model(AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16))
    reason = fast_decode.unsupported_reason(model)
    if reason is not None:
        raise SystemExit(f"fused-decoding: the decoder does not run this model here: {reason}")
    enc = _benchmark_prompts(tok)
    variants = {"forward": (model, {"fused_steps": False}), "fused": (model, {"fused_steps": True})}
    _paired_rollouts("fused-decoding", tok, enc, variants, a.repeats)

    layers, rows_ = model.model.layers, len(enc["input_ids"])
    x = torch.randn(rows_, 1, model.config.hidden_size).to(torch.bfloat16)
    xi = torch.randn(rows_, 1, model.config.intermediate_size).to(torch.bfloat16)
    fused = fast_decode._fused_weights(model)
    product = packed_linear._packed_product

    def seven():
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(x), mlp.gate_proj(x), mlp.up_proj(x)
            mlp.down_proj(xi)

    def four():
        for qkv, o, gate_up, down in fused:
            product(x, qkv, None), product(x, o, None), product(x, gate_up, None), product(xi, down, None)

    with torch.no_grad():
        for name, fn in (("7 products per layer", seven), ("4 fused products per layer", four)):
            fn()
            t = time.perf_counter()
            for _ in range(20):
                fn()
            print(f"fused-decoding: {name}: {(time.perf_counter() - t) / 20 * 1000:.2f} ms per step of {rows_} rows")


def eval_batch(a) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import decoding
    from pipeline.modeling import contiguous_head
    from pipeline.sampling import sampling_kwargs
    from pipeline.stage_eval import decode_responses
    from reward_models.gold_judge import score as judge

    dtype = model_dtype(a.dtype)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = contiguous_head(AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval())
    path = REPO / "data" / "embedded" / "eval_prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()][:200]
    messages = [r["prompt"] for r in rows]
    texts = prompts_of(tok, messages)

    def sample(batch: int, mode: str, prompts: list[str], seed: int = 0) -> tuple[float, dict]:
        """``mode``: ``generate`` (model.generate, dynamic cache), ``static`` (its static cache), ``compact``
        (pipeline/decoding.py: finished rows leave the batch), ``compact-1pass`` (the same with the prompts in
        one forward). Returns seconds and, with ``--quality``, the
        pass's mean gold score, response length and EOS rate (decoded and judged outside the timing)."""
        torch.manual_seed(seed)
        t, outs = time.perf_counter(), []
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False,
                      padding_side="left")  # fmt: skip
            kw = dict(**sampling_kwargs(0.7), max_new_tokens=64, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
            with torch.no_grad():
                if mode.startswith("compact"):
                    out = decoding.generate(model, **enc, **kw, split_prefill=mode == "compact")
                else:
                    out = model.generate(**enc, **kw, cache_implementation="static" if mode == "static" else None)
            outs.append(out[:, enc["input_ids"].shape[1] :])
        secs = time.perf_counter() - t
        if not a.quality:
            return secs, {}
        responses, length, ended = [], [], []
        for resp in outs:  # decoded as the evaluation stage decodes
            decoded, _, mask, has_eos = decode_responses(tok, resp)
            responses += decoded
            length += mask.sum(1).tolist()
            ended += has_eos.tolist()
        gold = [judge(p, r) for p, r in zip(messages, responses)]
        return secs, {"gold": statistics.mean(gold), "length": statistics.mean(length), "eos": statistics.mean(ended)}

    if any(m.startswith("compact") for m in a.modes) and (why := decoding.can_compact(model)):
        raise SystemExit(f"bench_kernels: --modes compact cannot run on this model: {why}")
    sample(8, "generate", texts[:8])  # warm-up: the first generate of a process pays one-off costs
    times = {(b, m): [] for b in a.batches for m in a.modes}
    stats = {key: [] for key in times}
    for r in range(a.repeats):  # alternating, so that drift hits every setting alike
        for b, m in times:
            secs, st = sample(b, m, texts, seed=r if a.quality else 0)
            times[(b, m)].append(secs)
            stats[(b, m)].append(st)
            if a.quality:
                print(f"eval-batch batch {b}, {m}, seed {r}: {secs:.1f} s, gold {st['gold']:.4f}, "
                      f"length {st['length']:.2f}, EOS {st['eos']:.3f}", flush=True)  # fmt: skip
    for (b, m), ts in times.items():
        print(f"eval-batch 200 prompts x 64 tokens, batch {b}, {m}: {[round(t, 1) for t in ts]} s", flush=True)
    if a.quality and a.repeats > 1:  # mean over seeds, 95% t interval (t quantiles from quality.py's table)
        from benchmarks.quality import t_interval

        for (b, m), sts in stats.items():
            parts = []
            for k in ("gold", "length", "eos"):
                mean, lo, hi = t_interval([s[k] for s in sts])
                parts.append(f"{k} {mean:.4f} [{lo:.4f}, {hi:.4f}]")
            print(f"eval-batch batch {b}, {m}, {a.repeats} seeds: " + ", ".join(parts), flush=True)
    if a.profile:  # one more pass of the first setting under torch.profiler
        from torch.profiler import profile

        b, m = next(iter(times))
        with profile() as p:
            print(f"eval-batch profiled: batch {b}, {m}: {sample(b, m, texts)[0]:.1f} s", flush=True)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


def scoring(a) -> None:
    """The PPO rollout's log-prob forward at the demo's sizes: ``--rows`` PPO prompts with responses sampled
    by the model (at most 64 tokens), scored as one padded forward and through ``decoding.scoring_forward`` at
    several chunk sizes, alternating."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import decoding
    from pipeline.modeling import contiguous_head
    from pipeline.sampling import sampling_kwargs
    from pipeline.sequences import response_mask

    dtype = model_dtype(a.dtype)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = contiguous_head(AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval())
    path = REPO / "data" / "embedded" / "ppo_prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()][: a.rows]
    enc = tok(prompts_of(tok, [r["prompt"] for r in rows]), return_tensors="pt", padding=True,
              add_special_tokens=False, padding_side="left")  # fmt: skip
    torch.manual_seed(0)
    out = decoding.generate(model, **enc, **sampling_kwargs(0.7), max_new_tokens=64, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)  # fmt: skip
    P = enc["input_ids"].shape[1]
    out = torch.nn.functional.pad(out, (0, P + 64 - out.shape[1]), value=tok.pad_token_id)
    mask, _ = response_mask(out[:, P:], tok.eos_token_id)
    qr = torch.cat([out[:, :P], out[:, P:].masked_fill(~mask, tok.pad_token_id)], 1)
    am = torch.cat([enc["attention_mask"], mask.long()], 1)

    run = decoding.causal_lm_run(model)
    settings = ["one forward"] + [str(c) for c in a.chunks]
    times = {s: [] for s in settings}
    with torch.no_grad():
        for _ in range(a.repeats + 1):  # the first round is a warm-up
            for s in settings:
                t = time.perf_counter()
                if s == "one forward":
                    decoding.scoring_forward(run, model, qr, am, P, 65, split=False)
                else:
                    decoding.scoring_forward(run, model, qr, am, P, 65, chunk_tokens=int(s))
                times[s].append(time.perf_counter() - t)
    real = int(am.sum())
    print(f"scoring {a.rows} rows, {qr.shape[1]} columns, {real} real tokens ({1 - real / qr.numel():.0%} padding), "
          f"{dtype}", flush=True)  # fmt: skip
    for s, ts in times.items():
        label = s if s == "one forward" else f"scoring_forward, chunks of {s} tokens"
        print(f"scoring: {label}: {[round(t, 2) for t in ts[1:]]} s", flush=True)


def reward(a) -> None:
    """Reward-model scoring of the embedded task's held-out preference pairs (``--pairs`` of them, both replies:
    what the reward stage's held-out accuracy scores; PPO and the evaluation score the same way): through
    ``reward_scores``, one right-padded forward per batch against ``scoring_forward`` (the shared system turn
    once, rows in length-sorted chunks), and ``reward_pair_scores`` (``batch`` pairs at a time packed as prefix
    trees, each pair's prompt once), alternating after a small warm-up; and the largest difference between each
    path's scores and one forward's."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from reward_models.learned import load_reward_tokenizer, reward_pair_scores, reward_scores

    dtype = model_dtype(a.dtype)
    tok = load_reward_tokenizer(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=dtype).eval()
    path = REPO / "data" / "embedded" / "pref_test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()][: a.pairs]
    prompts = [r["prompt"] for r in rows] * 2
    replies = [r["chosen"][0]["content"] for r in rows] + [r["rejected"][0]["content"] for r in rows]
    n = len(rows)
    paths = {
        "one forward per batch": lambda b, k=None: reward_scores(model, tok, prompts[:k], replies[:k], b, split=False),
        "scoring_forward": lambda b, k=None: reward_scores(model, tok, prompts[:k], replies[:k], b),
        "pairs packed": lambda b, k=None: torch.cat(
            reward_pair_scores(model, tok, prompts[: k or n], replies[: k or n], replies[n : n + (k or n)], b // 2)
        ),
    }
    for run in paths.values():  # warm-up: the first forwards of a process pay one-off costs
        run(8, 8)
    times, scores = {}, {}
    for _ in range(a.repeats):
        for b in a.batches:
            for label, run in paths.items():
                t = time.perf_counter()
                scores[(b, label)] = run(b)
                times.setdefault((b, label), []).append(time.perf_counter() - t)
    for (b, label), ts in times.items():
        diff = (scores[(b, label)] - scores[(b, "one forward per batch")]).abs().max().item()
        print(f"reward {len(replies)} replies, batch {b} replies, {label}: {[round(t, 1) for t in ts]} s "
              f"(largest score difference to one forward: {diff:.2e})", flush=True)  # fmt: skip


def reward_chunks(a) -> None:
    """Forward + backward of the reward stage's training loss on its recipe's first ``--steps`` random batches
    (``configs/reward_demo.yaml``: 8 pairs, LoRA on the top 8 layers, fp32 where bf16 is emulated) from the SFT
    model ``--model``: one forward over the padded batch against ``stage_reward.PairForward`` with no prefix
    shared at each ``--chunks`` token budget (``PAIR_CHUNK_TOKENS``) and as the stage runs it (packed prefix
    trees, each pair's prompt once) at each ``--pairs`` budget, alternating after a warm-up; the tokens each
    computes, padding included, against the batches' real tokens; the largest loss difference to one forward."""
    import yaml
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig

    from pipeline import stage_reward
    from pipeline.config import StageArguments
    from pipeline.modeling import load_tokenizer, lora_config

    recipe = yaml.safe_load((REPO / "configs" / "reward_demo.yaml").read_text())
    tok = load_tokenizer(a.model)
    lora = argparse.Namespace(lora_r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_target_modules=None)
    set_seed(42)
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=model_dtype(a.dtype))
        model.config.pad_token_id = tok.pad_token_id
        center = stage_reward.DEFAULTS["center_rewards_coefficient"]
        args = RewardConfig(output_dir=tmp, per_device_train_batch_size=recipe["per_device_train_batch_size"],
                            max_length=recipe["max_length"], use_cpu=True, report_to="none", bf16=False, seed=42,
                            center_rewards_coefficient=center)  # fmt: skip
        trainer = stage_reward.reward_trainer_class()(
            model=model, args=args, train_dataset=stage_reward.load_pairs(StageArguments())[0], processing_class=tok,
            peft_config=lora_config(lora, "SEQ_CLS", ["score"], model, recipe["lora_layers"]),
        )  # fmt: skip
        set_seed(42)
        batches = []
        for batch in trainer.get_train_dataloader():
            batches.append(batch)
            if len(batches) == a.steps:
                break
    net = trainer.model
    net.train()
    backbone = net.get_base_model().model
    computed = {}
    grouping = stage_reward.PairForward._grouping

    def run(mode: tuple[str, int]) -> tuple[float, list[float]]:
        kind, budget = mode
        stage_reward.PAIR_CHUNK_TOKENS = budget
        stage_reward.PairForward._grouping = grouping if kind == "pairs" else (lambda *_: None)
        shapes = []
        hook = backbone.register_forward_pre_hook(lambda _m, a, kw: shapes.append(kw.get("input_ids", *a[:1]).shape),
                                                  with_kwargs=True)  # fmt: skip
        losses, t = [], time.perf_counter()
        for batch in batches:
            loss = trainer.compute_loss(net, dict(batch))
            loss.backward()
            net.zero_grad()
            losses.append(loss.item())
        hook.remove()
        stage_reward.PairForward._grouping = grouping
        computed[mode] = sum(r * w for r, w in shapes)
        return time.perf_counter() - t, losses

    one = ("chunks", 10**9)  # a budget no batch reaches: one forward
    modes = [one, *[("chunks", b) for b in a.chunks], *[("pairs", b) for b in a.pairs]]
    run(one), run(modes[-1])  # warm-up
    times, losses = {m: [] for m in modes}, {}
    for _ in range(a.repeats):
        for m in modes:
            t, losses[m] = run(m)
            times[m].append(t)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    for m in modes:
        label = "one forward" if m == one else f"{'packed' if m[0] == 'pairs' else 'chunks'} of {m[1]} tokens"
        diff = max(abs(x - y) for x, y in zip(losses[m], losses[one]))
        print(f"reward-chunks {a.steps} batches, {label:27}: median {statistics.median(times[m]):.2f} s "
              f"{[round(t, 2) for t in times[m]]}; tokens computed {computed[m]} ({computed[m] / real:.3f} of the "
              f"batches' real tokens); largest loss difference {diff:.1e}", flush=True)  # fmt: skip


def update_chunks(a) -> None:
    """The PPO update's forward + backward on the demo recipe's own rollouts (``configs/ppo_demo.yaml`` on
    ``--source``'s ``sft/`` and ``reward/``, ``--iterations`` iterations): after each rollout, every micro-batch
    of a fixed shuffle runs ``PPOTrainer._train_forward`` and a backward as one padded forward, as one forward
    cut to the micro-batch's longest prompt and response, and at each ``--chunks`` token budget
    (``--update_chunk_tokens``: chunks where they save ``CHUNK_MIN_SAVING``), alternating, with no optimizer
    step; then the iteration's real update runs. Prints seconds and tokens computed per setting."""
    import torch

    from pipeline import stage_ppo
    from pipeline.ppo import trainer as T

    one, cut = None, 10**9  # one padded forward; a budget no micro-batch reaches: one forward cut to its rows
    budgets = [one, cut, *a.chunks]
    times, tokens, real = {b: [] for b in budgets}, dict.fromkeys(budgets, 0), [0]
    update, seen = T.PPOTrainer.update, {"n": 0}

    def timed(self, ro):
        seen["n"] += 1
        B, P = ro.mask.shape[0], ro.context_length
        micro = self.args.per_device_train_batch_size
        order = torch.randperm(B, generator=torch.Generator().manual_seed(seen["n"]))
        batches = [order[i : i + micro] for i in range(0, B, micro)]
        own_budget = self.chunk_tokens

        def run(budget: int) -> float:
            self.chunk_tokens = budget
            t = time.perf_counter()
            for inds in batches:
                qr, am, mask = ro.query_response[inds], ro.attention_mask[inds], ro.mask[inds]
                lp, _, values = self._train_forward(qr, am, P)
                loss = torch.where(mask, lp, 0.0).sum() / mask.sum()
                if values is not None:
                    loss = loss + torch.where(mask, values[:, P - 1 : -1], 0.0).pow(2).sum() / mask.sum()
                loss.backward()
                self.model.zero_grad()
            return time.perf_counter() - t

        self.model.train()
        run(budgets[-1])  # warm-up
        for _ in range(a.repeats):
            for b in budgets:
                times[b].append(run(b))
        for inds in batches:
            am = ro.attention_mask[inds]
            real[0] += int(am.sum())
            for b in budgets:
                self.chunk_tokens = b
                plan = self.update_plan(am, P)
                tokens[b] += am.numel() if plan is None else sum(len(rows) * (w + rc) for rows, w, rc in plan)
        self.chunk_tokens = own_budget
        return update(self, ro)

    T.PPOTrainer.update = timed
    with tempfile.TemporaryDirectory() as tmp:
        demo_source(a.source, tmp)
        argv = ["--config", str(REPO / "configs" / "ppo_demo.yaml"), "--artifact_dir", tmp,
                "--stop_after_iterations", str(a.iterations), "--sample_every", "0"]  # fmt: skip
        assert stage_ppo.cli(argv) == 0
    for b in budgets:
        label = {one: "one padded forward", cut: "one forward, cut"}.get(b, f"chunks of {b} tokens")
        print(f"update-chunks {a.iterations} iterations, {label:20}: median {statistics.median(times[b]):.2f} s "
              f"per iteration {[round(t, 2) for t in times[b]]}; tokens computed {tokens[b]} "
              f"(padding {1 - real[0] / tokens[b]:.3f})", flush=True)  # fmt: skip


def ppo_profile(a) -> None:
    from torch.profiler import profile

    from pipeline.ppo import trainer as T

    update, seen = T.PPOTrainer.update, {"n": 0}

    def profiled(self, ro):
        seen["n"] += 1
        if seen["n"] != a.iteration:
            return update(self, ro)
        with profile() as p:
            out = update(self, ro)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows), flush=True)
        return out

    T.PPOTrainer.update = profiled
    ours_in_process(a.source, a.iteration)


def ours_in_process(source, iterations: int) -> None:
    """Our PPO stage in this process at the anchor benchmark's sizes (``benchmarks/ppo_vs_trl.py``: its prompts and
    flags), on ``source``'s ``sft/`` and ``reward/``, for ``iterations`` iterations, into a temporary directory;
    for benchmarks that patch the stage's functions first. Imported here, after any change to ``sys.path``."""
    import benchmarks.ppo_vs_trl as bench
    from pipeline import stage_ppo

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        bench.write_prompts(prompts)
        sizes = argparse.Namespace(source=Path(source), iterations=iterations, seed=42)
        stage_ppo.cli(bench.ours_argv(sizes, Path(tmp) / "run", prompts, []))


# (owner module, attribute, label) of what ``rollout-split`` times: the rollout engine's pieces and the update's.
SPLIT_POINTS = [
    ("pipeline.ppo.trainer:PPOTrainer", "_generate", "generate (all)"),
    ("pipeline.ppo.generation:MergedPolicy", "sync", "  weight sync"),
    ("pipeline.fast_decode", "_fused_weights", "  stacked weights packed"),
    ("pipeline.decoding", "prefill", "  prompt forward"),
    ("pipeline.fast_decode:Decoder", "step", "  decoding steps"),
    ("pipeline.sampling:InverseCDFSampler", "__call__", "  sampler"),
    ("pipeline.ppo.trainer:PolicyAndValue", "policy_logits", "policy forward (rollout and reference)"),
    ("pipeline.ppo.trainer:PolicyAndValue", "values", "value forward"),
    ("pipeline.ppo.trainer:PPOTrainer", "update", "update"),
]


def rollout_split(a) -> None:
    """Wall seconds per iteration of the pieces of ``SPLIT_POINTS`` in our PPO stage at the anchor benchmark's sizes
    (``benchmarks/ppo_vs_trl.py``), over the iterations after the first; with ``--commits``, each revision's code
    (a git worktree) in a fresh process, one after another. Timers around functions, no profiler: the calls run
    as they do in the stage."""
    import importlib
    import subprocess

    if a.commits:
        with git_checkouts(a.commits) as trees:
            for rev in a.commits:  # in the order given, repeats included (A B A B pairs)
                print(f"rollout-split: {rev}", flush=True)
                subprocess.run([sys.executable, __file__, "rollout-split", "--source", str(Path(a.source).resolve()),
                                "--iterations", str(a.iterations), "--code", str(trees[rev])], check=True)  # fmt: skip
        return
    from pipeline.allocator import restart_with_tuned_malloc

    restart_with_tuned_malloc()  # the malloc settings the stage's own entry point runs under
    if a.code:  # another revision's pipeline/ and benchmarks/, ahead of this checkout's
        sys.path.insert(0, a.code)
        for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
            del sys.modules[name]  # (the allocator module, imported from this checkout above)
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    iteration = {"n": 0}

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if iteration["n"] > 1:  # after the first iteration (its first calls pack, compile and warm up)
                    seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t
                    counts[label] = counts.get(label, 0) + 1

        return wrapper

    for where, attr, label in SPLIT_POINTS:
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        setattr(owner, attr, timed(getattr(owner, attr), label))
    trainer = importlib.import_module("pipeline.ppo.trainer").PPOTrainer
    rollout = trainer.rollout

    def counted(self, prompts):
        iteration["n"] += 1
        return rollout(self, prompts)

    trainer.rollout = counted
    ours_in_process(a.source, a.iterations)
    n = a.iterations - 1
    print(f"rollout-split: per iteration over iterations 2-{a.iterations} ({a.code or 'this checkout'})")
    for _, _, label in SPLIT_POINTS:
        if label in seconds:
            print(f"rollout-split: {label:40s} {seconds[label] / n * 1e3:8.1f} ms  ({counts[label] / n:.1f} calls)")


def precision_flags(dtype: str) -> list[str]:
    """The PPO stage's --dtype and --mixed_precision (the autocast that dtype needs) for a benchmark's --dtype."""
    from pipeline.stage_ppo import PRECISION_PAIRS

    return [] if dtype == "auto" else ["--dtype", dtype, "--mixed_precision", PRECISION_PAIRS[dtype] or "no"]


# The artifacts each demo stage starts from.
STAGES_BEFORE = {"sft": (), "reward": ("sft",), "ppo": ("sft", "reward"), "eval": ("sft", "reward", "ppo")}


def demo_source(source, tmp, stage: str = "ppo") -> None:
    """Hard links of ``source``'s artifacts of the stages before ``stage`` (for PPO: ``sft/`` and ``reward/``)
    into the artifact directory ``tmp``: what the demo recipe's ``stage`` starts from, untouched by the run."""
    from pipeline.artifacts import link_tree

    for before in STAGES_BEFORE[stage]:
        link_tree(Path(source).resolve() / before, Path(tmp) / before)


def run_demo_stage(source, stage: str, max_steps: int, program: list[str], cwd, env=None, extra=()) -> tuple:
    """The demo recipe's ``stage`` for ``max_steps`` steps, logging once, as ``program`` plus its flags (a fresh
    process in ``cwd``, its output discarded) on a new artifact directory holding ``source``'s artifacts of the
    stages before it: ``(the stage manifest's metrics, wall seconds)``."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        demo_source(source, tmp, stage)
        cmd = [*program, "--config", f"configs/{stage}_demo.yaml", "--artifact_dir", tmp, "--max_steps",
               str(max_steps), "--logging_steps", str(max_steps), *extra]  # fmt: skip
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        return json.loads((Path(tmp) / stage / "manifest.json").read_text())["metrics"], wall


def demo_ppo_run(a, cwd: Path, flags: list[str]) -> list[dict]:
    """The demo recipe's PPO stage on ``a.source``'s models for ``a.iterations`` iterations, a fresh process in
    the checkout ``cwd``, with ``flags`` and ``a.dtype``'s precision: its metrics rows."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        demo_source(a.source, tmp)
        cmd = [sys.executable, "-m", "pipeline.stage_ppo", "--config", "configs/ppo_demo.yaml", "--artifact_dir", tmp,
               "--stop_after_iterations", str(a.iterations), "--sample_every", "0", *flags,
               *precision_flags(a.dtype)]  # fmt: skip
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
        metrics = Path(tmp) / "ppo-run" / "metrics.jsonl"
        return [json.loads(line) for line in metrics.read_text().splitlines()]


def rollout_logprobs(a) -> None:
    runs = {"forward": [], "sampler": []}
    for _ in range(a.rounds):
        for mode, rows in runs.items():
            rows.append(demo_ppo_run(a, REPO, ["--rollout_logprobs", mode]))
            it = [r["time/iteration_s"] for r in rows[-1]]
            print(f"rollout-logprobs {mode:8} run {len(rows)}: s/iteration {[round(t, 2) for t in it]}", flush=True)
    for mode, rows in runs.items():
        every = [r for run in rows for r in run]

        def med(key: str, every=every) -> float:
            return statistics.median(r.get(key, 0.0) for r in every)

        print(f"rollout-logprobs {mode:8}: median s/iteration {med('time/iteration_s'):.2f}, rollout "
              f"{med('time/rollout_s'):.2f}, policy forward {med('time/policy_forward_s'):.2f}, update "
              f"{med('time/update_s'):.2f}; token-prob error max "
              f"{max(r['val/sampler_token_prob_error'] for r in every):.6f}")  # fmt: skip
        print(f"  KL per iteration {[round(r['objective/kl'], 4) for r in rows[0]]}; "
              f"scores {[round(r['objective/scores'], 4) for r in rows[0]]}")  # fmt: skip


@contextlib.contextmanager
def git_checkouts(commits: list[str]):
    """``{revision: path}``: each distinct revision's code as a temporary detached git worktree, removed
    afterwards (a revision named twice, as in an A-B-A-B comparison, gets one worktree)."""
    import subprocess

    with tempfile.TemporaryDirectory() as trees:
        trees_by_rev = {}
        try:
            for rev in dict.fromkeys(commits):
                trees_by_rev[rev] = Path(trees) / f"tree-{len(trees_by_rev)}"
                subprocess.run(["git", "worktree", "add", "--detach", str(trees_by_rev[rev]), rev], cwd=REPO,
                               check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            yield trees_by_rev
        finally:
            for tree in trees_by_rev.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


def ppo_checkouts(a) -> None:
    runs = {rev: [] for rev in a.commits}
    with git_checkouts(a.commits) as checkouts:
        for _ in range(a.rounds):
            for rev, rows in runs.items():
                rows.append(demo_ppo_run(a, checkouts[rev], []))
                it = [r["time/iteration_s"] for r in rows[-1]]
                print(f"ppo-checkouts {rev} run {len(rows)}: s/iteration {[round(t, 2) for t in it]}", flush=True)
    phases = ["iteration", "generate", "policy_forward", "value_forward", "reference_forward", "reward", "update"]
    for rev, rows in runs.items():
        # Every iteration, and the first alone: until two versions' runs part (a different sample), they time
        # the same work; after, their responses (and so their cost) differ.
        for label, every in (
            ("every iteration", [r for run in rows for r in run]),
            ("first", [run[0] for run in rows]),
        ):
            medians = {p: statistics.median(r.get(f"time/{p}_s", 0.0) for r in every) for p in phases}
            print(f"ppo-checkouts {rev}: {label}, median s " + ", ".join(f"{p} {t:.2f}" for p, t in medians.items()))
        print(f"  KL per iteration {[round(r['objective/kl'], 5) for r in rows[0]]}; scores "
              f"{[round(r['objective/scores'], 5) for r in rows[0]]}; entropy "
              f"{[round(r['objective/entropy'], 4) for r in rows[0]]}; response length "
              f"{[round(r['val/response_length'], 2) for r in rows[0]]}")  # fmt: skip


def stage_checkouts(a) -> None:
    """The demo recipe's SFT or reward stage for ``--max_steps`` steps from each revision, alternating: the
    trainer's own runtime, the final loss (the same bits or not) and, for the reward stage, the held-out
    accuracy and the whole stage's wall time."""
    runs = {rev: [] for rev in a.commits}
    with git_checkouts(a.commits) as checkouts:
        for _ in range(a.rounds):
            for rev, rows in runs.items():
                program = [sys.executable, "-m", f"pipeline.stage_{a.stage}"]  # restarts itself with tuned malloc
                metrics, wall = run_demo_stage(a.source, a.stage, a.max_steps, program, cwd=checkouts[rev])
                last = metrics["log_history"][-1]
                rows.append({"runtime": last["train_runtime"], "loss": last["train_loss"], "wall": wall,
                             "test": metrics.get("test")})  # fmt: skip
                print(f"stage-checkouts {a.stage} {rev} run {len(rows)}: train {last['train_runtime']:.1f} s, "
                      f"loss {last['train_loss']!r}, stage wall {wall:.1f} s, held-out {metrics.get('test')}",
                      flush=True)  # fmt: skip
    for rev, rows in runs.items():
        print(
            f"stage-checkouts {a.stage} {rev}: median train {statistics.median(r['runtime'] for r in rows):.1f} s, "
            f"stage wall {statistics.median(r['wall'] for r in rows):.1f} s, losses {[r['loss'] for r in rows]}"
        )


# Runs one stage's ``cli`` with its trainer class (``ours``) or TRL's own (``trl``); see ``stage_vs_trl``.
_STAGE_DRIVER = """
import sys

import trl

import pipeline.modeling
import pipeline.packed_linear
from pipeline import stage_sft, stage_reward

stage = {"sft": stage_sft, "reward": stage_reward}[sys.argv[1]]
if sys.argv[2] == "trl":
    stage_sft.completion_trainer_class = lambda: trl.SFTTrainer
    stage_reward.reward_trainer_class = lambda: trl.RewardTrainer
    pipeline.modeling.contiguous_head = lambda model: model
    pipeline.packed_linear.pack_linears = lambda model: model
sys.exit(stage.cli(sys.argv[3:]))
"""


def stage_vs_trl(a) -> None:
    """The demo recipe's SFT or reward stage for ``--max_steps`` steps with the stage's trainer and with TRL's
    own ``SFTTrainer`` / ``RewardTrainer`` (and without the stage's model set-up: the contiguous head input, the
    prepacked frozen weights), alternating for ``--rounds`` rounds, each a fresh process with the stage's malloc
    settings: the trainer's runtime and its final training loss."""
    from pipeline import allocator

    # The held-out scoring after the reward stage's training is not timed: a token amount of it.
    extra = ["--max_eval_samples", "8"] if a.stage == "reward" else []
    runs = {"trl": [], "ours": []}
    for _ in range(a.rounds):
        for variant, rows in runs.items():
            program = [sys.executable, "-c", _STAGE_DRIVER, a.stage, variant]  # a driver: no restart of its own
            metrics, _ = run_demo_stage(a.source, a.stage, a.max_steps, program, REPO, allocator.tuned_env(), extra)
            last = metrics["log_history"][-1]
            rows.append({"runtime": last["train_runtime"], "loss": last["train_loss"]})
            print(f"stage-vs-trl {a.stage} {variant:4} run {len(rows)}: train {last['train_runtime']:.1f} s, "
                  f"loss {last['train_loss']!r}", flush=True)  # fmt: skip
    medians = {v: statistics.median(r["runtime"] for r in rows) for v, rows in runs.items()}
    for variant, rows in runs.items():
        print(f"stage-vs-trl {a.stage} {variant:4}: median train {medians[variant]:.1f} s for {a.max_steps} steps "
              f"({a.max_steps / medians[variant]:.3f} steps/s), losses {[r['loss'] for r in rows]}")  # fmt: skip
    print(f"stage-vs-trl {a.stage}: ours {medians['trl'] / medians['ours']:.2f}x TRL's steps/s")


def stage_digest(stage_dir: Path) -> str:
    """sha256 of what a stage computed: its weight files, or the evaluation's per-checkpoint results without
    their paths (the artifact directory differs between runs)."""
    import hashlib

    h = hashlib.sha256()
    if stage_dir.name == "eval":
        for entry in json.loads((stage_dir / "results.json").read_text())["checkpoints"].values():
            h.update(json.dumps({k: v for k, v in entry.items() if k != "path"}, sort_keys=True).encode())
    for f in sorted(stage_dir.rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def malloc(a) -> None:
    import os
    import shlex
    import subprocess

    from pipeline import allocator

    runs = {"default": [], "tuned": []}
    for _ in range(a.rounds):
        for mode, rows in runs.items():
            with tempfile.TemporaryDirectory() as tmp:
                demo_source(a.source, tmp, a.stage)
                env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
                env[allocator.OPT_OUT] = "0" if mode == "default" else "1"
                cmd = [sys.executable, "-m", f"pipeline.stage_{a.stage}", "--config", f"configs/{a.stage}_demo.yaml",
                       "--artifact_dir", tmp, *shlex.split(a.flags)]  # fmt: skip
                t = time.perf_counter()
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
                proc.returncode = os.waitstatus_to_exitcode(status)
                wall = time.perf_counter() - t
                if proc.returncode:
                    raise SystemExit(f"malloc: {shlex.join(cmd)} failed (exit {proc.returncode})")
                row = {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "faults": usage.ru_minflt,
                       "rss_gb": usage.ru_maxrss / 2**20, "digest": stage_digest(Path(tmp) / a.stage)}  # fmt: skip
            rows.append(row)
            print(f"malloc {a.stage} {mode:7} run {len(rows)}: wall {row['wall']:.1f} s, user {row['user']:.1f}, "
                  f"sys {row['sys']:.1f}, {row['faults'] / 1e6:.2f}M faults, peak RSS {row['rss_gb']:.2f} GB, "
                  f"digest {row['digest']}", flush=True)  # fmt: skip
    for mode, rows in runs.items():
        print(
            f"malloc {a.stage} {mode:7}: median wall {statistics.median(r['wall'] for r in rows):.1f} s, "
            f"sys {statistics.median(r['sys'] for r in rows):.1f} s, digests {sorted({r['digest'] for r in rows})}"
        )


def value_layers(a) -> None:
    import torch
    from accelerate import Accelerator

    from pipeline.stage_ppo import check_args, make_parser, setup

    with tempfile.TemporaryDirectory() as tmp:
        demo_source(a.source, tmp)
        n, half = str(a.rows), str(a.rows // 2)
        argv = ["--config", str(REPO / "configs" / "ppo_demo.yaml"), "--artifact_dir", tmp, "--rollout_batch_size", n,
                "--local_rollout_forward_batch_size", n, "--num_mini_batches", "2", "--per_device_train_batch_size",
                half, *precision_flags(a.dtype)]  # fmt: skip
        stage, model_args, args = make_parser().parse_args_and_config(args=argv, fail_with_unknown_args=True)[:3]
        check_args(model_args, args, has_cuda=False)
        trainer = setup(stage, model_args, args, Accelerator(cpu=True, mixed_precision=args.mixed_precision))
        ro = trainer.rollout(trainer.prompts[: a.rows])
        qr, am, P = ro.query_response, ro.attention_mask, ro.context_length
        mask = am[:, P:].bool()
        with torch.no_grad():
            reused = trainer._train_forward(qr, am, P, ro.value_hidden)[2][:, P - 1 : -1][mask]
            every = trainer._train_forward(qr, am, P)[2][:, P - 1 : -1][mask]
    gap, own = (reused - every).abs(), ro.values[mask]
    print(f"value-layers {args.mixed_precision}, from layer {trainer.value_from_layer}, {a.rows} rows, "
          f"{int(mask.sum())} tokens: |reused - every layer| max {gap.max():.4f} mean {gap.mean():.4f}; mean |value| "
          f"{every.abs().mean():.4f}; against the rollout's values: reused max {(reused - own).abs().max():.4f}, "
          f"every layer max {(every - own).abs().max():.4f}")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("attention")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[70, 128, 256])
    p = sub.add_parser("grouped-attention", help="transformers' SDPA (math kernel) against grouped_attention")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[72, 128])
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("adamw", help="one AdamW step over the PPO demo's adapters: foreach against fused")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    sub.add_parser("linear")
    p = sub.add_parser("backward-products", help="a frozen layer's input gradient: grad @ W against packed W^T")
    p.add_argument("--rows", type=int, nargs="+", default=[560, 2000])
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("sft-step")
    p.add_argument("--model", required=True)
    p.add_argument("--length", type=int, default=118)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("generation")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--static_cache", action="store_true")
    p.add_argument("--continuous_batching", action="store_true", help="transformers' generate_batch instead")
    p.add_argument("--compile", action="store_true", help="a static cache and a compiled decoding forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="then one more generation under torch.profiler")
    p = sub.add_parser("packed-generation", help="rollout sampling with and without prepacked weights")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("fused-decoding", help="decoding steps through the model's forward and fast_decode.Decoder")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("eval-batch")
    p.add_argument("--model", required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 100, 200])
    p.add_argument(
        "--modes",
        nargs="+",
        default=["generate", "compact"],
        choices=["generate", "static", "compact", "compact-1pass"],
        help="generate (dynamic KV cache), static (its static KV cache), compact (pipeline/decoding.py), "
        "compact-1pass (the same, its prompts as one forward: no shared prefix, no length-sorted chunks)",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="then one more pass of the first setting, profiled")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bf16 where bf16 matmuls are native, else fp32")  # fmt: skip
    p.add_argument(
        "--quality",
        action="store_true",
        help="sample repeat r with seed r and print each pass's gold score, length and EOS rate, then their means "
        "over seeds with 95%% t intervals: does a decoding path change what is sampled?",
    )
    p = sub.add_parser("scoring")
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p = sub.add_parser("reward")
    p.add_argument("--model", required=True, help="a reward model directory (reward/model)")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--batches", type=int, nargs="+", default=[32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p = sub.add_parser("reward-chunks")
    p.add_argument("--model", required=True, help="the SFT model the reward model starts from (sft/model)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--chunks", type=int, nargs="*", default=[1024], help="row chunks, no prefix shared")
    p.add_argument("--pairs", type=int, nargs="*", default=[1024], help="packed prefix trees (the default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p = sub.add_parser("update-chunks")
    p.add_argument("--source", required=True, help="an artifact directory holding sft/ and reward/")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--repeats", type=int, default=2)
    p = sub.add_parser("ppo-profile")
    p.add_argument("--source", required=True)
    p.add_argument("--iteration", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p = sub.add_parser("rollout-split", help="wall time of the rollout's and update's pieces, per iteration")
    p.add_argument("--source", required=True, help="an artifact directory holding sft/ and reward/")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument(
        "--commits", nargs="*", default=[], help="git revisions to time one after another (repeats allowed)"
    )
    p.add_argument("--code", default=None, help=argparse.SUPPRESS)  # a revision's checkout (with --commits)
    p = sub.add_parser("ppo-checkouts")
    p.add_argument("--source", required=True, help="an artifact directory holding sft/ and reward/")
    p.add_argument("--commits", nargs="+", required=True, help="git revisions of the code to compare")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p = sub.add_parser("stage-checkouts", help="the demo's SFT or reward stage from several git revisions")
    p.add_argument("--stage", choices=("sft", "reward"), required=True)
    p.add_argument("--source", help="an artifact directory with sft/ (for --stage reward)")
    p.add_argument("--commits", nargs="+", required=True, help="git revisions to compare")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p = sub.add_parser("stage-vs-trl", help="the demo's SFT or reward stage with its trainer and with TRL's own")
    p.add_argument("--stage", choices=("sft", "reward"), required=True)
    p.add_argument("--source", help="an artifact directory with sft/ (for --stage reward)")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p = sub.add_parser("malloc", help="a demo stage with glibc's default malloc and with the tuned one")
    p.add_argument("--stage", choices=("sft", "reward", "ppo", "eval"), required=True)
    p.add_argument("--source", required=True, help="an artifact directory with the stages before --stage")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--flags", default="", help="more flags for the stage, one string")
    p = sub.add_parser("value-layers")
    p.add_argument("--source", required=True, help="an artifact directory holding sft/ and reward/")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p = sub.add_parser("rollout-logprobs")
    p.add_argument("--source", required=True, help="an artifact directory holding sft/ and reward/")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the stage's bases and autocast")  # fmt: skip
    a = ap.parse_args(argv)
    {"attention": attention, "grouped-attention": grouped_attention, "adamw": adamw, "linear": linear,
     "backward-products": backward_products, "sft-step": sft_step, "generation": generation,
     "packed-generation": packed_generation, "fused-decoding": fused_decoding, "eval-batch": eval_batch,
     "scoring": scoring, "reward": reward,
     "reward-chunks": reward_chunks, "update-chunks": update_chunks, "ppo-profile": ppo_profile,
     "rollout-logprobs": rollout_logprobs, "ppo-checkouts": ppo_checkouts,
     "value-layers": value_layers, "stage-checkouts": stage_checkouts, "malloc": malloc,
     "stage-vs-trl": stage_vs_trl, "rollout-split": rollout_split}[a.what](a)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
