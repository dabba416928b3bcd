"""Tests of ``pipeline/config.py``: the command line of every stage turns bad input into one line and exit 2."""

from __future__ import annotations

import pytest

from tests.conftest import error_line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "no/such.yaml"], "error: --config no/such.yaml: No such file or directory"),
        (["--max_steps", "abc"], "error: argument --max_steps/--max-steps: invalid int value: 'abc' (see --help)"),
        (
            ["--no_such_flag", "1"],
            "error: Some specified arguments are not used by the HfArgumentParser: ['--no_such_flag', '1'] "
            "(see --help)",
        ),
    ],
)
def test_bad_command_lines_are_one_line(argv, message, capsys, tmp_path):
    from pipeline.stage_sft import cli

    assert cli([*argv, "--artifact_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [message]


def test_malformed_yaml_config_is_one_line(tmp_path, capsys):
    from pipeline.stage_ppo import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("num_iterations: [1\n")
    assert cli(["--config", str(bad)]) == 2
    assert error_line(capsys).startswith("error: --config: not valid YAML (line 2, column 1)")


def test_missing_tracker_package_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    from pipeline.stage_sft import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    assert cli(["--report_to", "tensorboard", "--artifact_dir", str(tmp_path / "a")]) == 2
    assert error_line(capsys) == (
        "error: --report_to tensorboard needs the tensorboard package (pip install 'rlhf-pipeline[trackers]')"
    )


def test_tensorboard_event_files_for_every_training_stage(setup, prompts_file):
    """SFT, reward and PPO write TensorBoard events under <artifact_dir>/logs/<stage>/ (kept after publishing)."""
    from tests.conftest import run_ppo, run_rm, run_sft

    assert run_sft(setup, "--report_to", "tensorboard") == 0
    assert run_rm(setup, "--report_to", "tensorboard") == 0
    art = setup["artifacts"]
    assert run_ppo(art, prompts_file, report_to="tensorboard") == 0
    for stage in ("sft", "reward", "ppo"):
        events = list((art / "logs" / stage).rglob("events.out.tfevents.*"))
        assert events and all(e.stat().st_size > 0 for e in events), stage


def test_disk_full_is_one_line_and_keeps_the_previous_artifact(setup, monkeypatch, capsys):
    import errno

    from pipeline import artifacts as art
    from tests.conftest import run_sft

    assert run_sft(setup) == 0
    before = (setup["artifacts"] / "sft" / "manifest.json").read_text()

    def full(self, metrics, tokenizer=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "manifest.json"))

    monkeypatch.setattr(art.StageWriter, "write_manifest", full)
    assert run_sft(setup, "--force") == 2
    line = error_line(capsys)
    assert line.startswith("error: no space left on the device while writing ") and "free some and rerun" in line
    assert (setup["artifacts"] / "sft" / "manifest.json").read_text() == before
    assert not (setup["artifacts"] / ".sft.staging").exists()


@pytest.mark.parametrize(
    "world_size, code, leaves_by",
    [(None, 2, "sys.exit"), ("1", 2, "sys.exit"), ("2", 0, "sys.exit"), ("2", 2, "os._exit")],
)
def test_exit_process_skips_the_teardown_only_for_a_failed_process_of_a_multi_process_run(
    monkeypatch, world_size, code, leaves_by
):
    """A failed rank of a multi-process run leaves by ``os._exit`` (the interpreter's teardown of
    torch.distributed can abort it, SIGABRT, which hides the exit status 2); everything else exits normally."""
    import os

    from pipeline.config import exit_process

    left = []
    monkeypatch.setattr(os, "_exit", lambda status: left.append(status))
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    if leaves_by == "os._exit":
        with pytest.raises(SystemExit):  # reached only because the fake os._exit returns
            exit_process(code)
        assert left == [code]
    else:
        with pytest.raises(SystemExit) as e:
            exit_process(code)
        assert e.value.code == code and left == []
