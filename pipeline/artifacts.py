"""The artifact directory: the one place that knows where each stage reads and writes.

Layout (``--artifact_dir``, default ``artifacts/``), spelled out by :class:`Layout`::

    sft/      manifest.json, adapter/, model/            (merged policy + tokenizer)
    reward/   manifest.json, adapter/, model/            (merged scorer + tokenizer)
    ppo/      manifest.json, policy_adapter/, policy/, value/, metrics.jsonl, checkpoints/
    eval/     manifest.json, report.json, report.md, report.html, results.json
    ppo-run/  checkpoints/, metrics.jsonl                (a PPO run in progress)
    sft-run/, reward-run/  checkpoint-*/, fingerprint    (an SFT or reward run in progress: HF Trainer)
    eval-run/ <policy>.json, fingerprint                (an evaluation in progress)
    logs/     <stage>/                                   (tracker output, --report_to tensorboard)

A stage writes into a hidden staging sibling (``.<stage>.staging``), writes ``manifest.json``
last, and renames the staging directory into place; a manifest therefore means "complete",
and a crash or a rejected input never leaves a half-written or overwritten artifact.

Every stage identifies its output by :func:`fingerprint` of :func:`resolved_config` and its
inputs' :func:`input_record`: the same config and inputs give the same fingerprint, and a stage
whose manifest carries it is skipped.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

STAGES = ("sft", "reward", "ppo", "eval")
# Stage -> the command that makes it (named in "run this first" errors).
MAKES = {
    "sft": "rlhf sft",
    "reward": "rlhf reward",
    "ppo": "accelerate launch pipeline/stage_ppo.py",
    "eval": "rlhf eval",
}
MANIFEST = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Names inside a stage directory (and, for the PPO policy adapter, inside each PPO checkpoint).
ADAPTER = "adapter"
MODEL = "model"
POLICY_ADAPTER = "policy_adapter"
POLICY = "policy"
VALUE = "value"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"

# The embedded task's data: (kind, split) -> file under data/embedded/.
EMBEDDED_DATA = REPO_ROOT / "data" / "embedded"
EMBEDDED_FILES = {
    ("sft", "train"): "sft_train.jsonl",
    ("preference", "train"): "pref_train.jsonl",
    ("preference", "test"): "pref_test.jsonl",
    ("prompt", "train"): "ppo_prompts.jsonl",
    ("prompt", "test"): "eval_prompts.jsonl",
    ("prompt", "test_rephrased"): "eval_prompts_rephrased.jsonl",  # the same prompts, held-out phrasings
    # Setting (b), scarce demonstrations (benchmarks/quality.py --setting b): SFT gets a fifth of the
    # demonstrations; the reward model and PPO get the comparisons and prompts of the questions SFT never saw.
    ("sft", "train_scarce"): "sft_scarce.jsonl",
    ("preference", "train_scarce"): "pref_scarce.jsonl",
    ("prompt", "train_scarce"): "ppo_prompts_scarce.jsonl",
}


def embedded_data(kind: str, split: str) -> Path:
    """The embedded file holding ``kind`` rows (sft, preference, prompt) of ``split``."""
    try:
        return EMBEDDED_DATA / EMBEDDED_FILES[(kind, split)]
    except KeyError:
        raise PipelineError(f"the embedded data has no {kind!r} split {split!r}") from None


class Layout:
    """Every path under one artifact directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def stage(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        return self.root / stage

    def staging(self, stage: str) -> Path:
        return self.root / f".{stage}.staging"

    def old(self, stage: str) -> Path:
        return self.root / f".{stage}.old"

    def model(self, stage: str) -> Path:
        """The merged model a later stage loads (``sft/model``, ``reward/model``, ``ppo/policy``)."""
        return self.stage(stage) / (POLICY if stage == "ppo" else MODEL)

    @property
    def ppo_checkpoints(self) -> Path:
        return self.stage("ppo") / CHECKPOINTS

    def run_dir(self, stage: str) -> Path:
        """A run in progress (``sft-run/``, ``reward-run/``, ``ppo-run/``): its checkpoints, until the stage
        publishes. A kill costs at most the work since the newest checkpoint there."""
        return self.root / f"{self.stage(stage).name}-run"

    def logs(self, stage: str) -> Path:
        """Tracker output (``--report_to tensorboard``) of a stage: ``logs/<stage>/``, kept across runs."""
        return self.root / "logs" / self.stage(stage).name

    @property
    def ppo_run(self) -> Path:
        """A PPO run in progress: its checkpoints and live metrics, until the stage publishes."""
        return self.run_dir("ppo")

    @property
    def run_checkpoints(self) -> Path:
        return self.ppo_run / CHECKPOINTS

    @property
    def run_metrics(self) -> Path:
        return self.ppo_run / METRICS


RUN_STAMP = "fingerprint"


def run_fingerprint(run_dir: Path) -> str:
    """The fingerprint a run in progress stamped on its run directory ("" when there is none)."""
    stamp = Path(run_dir) / RUN_STAMP
    return stamp.read_text() if stamp.exists() else ""


def continue_run(
    run_dir: Path, fingerprint_: str, recorded: str | None, force: bool, what: str, is_main_process: bool = True
) -> bool:
    """Whether a stage continues the interrupted run in ``run_dir``, whose work was done under the fingerprint
    ``recorded`` (None: there is no work to continue). Work of another run is refused with one line unless
    ``force``. When the stage starts afresh, the main process empties ``run_dir`` and stamps it."""
    if recorded is not None and not force:
        if recorded != fingerprint_:
            raise PipelineError(
                f"{run_dir} holds an interrupted {what} with other inputs or config; rerun with its settings to "
                "continue it, or add --force to discard it"
            )
        return True
    if is_main_process:
        shutil.rmtree(run_dir, ignore_errors=True)
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / RUN_STAMP).write_text(fingerprint_)
    return False


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK = ".lock"


@contextmanager
def artifact_lock(artifact_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold ``<artifact_dir>/.lock`` (an exclusive ``flock``) while a stage runs, so two runs never write one
    artifact directory. A second writer gets a one-line error naming the holder; the kernel releases the
    lock of a process that dies, so a killed run's lock is simply taken over by the next."""
    import fcntl

    root = Path(artifact_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise PipelineError(
                f"{root} is in use by {holder}; wait for it to finish, or use another --artifact_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} ({command})")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def link_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree as hard links (instant, no extra space); plain copies where links fail."""

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def read_manifest(path: str | os.PathLike) -> dict | None:
    p = Path(path) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{p} is not valid JSON ({e}); delete {Path(path)} and re-run its stage") from None


def require_stage(artifact_dir: str | os.PathLike, stage: str, for_stage: str) -> dict:
    """The manifest of a completed input stage, or a PipelineError saying what to run first."""
    d = Layout(artifact_dir).stage(stage)
    manifest = read_manifest(d)
    if manifest is None:
        why = "is missing" if not d.exists() else "is incomplete (no manifest.json)"
        raise PipelineError(
            f"the {for_stage} stage needs {d}, which {why}: run `{MAKES[stage]} --artifact_dir {artifact_dir}` first"
        )
    check_files(d, manifest, hashes=False)
    return manifest


def weight_files(stage_path: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every safetensors file under a stage directory."""
    out = {}
    for p in sorted(Path(stage_path).rglob("*.safetensors")):
        out[str(p.relative_to(stage_path))] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return out


def check_files(stage_path: Path, manifest: dict, hashes: bool = False) -> None:
    """One-line error when a weight file the manifest lists is missing, has another size (a copy cut
    short, a full disk) or, with ``hashes``, other contents."""
    stage = manifest.get("stage", Path(stage_path).name)
    for rel, want in (manifest.get("files") or {}).items():
        p = Path(stage_path) / rel
        why = None
        if not p.is_file():
            why = "is missing"
        elif p.stat().st_size != want["size"]:
            why = f"has {p.stat().st_size} bytes where its manifest recorded {want['size']}"
        elif hashes and file_sha256(p) != want["sha256"]:
            why = "differs from the file its manifest recorded"
        if why:
            raise PipelineError(f"{p} {why}: the artifact is damaged; rerun `{MAKES[stage]} --force`")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def artifact_hash(path: str | os.PathLike) -> str:
    """Content identity of a completed stage directory: the hash of its manifest.

    A manifest is unique per run (it holds the stage's own input hashes, config and times),
    so hashing it identifies the weights next to it without reading hundreds of MB.
    """
    return file_sha256(Path(path) / MANIFEST)


def input_record(path: str | os.PathLike) -> dict:
    p = Path(path)
    if (p / MANIFEST).exists():
        return {"path": str(p), "sha256": artifact_hash(p)}
    if (p.parent / MANIFEST).exists():  # a part of a stage: reward/adapter, sft/model
        return {"path": str(p), "sha256": artifact_hash(p.parent), "part": p.name}
    if p.is_file():
        return {"path": str(p), "sha256": file_sha256(p)}
    return {"path": str(p)}  # a hub id: identified by name (and revision in the config)


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# Settings that do not change what a stage produces (left out of its config and fingerprint).
VOLATILE_KEYS = {
    "output_dir", "logging_dir", "report_to", "run_name", "force", "disable_tqdm", "logging_steps",
    "push_to_hub", "hub_model_id", "hub_token", "local_rank", "dataloader_num_workers", "save_strategy",
    "save_steps", "save_total_limit", "logging_first_step", "logging_strategy", "use_cpu",
    "resume_from_checkpoint", "stop_after_iterations", "save_every", "sample_every",
    "artifact_dir",  # where the artifacts lie is not what they are: a moved directory still skips and resumes
}  # fmt: skip


def resolved_config(**parts) -> dict:
    """One JSON-able dict of every parsed dataclass (or dict), without the volatile settings."""
    out = {}
    for name, obj in parts.items():
        d = obj if isinstance(obj, dict) else obj.to_dict() if hasattr(obj, "to_dict") else asdict(obj)
        out[name] = {k: v for k, v in d.items() if k not in VOLATILE_KEYS}
    return out


def _identity(record):
    """``record`` without the ``path`` of any part (at any depth) that carries a content hash."""
    if isinstance(record, dict):
        hashed = bool(record.get("sha256"))
        return {k: _identity(v) for k, v in record.items() if not (hashed and k == "path")}
    return [_identity(v) for v in record] if isinstance(record, (list, tuple)) else record


def fingerprint(config: dict, inputs: dict) -> str:
    """Hash of what determines a stage's output: its resolved config and its inputs' hashes. An input with a
    content hash counts by that hash alone, not by where it lies (a hub id counts by its name)."""
    payload = json.dumps({"config": _jsonable(config), "inputs": _jsonable(_identity(inputs))}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "evaluate", "rlhf-pipeline"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def tokenizer_identity(tokenizer) -> dict:
    """Enough to tell two tokenizers apart: name, sizes, special tokens, and a vocab hash."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    return {
        "name_or_path": tokenizer.name_or_path,
        "vocab_size": len(tokenizer),
        "vocab_sha256": digest,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "bos_token": tokenizer.bos_token,
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_complete_for(artifact_dir: str | os.PathLike, stage: str, fingerprint_: str) -> bool:
    """True when the stage's manifest shows it complete for the same config and inputs."""
    manifest = read_manifest(Layout(artifact_dir).stage(stage))
    if not manifest:
        return False
    if manifest.get("fingerprint") == fingerprint_:
        return True
    # The manifest's own config and inputs, hashed as today: a stage written before nested paths stopped counting
    # (2026-12-03) is still complete for the same settings and inputs.
    return (
        "config" in manifest
        and "inputs" in manifest
        and fingerprint(manifest["config"], manifest["inputs"]) == fingerprint_
    )


def _swap_in(staging: Path, final: Path, old: Path) -> None:
    """Rename ``staging`` into place as ``final``: a previous ``final`` is renamed aside to ``old`` first and
    removed after. A kill between the two renames leaves ``old`` and ``staging``, no ``final``."""
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_commit(artifact_dir: str | os.PathLike, stage: str, fingerprint_: str) -> None:
    """Finish or undo a publish that a kill interrupted (see :meth:`StageWriter.commit`).

    A complete staging directory (its manifest written) for this fingerprint is published instead of
    being redone; otherwise a previous artifact left aside as ``.<stage>.old`` between the two renames
    is put back. Call it from the main process only, before deciding whether the stage must run.
    """
    layout = Layout(artifact_dir)
    final, staging, old = layout.stage(stage), layout.staging(stage), layout.old(stage)
    try:
        staged = read_manifest(staging) if staging.is_dir() else None
    except PipelineError:  # a manifest cut short: the staging directory is not complete
        staged = None
    if staged is not None and staged.get("fingerprint") == fingerprint_:
        _swap_in(staging, final, old)
    elif not final.exists() and old.exists():
        os.replace(old, final)
        _fsync(final.parent)
    if old.exists() and final.exists():
        shutil.rmtree(old, ignore_errors=True)


def skip_if_complete(
    artifact_dir, stage: str, fingerprint_: str, force: bool, say=print, is_main_process: bool = True
) -> bool:
    """True (and says so) when the stage is already complete for this fingerprint and not forced.
    The main process first finishes or undoes a publish that a kill interrupted."""
    if is_main_process:
        recover_interrupted_commit(artifact_dir, stage, fingerprint_)
    if force or not is_complete_for(artifact_dir, stage, fingerprint_):
        return False
    where = Layout(artifact_dir).stage(stage)
    run_dir = Layout(artifact_dir).run_dir(stage)
    if is_main_process and run_dir.exists() and run_fingerprint(run_dir) == fingerprint_:
        # The checkpoints of the run that made this artifact, left by a kill after its publish: done with.
        shutil.rmtree(run_dir, ignore_errors=True)
    say(f"{stage}: {where} is complete for these inputs and config; skipping (--force reruns)")
    return True


class StageWriter:
    """Write one stage's artifact atomically. Use through :func:`stage_output`."""

    def __init__(self, artifact_dir: str | os.PathLike, stage: str, config: dict, inputs: dict):
        layout = Layout(artifact_dir)
        self.final = layout.stage(stage)
        self.path = layout.staging(stage)
        self.old = layout.old(stage)
        self.stage = stage
        self.config = _jsonable(config)
        self.inputs = _jsonable(inputs)
        self.fingerprint = fingerprint(self.config, self.inputs)
        self.started_at = now()
        self.extra: dict[str, Any] = {}

    def write_manifest(self, metrics: dict, tokenizer=None) -> None:
        manifest = {
            "stage": self.stage,
            "status": "complete",
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self.inputs,
            "tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else None,
            "versions": package_versions(),
            "git_commit": _git_commit(),
            "started_at": self.started_at,
            "finished_at": now(),
            "metrics": _jsonable(metrics),
            "files": weight_files(self.path),
            **self.extra,
        }
        tmp = self.path / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)

    def commit(self) -> None:
        """Publish the staging directory: its files are flushed to disk, the previous artifact (if any) is
        renamed aside, the staging directory renamed into place, the previous one removed. A kill at any
        point leaves a state :func:`recover_interrupted_commit` completes or undoes."""
        if not (self.path / MANIFEST).exists():
            raise RuntimeError(f"{self.stage}: refusing to publish an artifact without a manifest")
        for d, _, files in os.walk(self.path):
            for name in files:
                _fsync(Path(d) / name)
            _fsync(Path(d))
        _swap_in(self.path, self.final, self.old)


@contextmanager
def stage_output(
    artifact_dir: str | os.PathLike, stage: str, config: dict, inputs: dict, is_main_process: bool = True
) -> Iterator[StageWriter]:
    """Yield a writer whose ``.path`` is the staging directory; publish it on success.

    On any exception the staging directory is removed and the previous artifact, if any,
    stays untouched. The body must call ``writer.write_manifest(...)`` as its last write.
    Only the main process creates, publishes or removes anything.
    """
    writer = StageWriter(artifact_dir, stage, config, inputs)
    if is_main_process:
        if writer.path.exists():
            shutil.rmtree(writer.path)  # leftover of a crashed run
        writer.path.mkdir(parents=True)
    try:
        yield writer
    except BaseException:
        if is_main_process:
            shutil.rmtree(writer.path, ignore_errors=True)
        raise
    if is_main_process:
        writer.commit()
