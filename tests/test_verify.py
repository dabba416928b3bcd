"""``rlhf verify`` (pipeline/verify.py): the on-demand hash check of every stage's weight files."""

import torch

from pipeline import artifacts as art
from pipeline.cli import main


def test_verify_finds_a_same_size_corruption_that_loading_does_not(tmp_path, capsys):
    from safetensors.torch import save_file

    with art.stage_output(tmp_path, "sft", {"a": 1}, {}) as out:
        (out.path / "model").mkdir()
        save_file({"w": torch.ones(64)}, str(out.path / "model" / "model.safetensors"))
        out.write_manifest({})
    assert main(["verify", "--artifact_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sft     ok: 1 weight files" in out and "reward  not present" in out

    weights = tmp_path / "sft" / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size: the load-time size check passes
    art.require_stage(tmp_path, "sft", "reward")
    assert main(["verify", "--artifact_dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "sft     DAMAGED: " in captured.out and "differs from the file its manifest recorded" in captured.out
    assert captured.err.strip() == "error: 1 damaged stage(s); rerun each with --force"
