"""Tests of ``pipeline/artifacts.py``: atomic stage writes, the layout, fingerprints."""

from __future__ import annotations

import pytest

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
