"""Tests of `scripts/compare_artifacts.py`: equal runs pass, a changed number fails, wall-clock is ignored."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_artifacts.py"
spec = importlib.util.spec_from_file_location("compare_artifacts", SCRIPT)
compare_artifacts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_artifacts)


def write_run(root: Path, loss: float, seconds: float, kl: float) -> Path:
    (root / "sft").mkdir(parents=True)
    (root / "sft" / "manifest.json").write_text(
        json.dumps({"metrics": {"train_loss": loss, "train_runtime_s": seconds, "log_history": [{"loss": loss}]}})
    )
    (root / "ppo").mkdir()
    (root / "ppo" / "manifest.json").write_text(json.dumps({"metrics": {"iterations": 1}}))
    row = {"iteration": 1, "objective/kl": kl, "time/iteration_s": seconds, "val/ratio": float("nan")}
    (root / "ppo" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    return root


def test_equal_runs_pass_and_a_changed_number_fails(tmp_path, capsys):
    a = write_run(tmp_path / "a", 1.25, 10.0, 0.5)
    b = write_run(tmp_path / "b", 1.25, 99.0, 0.5)  # only wall-clock differs
    assert compare_artifacts.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "sft: 2 numbers compared, 0 differ" in out and "ppo: 4 numbers compared, 0 differ" in out
    c = write_run(tmp_path / "c", 1.25, 10.0, 0.5000001)
    assert compare_artifacts.main([str(a), str(c)]) == 1
    assert "ppo: metrics.jsonl.0.objective/kl: 0.5 != 0.5000001" in capsys.readouterr().out
