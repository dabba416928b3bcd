"""The console entry point and the demo recipes parse; `--help` works for every command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.artifacts import REPO_ROOT
from pipeline.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["nope"]) == 2


@pytest.mark.parametrize(
    "module, recipe",
    [
        ("pipeline.stage_sft", "configs/sft_demo.yaml"),
        ("pipeline.stage_reward", "configs/reward_demo.yaml"),
        ("pipeline.stage_ppo", "configs/ppo_demo.yaml"),
        ("pipeline.stage_ppo", "configs/ppo_rloo_demo.yaml"),
        ("pipeline.stage_ppo", "configs/ppo_ensemble_demo.yaml"),
        ("pipeline.stage_ppo", "configs/ppo_ensemble_long_demo.yaml"),
        ("pipeline.stage_eval", "configs/eval_demo.yaml"),
    ],
)
def test_demo_recipes_parse_with_no_unknown_keys(module, recipe):
    import argparse
    import importlib

    parser = importlib.import_module(module).make_parser()
    # An unknown key raises (fail_with_unknown_args); every value lands in one of the stage's dataclasses.
    parsed = parser.parse_args_and_config(args=["--config", str(REPO_ROOT / recipe)], fail_with_unknown_args=True)
    assert not any(isinstance(p, argparse.Namespace) and vars(p) for p in parsed)
    with pytest.raises(ValueError):
        parser.parse_args_and_config(
            args=["--config", str(REPO_ROOT / recipe), "--no_such_flag", "1"], fail_with_unknown_args=True
        )


def test_ppo_recipe_sizes_divide():
    """The demo recipe's batch sizes divide exactly (derive_sizes raises otherwise), on one and on two processes."""
    from pipeline.stage_ppo import Sizes, derive_sizes, make_parser

    _, _, ppo = make_parser().parse_args_and_config(args=["--config", str(REPO_ROOT / "configs/ppo_demo.yaml")])[:3]
    # 32 prompts per process in 4 minibatches of 8, one micro-batch of 8 each.
    assert derive_sizes(ppo, world_size=1) == Sizes(1, 8, 1, 32, 32)
    assert derive_sizes(ppo, world_size=2) == Sizes(2, 8, 1, 64, 64)
    # RLOO: 8 prompts x 4 samples = 32 responses per process, the same minibatches.
    _, _, rloo = make_parser().parse_args_and_config(args=["--config", str(REPO_ROOT / "configs/ppo_rloo_demo.yaml")])[
        :3
    ]
    assert derive_sizes(rloo, world_size=1) == Sizes(1, 8, 1, 8, 32)


def test_script_help_runs_as_a_plain_script():
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "pipeline/stage_ppo.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--kl_coef" in out.stdout and "--resume_from_checkpoint" in out.stdout
