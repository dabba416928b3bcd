"""Real kills: a stage's process is SIGKILLed while it trains, then its command is run again. The rerun must
end with the weights and metrics of an uninterrupted run, show no partial artifact, and redo at most the
work since the newest checkpoint. Tiny models built in the test; each stage runs as its own process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PPO_BASE, fake_stage, flags, make_causal_lm, make_seq_cls, read_metrics

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
PPO = dict(PPO_BASE, num_iterations=5, save_every=1, learning_rate=1e-2)

pytestmark = pytest.mark.slow


def ppo_command(art: Path, prompts: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.stage_ppo", "--artifact_dir", str(art), "--dataset_name", str(prompts),
            *flags(PPO)]  # fmt: skip


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (it must not finish first)."""
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < end, "the kill point never came"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def finish(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def make_artifacts(root: Path, tok) -> Path:
    fake_stage(root, "sft", make_causal_lm, tok)
    fake_stage(root, "reward", make_seq_cls, tok)
    return root


def numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if isinstance(v, (int, float)) and not k.startswith("time/")} for r in rows]


def same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("uninterrupted")
    from tests.conftest import prompt_rows, write_jsonl

    prompts = write_jsonl(root / "prompts.jsonl", prompt_rows(32))
    art = make_artifacts(root / "artifacts", tiny_tok)
    finish(ppo_command(art, prompts))
    return art, prompts


def test_ppo_killed_after_a_checkpoint_loses_at_most_one_interval(uninterrupted, tmp_path, tiny_tok):
    want, prompts = uninterrupted
    art = make_artifacts(tmp_path / "artifacts", tiny_tok)
    ckpts = art / "ppo-run" / "checkpoints"
    proc = start(ppo_command(art, prompts))
    kill_when(proc, lambda: (ckpts / "iter-000002" / "checkpoint.json").exists())
    assert not (art / "ppo").exists() and not (art / ".ppo.staging").exists()
    done_before = len(read_metrics(art / "ppo-run" / "metrics.jsonl"))
    assert done_before <= 3  # killed within the interval after iteration 2's checkpoint

    finish(ppo_command(art, prompts))
    assert numbers(read_metrics(art / "ppo" / "metrics.jsonl")) == numbers(
        read_metrics(want / "ppo" / "metrics.jsonl")
    )
    same_weights(art / "ppo" / "policy_adapter" / "adapter_model.safetensors",
                 want / "ppo" / "policy_adapter" / "adapter_model.safetensors")  # fmt: skip
    assert not (art / "ppo-run").exists()


def test_ppo_killed_at_random_times(uninterrupted, tmp_path, tiny_tok):
    """Two kills at seeded random moments (start-up, mid-iteration, mid-save), then a rerun to the end."""
    want, prompts = uninterrupted
    art = make_artifacts(tmp_path / "artifacts", tiny_tok)
    rng = random.Random(7)
    for _ in range(2):
        proc = start(ppo_command(art, prompts))
        time.sleep(rng.uniform(4.0, 12.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Whatever the moment: no stage directory without its manifest is ever in place.
        assert not (art / "ppo").exists() or (art / "ppo" / "manifest.json").exists()
    finish(ppo_command(art, prompts))
    same_weights(art / "ppo" / "policy_adapter" / "adapter_model.safetensors",
                 want / "ppo" / "policy_adapter" / "adapter_model.safetensors")  # fmt: skip
    assert numbers(read_metrics(art / "ppo" / "metrics.jsonl")) == numbers(
        read_metrics(want / "ppo" / "metrics.jsonl")
    )


def test_sft_killed_mid_training_continues(setup):
    """SFT as its own process, SIGKILLed once checkpoint-2 of 4 is complete; the rerun ends with the adapter of
    an uninterrupted run."""

    def command(art: Path) -> list[str]:
        return [sys.executable, "-m", "pipeline.stage_sft", "--model_name_or_path", str(setup["base"]),
                "--dataset_name", str(setup["sft"]), "--artifact_dir", str(art), "--max_steps", "4",
                "--save_steps", "1", "--per_device_train_batch_size", "4", "--lora_r", "4", "--lora_alpha", "8",
                "--report_to", "none"]  # fmt: skip

    full, killed = setup["artifacts"].parent / "full", setup["artifacts"].parent / "killed"
    finish(command(full))
    proc = start(command(killed))
    kill_when(proc, lambda: (killed / "sft-run" / "checkpoint-2" / "trainer_state.json").exists())
    assert not (killed / "sft").exists()
    finish(command(killed))
    same_weights(killed / "sft" / "adapter" / "adapter_model.safetensors",
                 full / "sft" / "adapter" / "adapter_model.safetensors", atol=1e-6)  # fmt: skip
    assert json.loads((killed / "sft" / "manifest.json").read_text())["metrics"]["train_steps"] == 4


# --------------------------------------------------------------------------- kills at exact code points
def with_fault(point: str, cmd: list[str]) -> list[str]:
    """``cmd`` (``python -m MODULE ARGS``) run under the fault-injection harness (tests/reliability/faults.py)."""
    assert cmd[1] == "-m"
    return [cmd[0], "-m", "tests.reliability.faults", point, *cmd[2:]]


def killed_by_fault(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at the fault point: {proc.stderr[-3000:]}"


def test_ppo_killed_mid_checkpoint_write_resumes_from_the_previous_one(uninterrupted, tmp_path, tiny_tok):
    want, prompts = uninterrupted
    art = make_artifacts(tmp_path / "artifacts", tiny_tok)
    killed_by_fault(with_fault("mid_checkpoint:3", ppo_command(art, prompts)))
    ckpts = art / "ppo-run" / "checkpoints"
    assert (ckpts / ".tmp-iter-000003").is_dir() and not (ckpts / "iter-000003").exists()  # caught mid-write
    assert len(read_metrics(art / "ppo-run" / "metrics.jsonl")) == 3 and not (art / "ppo").exists()
    finish(ppo_command(art, prompts))  # resumes from iter-000002: one interval redone
    assert numbers(read_metrics(art / "ppo" / "metrics.jsonl")) == numbers(
        read_metrics(want / "ppo" / "metrics.jsonl")
    )
    same_weights(art / "ppo" / "policy_adapter" / "adapter_model.safetensors",
                 want / "ppo" / "policy_adapter" / "adapter_model.safetensors")  # fmt: skip


def sft_command(setup, art: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.stage_sft", "--model_name_or_path", str(setup["base"]),
            "--dataset_name", str(setup["sft"]), "--artifact_dir", str(art), "--max_steps", str(steps),
            "--save_steps", "1", "--per_device_train_batch_size", "4", "--lora_r", "4", "--lora_alpha", "8",
            "--report_to", "none"]  # fmt: skip


def test_killed_after_the_manifest_the_rerun_publishes_without_training(setup):
    art = setup["artifacts"]
    killed_by_fault(with_fault("after_manifest", sft_command(setup, art, 2)))
    staged = art / ".sft.staging" / "manifest.json"
    assert staged.exists() and not (art / "sft").exists()  # finished, not yet published
    written = staged.read_text()
    finish(sft_command(setup, art, 2))
    assert (art / "sft" / "manifest.json").read_text() == written  # the finished stage, not a second training
    # Its run's checkpoints go too: left behind, they would block the next run with other settings.
    assert not (art / ".sft.staging").exists() and not (art / "sft-run").exists()
    finish(sft_command(setup, art, 3))
    assert json.loads((art / "sft" / "manifest.json").read_text())["metrics"]["train_steps"] == 3


def test_killed_between_the_two_renames_the_rerun_publishes_the_new_artifact(setup):
    art = setup["artifacts"]
    finish(sft_command(setup, art, 1))  # a previous artifact to publish over
    killed_by_fault(with_fault("between_renames", sft_command(setup, art, 2)))
    assert not (art / "sft").exists() and (art / ".sft.old" / "manifest.json").exists()
    written = (art / ".sft.staging" / "manifest.json").read_text()
    finish(sft_command(setup, art, 2))
    assert (art / "sft" / "manifest.json").read_text() == written
    assert json.loads(written)["metrics"]["train_steps"] == 2
    assert not (art / ".sft.old").exists() and not (art / ".sft.staging").exists()
