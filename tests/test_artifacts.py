"""Tests of ``pipeline/artifacts.py``: atomic stage writes, the layout, fingerprints."""

from __future__ import annotations

import pytest
import torch

from pipeline import artifacts as art


def test_staging_is_removed_when_the_body_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with art.stage_output(tmp_path, "sft", {"a": 1}, {}) as out:
            (out.path / "partial.bin").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / ".sft.staging").exists() and not (tmp_path / "sft").exists()


def test_publish_requires_manifest(tmp_path):
    with pytest.raises(RuntimeError, match="without a manifest"):
        with art.stage_output(tmp_path, "sft", {}, {}):
            pass
    assert not (tmp_path / "sft").exists()


def test_layout_names_every_path(tmp_path):
    layout = art.Layout(tmp_path)
    assert layout.stage("reward") == tmp_path / "reward"
    assert layout.model("sft") == tmp_path / "sft" / "model"
    assert layout.model("ppo") == tmp_path / "ppo" / "policy"
    assert layout.staging("eval") == tmp_path / ".eval.staging"
    assert layout.ppo_checkpoints == tmp_path / "ppo" / "checkpoints"
    assert layout.run_checkpoints == tmp_path / "ppo-run" / "checkpoints"
    assert layout.run_metrics == tmp_path / "ppo-run" / "metrics.jsonl"
    with pytest.raises(ValueError, match="unknown stage"):
        layout.stage("rm")


def test_embedded_data_paths_exist():
    for kind, split in art.EMBEDDED_FILES:
        assert art.embedded_data(kind, split).is_file()
    with pytest.raises(art.PipelineError, match="no 'sft' split 'test'"):
        art.embedded_data("sft", "test")


def test_fingerprint_follows_config_and_inputs_but_not_volatile_settings():
    from dataclasses import dataclass

    @dataclass
    class Args:
        learning_rate: float = 1e-3
        save_every: int = 10  # volatile: how often to checkpoint does not change the result
        force: bool = False

    base = art.resolved_config(ppo=Args())
    assert base == {"ppo": {"learning_rate": 1e-3}}
    same = art.resolved_config(ppo=Args(save_every=3, force=True))
    other = art.resolved_config(ppo=Args(learning_rate=2e-3))
    inputs = {"dataset": {"path": "a.jsonl", "sha256": "0" * 64}}
    assert art.fingerprint(base, inputs) == art.fingerprint(same, inputs)
    assert art.fingerprint(base, inputs) != art.fingerprint(other, inputs)
    assert art.fingerprint(base, inputs) != art.fingerprint(base, {"dataset": {"path": "a.jsonl", "sha256": "1" * 64}})
    # Where a hashed input lies does not count, however deep its record sits (a moved checkout still skips).
    nested = {"dataset": {"train": {"path": "/one/a.jsonl", "sha256": "0" * 64}}, "models": [{"path": "/one/m"}]}
    moved = {"dataset": {"train": {"path": "/two/a.jsonl", "sha256": "0" * 64}}, "models": [{"path": "/one/m"}]}
    assert art.fingerprint(base, nested) == art.fingerprint(base, moved)
    unhashed = {"dataset": {"train": {"path": "/one/a.jsonl", "sha256": "0" * 64}}, "models": [{"path": "/two/m"}]}
    assert art.fingerprint(base, nested) != art.fingerprint(base, unhashed)  # a path without a hash is its identity


def test_manifest_records_the_fingerprint_that_skips_a_rerun(tmp_path, capsys):
    config, inputs = {"x": {"a": 1}}, {"d": {"path": "p"}}
    with art.stage_output(tmp_path, "eval", config, inputs) as out:
        out.write_manifest({"m": 1})
    fp = art.fingerprint(config, inputs)
    assert art.read_manifest(tmp_path / "eval")["fingerprint"] == fp
    assert art.skip_if_complete(tmp_path, "eval", fp, force=False)
    assert "skipping" in capsys.readouterr().out
    assert not art.skip_if_complete(tmp_path, "eval", fp, force=True)
    assert not art.skip_if_complete(tmp_path, "eval", art.fingerprint({"x": {"a": 2}}, inputs), force=False)


def _publish(root, config, payload: str):
    with art.stage_output(root, "sft", config, {}) as out:
        (out.path / "weights.txt").write_text(payload)
        out.write_manifest({})


@pytest.mark.parametrize("asked", ["new", "old"])
def test_kill_between_the_two_renames_recovers(tmp_path, asked):
    """Killed after the old artifact was renamed aside and before the new one was renamed in: the next run
    publishes the complete new one when that is the run asked for, and otherwise puts the old one back."""
    configs = {"old": {"v": 1}, "new": {"v": 2}}
    _publish(tmp_path, configs["old"], "old")
    layout = art.Layout(tmp_path)
    writer = art.StageWriter(tmp_path, "sft", configs["new"], {})
    writer.path.mkdir()
    (writer.path / "weights.txt").write_text("new")
    writer.write_manifest({})
    layout.stage("sft").rename(layout.old("sft"))  # commit()'s first rename ... and the process dies here
    assert not layout.stage("sft").exists()

    assert art.skip_if_complete(tmp_path, "sft", art.fingerprint(configs[asked], {}), force=False)
    assert (layout.stage("sft") / "weights.txt").read_text() == asked
    assert not layout.old("sft").exists()


def test_kill_after_the_manifest_publishes_the_finished_stage(tmp_path, capsys):
    """Killed after the manifest was written, before the rename: the rerun publishes it instead of redoing it."""
    config = {"v": 2}
    _publish(tmp_path, {"v": 1}, "old")
    layout = art.Layout(tmp_path)
    writer = art.StageWriter(tmp_path, "sft", config, {})
    writer.path.mkdir()
    (writer.path / "weights.txt").write_text("new")
    writer.write_manifest({})  # ... and the process dies here
    assert art.skip_if_complete(tmp_path, "sft", art.fingerprint(config, {}), force=False)
    assert "skipping" in capsys.readouterr().out
    assert (layout.stage("sft") / "weights.txt").read_text() == "new"
    assert not layout.staging("sft").exists() and not layout.old("sft").exists()


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tiny_artifacts, prompts_file, capsys):
    import subprocess
    import sys

    from tests.conftest import error_lines, run_ppo

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.artifacts import artifact_lock\n"
         f"with artifact_lock({str(tiny_artifacts)!r}, 'rlhf sft --config x.yaml'):\n"
         "    print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=art.REPO_ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_ppo(tiny_artifacts, prompts_file) == 2
        err = error_lines(capsys.readouterr().err)
        assert err == [f"error: {tiny_artifacts} is in use by pid {holder.pid} (rlhf sft --config x.yaml); "
                       "wait for it to finish, or use another --artifact_dir"]  # fmt: skip
        assert not (tiny_artifacts / "ppo-run").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the lock
        holder.wait()
    with art.artifact_lock(tiny_artifacts, "next"):
        assert "pid" in (tiny_artifacts / ".lock").read_text()


def test_manifest_records_weight_files_and_a_damaged_one_is_one_line(tmp_path):
    from safetensors.torch import save_file

    with art.stage_output(tmp_path, "sft", {"a": 1}, {}) as out:
        (out.path / "model").mkdir()
        save_file({"w": torch.ones(64)}, str(out.path / "model" / "model.safetensors"))
        out.write_manifest({})
    manifest = art.require_stage(tmp_path, "sft", "reward")
    entry = manifest["files"]["model/model.safetensors"]
    weights = tmp_path / "sft" / "model" / "model.safetensors"
    assert entry == {"size": weights.stat().st_size, "sha256": art.file_sha256(weights)}

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(art.PipelineError, match="has .* bytes where its manifest recorded .*rerun `rlhf sft --force`"):
        art.require_stage(tmp_path, "sft", "reward")
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other contents: found by hash
    art.require_stage(tmp_path, "sft", "reward")
    with pytest.raises(art.PipelineError, match="differs from the file its manifest recorded"):
        art.check_files(tmp_path / "sft", manifest, hashes=True)


def test_a_manifest_hashed_with_its_paths_still_counts_as_complete(tmp_path):
    """Manifests written before nested paths stopped counting carry a fingerprint with paths in it: the stage is
    still complete for the same config and inputs (its recorded config and inputs are hashed again)."""
    import hashlib
    import json

    config = {"x": {"a": 1}}
    inputs = {"dataset": {"train": {"path": "/old/checkout/a.jsonl", "sha256": "0" * 64}}}
    with art.stage_output(tmp_path, "reward", config, inputs) as out:
        out.write_manifest({})
    manifest_path = tmp_path / "reward" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    legacy = json.dumps({"config": config, "inputs": inputs}, sort_keys=True)  # paths included
    manifest["fingerprint"] = hashlib.sha256(legacy.encode()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    moved = {"dataset": {"train": {"path": "/new/checkout/a.jsonl", "sha256": "0" * 64}}}
    assert art.is_complete_for(tmp_path, "reward", art.fingerprint(config, moved))
    assert not art.is_complete_for(tmp_path, "reward", art.fingerprint({"x": {"a": 2}}, moved))
