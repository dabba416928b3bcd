"""Arguments every stage shares, and the glue that turns parsed dataclasses into a run.

The model arguments (TRL's ``ModelConfig`` plus adapter placement) are in :mod:`pipeline.model_args`.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PeerFailed, PipelineError

# Our defaults for TRL's SFT and reward trainers, where TRL's suit full fine-tuning on GPUs more than
# LoRA on any device (each stage adds its own learning rate and trainer-specific settings).
TRAINER_DEFAULTS = dict(
    use_peft=True,
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.0,
    num_train_epochs=1,
    per_device_train_batch_size=8,
    gradient_checkpointing=False,
    max_length=256,
    logging_steps=5,
    save_strategy="steps",  # HF Trainer checkpoints in <artifact_dir>/<stage>-run/: a kill loses save_steps at most
    save_steps=25,
    save_total_limit=2,
    report_to="none",
    logging_nan_inf_filter=False,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
    bf16=False,
    seed=42,
)


@dataclass
class StageArguments:
    """Where artifacts live and which data a stage reads."""

    artifact_dir: str = field(
        default="artifacts", metadata={"help": "Shared artifact directory of this pipeline run."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub id or local .json/.jsonl/.parquet/.csv file. Default: the embedded task's data."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on (when the stage evaluates)."}
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Separate file or hub id for the held-out split (default: dataset_name)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many held-out rows."})
    force: bool = field(
        default=False,
        metadata={"help": "Re-run even when the stage's manifest shows it complete for the same inputs."},
    )


def cpu_only() -> bool:
    """No GPU/MPS/XPU: tell TRL's config so (``use_cpu``), which lets ``--bf16 true`` autocast on the CPU."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return not (
        torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available())
    )


@contextmanager
def stage_lock(args):
    """The artifact directory's lock (``artifacts.artifact_lock``), taken by the launcher's rank 0 only: when
    it is refused, rank 0 exits with the error and the launcher stops the other ranks."""
    from pipeline.artifacts import artifact_lock

    artifact_dir = next((a.artifact_dir for a in args if hasattr(a, "artifact_dir")), None)
    if artifact_dir is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with artifact_lock(artifact_dir, " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])):
        yield


_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}


def check_trackers(args) -> None:
    """One line, before any work, when ``--report_to`` names a tracker whose package is not installed."""
    import importlib.util

    for a in args:
        report_to = getattr(a, "report_to", None)
        names = [report_to] if isinstance(report_to, str) else list(report_to or [])
        for name in names:
            package = TRACKER_PACKAGES.get(name)
            if package and importlib.util.find_spec(package) is None:
                extra = " (pip install 'rlhf-pipeline[trackers]')" if name == "tensorboard" else ""
                raise PipelineError(f"--report_to {name} needs the {package} package{extra}")


def tensorboard_dir(artifact_dir: str, stage: str) -> None:
    """Point the HF Trainer's TensorBoard callback at ``<artifact_dir>/logs/<stage>`` (its default lies in the
    output directory, which a finished stage removes), unless ``TENSORBOARD_LOGGING_DIR`` is set."""
    from pipeline.artifacts import Layout

    if _USER_TENSORBOARD_DIR is None:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Layout(artifact_dir).logs(stage))


def run_cli(make_parser: Callable, main: Callable, argv: list[str] | None = None) -> int:
    """Parse (``--config file.yaml`` and flags), run ``main``, turn PipelineError into one line + exit 2."""
    import yaml

    parser = make_parser()

    def error(message: str):  # argparse would print the whole usage block and exit
        raise PipelineError(f"{message} (see --help)")

    parser.error = error
    try:
        try:
            args = parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)
        except ValueError as e:  # unknown flags or config keys, bad values
            raise PipelineError(f"{str(e).splitlines()[0]} (see --help)") from None
        except OSError as e:  # --config FILE missing or unreadable
            raise PipelineError(f"--config {e.filename}: {e.strerror}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise PipelineError(f"--config: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        # HfArgumentParser appends a Namespace of defaults no dataclass claimed: a stale default is a bug.
        if args and isinstance(args[-1], argparse.Namespace):
            if vars(args[-1]):
                raise PipelineError(f"unknown settings {sorted(vars(args[-1]))}")
            args = args[:-1]
        check_trackers(args)
        with stage_lock(args):
            main(*args)
    except PeerFailed:  # another process of this run printed the error
        return 2
    except PipelineError as e:
        # Another process's progress bar may hold the terminal's current line: start a new one.
        start = "\n" if int(os.environ.get("RANK", "0")) != 0 else ""
        print(f"{start}error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(
            f"error: no space left on the device while writing {e.filename or 'the artifacts'}; free some and rerun "
            "(the previous artifact is untouched and an interrupted run continues from its last checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        return 2
    return 0


def exit_process(code: int):
    """Leave a stage's ``__main__`` with ``code``. A process of a multi-process run (``WORLD_SIZE`` > 1) that
    stops with an error leaves through ``os._exit`` once its output is flushed: its process group is already
    destroyed (``Accelerator.end_training``), and the interpreter's normal teardown then sometimes aborts in a C++
    destructor of torch.distributed ("terminate called without an active exception", SIGABRT, 2 runs in 40 of
    the two-process refusal test), which turns the one-line error's exit 2 into a signal and a launcher
    traceback. Success, and every single-process run, exits normally."""
    if code != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
