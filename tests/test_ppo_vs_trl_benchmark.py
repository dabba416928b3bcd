"""benchmarks/ppo_vs_trl.py: the FLOP count of a run and the ratios of the summary (the timed runs themselves
are the benchmark, not a test; the anchor needs its own environment). And benchmarks/rule_reward_seeds.py."""

import importlib.util
import json

import pytest
import torch

from pipeline.artifacts import REPO_ROOT

spec = importlib.util.spec_from_file_location("ppo_vs_trl", REPO_ROOT / "benchmarks" / "ppo_vs_trl.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_flop_count_of_each_phase(tiny_artifacts, prompts_file, tmp_path, one_thread, fresh_accelerate_state):
    from pipeline.ppo import trainer

    clock = trainer.PhaseClock.__call__
    out = tmp_path / "flops.json"
    argv = ["--artifact_dir", str(tiny_artifacts), "--dataset_name", str(prompts_file), "--num_iterations", "2",
            "--rollout_batch_size", "4", "--per_device_train_batch_size", "4", "--local_rollout_forward_batch_size",
            "4", "--response_length", "8", "--sample_every", "0", "--gold_judge", "false",
            "--dtype", "float32", "--mixed_precision", "no"]  # fmt: skip
    assert bench.count_flops(str(out), argv) == 0
    assert trainer.PhaseClock.__call__ is clock  # the patch is undone
    rows = json.loads(out.read_text())["flops_per_iteration"]
    assert len(rows) == 2
    for f in rows:
        # One epoch of one minibatch: the policy and value forward is the update's own (PPOTrainer.can_fuse).
        assert set(f) == set(bench.PHASES) - {"policy_forward", "value_forward"} and all(v > 0 for v in f.values())
        # The same policy over the same tokens: the forward with the adapter is the reference's plus LoRA matmuls
        # plus the value model's forward.
        assert f["reference_forward"] < f["policy_value_forward"]
        # The update is the backward of that forward: about twice its matmuls, and no forward of its own.
        assert 1 < f["update"] / f["policy_value_forward"] < 3


def test_summary_ratios_by_hand():
    rows = [{"time/iteration_s": s, "time/rollout_s": s / 2, "time/generate_s": s / 4, "time/update_s": s / 2,
             "objective/scores": 0.1, "objective/kl": 0.0, "val/response_length": 5.0}
            for s in (2.0, 4.0, 3.0)]  # fmt: skip
    runs = [
        {"who": "anchor", "seconds_per_iteration": [10.0, 12.0, 11.0]},
        {"who": "ours", "rows": rows},
        {"who": "anchor", "seconds_per_iteration": [13.0, 9.0, 12.0]},
        {"who": "ours", "rows": rows},
    ]
    flops = {"ours": {"flags": [], "dtype": "float32", "rows": rows,
                      "flops_per_iteration": [{"generate": 6e9, "update": 3e9}] * 3}}  # fmt: skip
    s = bench.summarize(runs, flops, {"float32": 10.0, "bfloat16": 40.0})
    assert s["anchor"]["median_s_per_iteration"] == 11.5  # median of all six anchor iterations
    ours = s["ours"]["ours"]
    assert ours["median_s_per_iteration"] == 3.0 and ours["ratio_to_anchor"] == pytest.approx(11.5 / 3.0)
    assert ours["achieved_gflop_per_s"] == pytest.approx(3.0)  # 9 GFLOP over 2, 3 and 4 s: median 3
    assert ours["fraction_of_peak"] == pytest.approx(0.3) and ours["same_samples_as_timed_runs"]
    assert ours["achieved_gflop_per_s_by_phase"]["generate"] == pytest.approx(6 / 0.75)
    assert ours["length_adjusted"]["achieved_gflop_per_s"] == pytest.approx(3.0)  # the same lengths: the same


def test_flops_at_the_timed_runs_response_lengths():
    """A counting run that drew longer responses: its FLOPs, a line in the response length, are evaluated at the
    timed iterations' lengths."""
    timed = [{"time/iteration_s": 2.0, "time/rollout_s": 1.0, "val/response_length": 5.0, "objective/scores": 0.1,
              "objective/kl": 0.0}] * 3  # fmt: skip
    counted = [{"val/response_length": x, "objective/scores": 0.2, "objective/kl": 0.0} for x in (6.0, 7.0, 9.0)]
    per_iter = [{"generate": 8e9 * x, "update": 20e9} for x in (6.0, 7.0, 9.0)]  # 1 GFLOP per response token
    runs = [{"who": "anchor", "seconds_per_iteration": [10.0]}, {"who": "ours", "rows": timed}]
    flops = {"ours": {"dtype": "float32", "rows": counted, "flops_per_iteration": per_iter}}
    ours = bench.summarize(runs, flops, {"float32": 100.0})["ours"]["ours"]
    assert not ours["same_samples_as_timed_runs"]
    assert ours["achieved_gflop_per_s"] == pytest.approx((20 + 56) / 2)  # the counted run's own median
    adjusted = ours["length_adjusted"]
    assert adjusted["achieved_gflop_per_s"] == pytest.approx((20 + 40) / 2)
    assert adjusted["fraction_of_peak"] == pytest.approx(0.3)
    assert adjusted["gflop_per_response_token"] == pytest.approx(1.0) and adjusted["fit_max_relative_residual"] < 1e-12
    assert bench.line_fit([3.0, 3.0], [1.0, 2.0]) == (1.5, 0.0)


def test_grouped_query_attention_is_counted_with_the_query_s_heads():
    """A counter that, like torch before 2.12, takes only equal heads sees the key and value widened to the query's
    heads; equal heads and other arguments pass through unchanged."""
    seen = []

    def strict(*shapes):
        *_, q, k, v = shapes
        assert q[1] == k[1] == v[1], "query/key/value shapes are incompatible"
        seen.append(shapes)
        return 2 * q[0] * q[1] * q[2] * k[2] * q[3]

    counted = bench.grouped_query_heads(strict)
    grouped, widened = ((2, 9, 5, 64), (2, 3, 5, 64), (2, 3, 5, 64)), ((2, 9, 5, 64), (2, 9, 5, 64), (2, 9, 5, 64))
    assert counted(*grouped) == strict(*widened)
    assert seen[0] == widened
    assert counted((2, 9, 5, 64), *grouped) == strict((2, 9, 5, 64), *widened)  # backward: the gradient first
    with pytest.raises(AssertionError):  # heads that do not divide stay as they are, for torch to refuse
        counted((2, 9, 5, 64), (2, 4, 5, 64), (2, 4, 5, 64))


def test_rule_reward_seeds_repeats_the_learning_test_s_run(tmp_path, fresh_accelerate_state, capsys):
    """benchmarks/rule_reward_seeds.py: one run per estimator, dtype and seed; at the test's own seed its result
    is the learning test's (which asks a rise of more than 0.25)."""
    spec = importlib.util.spec_from_file_location(
        "rule_reward_seeds", REPO_ROOT / "benchmarks" / "rule_reward_seeds.py"
    )
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    assert seeds.main(["--estimators", "rloo", "--seeds", "3", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "rule_reward_seeds.json").read_text())
    assert [(r["estimator"], r["dtype"], r["seed"]) for r in result["runs"]] == [("rloo", "float32", 3)]
    assert result["runs"][0]["rise"] > 0.25
    capsys.readouterr()
    assert seeds.main(["--summarize", str(tmp_path / "out" / "rule_reward_seeds.json")]) == 0
    assert "rloo float32 forward: 1 seeds, mean rise +" in capsys.readouterr().out


def test_random_source_keeps_the_architecture_and_draws_seeded_weights(tiny_artifacts, tmp_path):
    """--init random: the source's configs and tokenizers, new weights, the same ones for the same seed."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    first = bench.random_source(tiny_artifacts, tmp_path / "a", seed=42)
    again = bench.random_source(tiny_artifacts, tmp_path / "b", seed=42)
    other = bench.random_source(tiny_artifacts, tmp_path / "c", seed=7)
    for part, cls in (("sft", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        src, dst = tiny_artifacts / part / "model", first / part / "model"
        model, trained = cls.from_pretrained(dst), cls.from_pretrained(src)
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "tie_word_embeddings")  # fmt: skip
        assert [getattr(model.config, k) for k in sizes] == [getattr(trained.config, k) for k in sizes]
        assert {k: v.shape for k, v in model.state_dict().items()} == {
            k: v.shape for k, v in trained.state_dict().items()
        }
        assert AutoTokenizer.from_pretrained(dst).get_vocab() == AutoTokenizer.from_pretrained(src).get_vocab()
        weights = load_file(str(dst / "model.safetensors"))
        same = load_file(str(again / part / "model" / "model.safetensors"))
        different = load_file(str(other / part / "model" / "model.safetensors"))
        source = load_file(str(src / "model.safetensors"))
        big = max(weights, key=lambda k: weights[k].numel())
        assert all(torch.equal(weights[k], same[k]) for k in weights)
        assert not torch.equal(weights[big], different[big]) and not torch.equal(weights[big], source[big])
    assert AutoModelForSequenceClassification.from_pretrained(first / "reward" / "model").config.num_labels == 1
