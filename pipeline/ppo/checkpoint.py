"""PPO checkpoints without pickle: trainable tensors, optimizer and RNG state as safetensors + JSON.

A checkpoint directory ``iter-000010/`` holds::

    policy_adapter/            PEFT adapter of the policy (what evaluation loads)
    trainable.safetensors      every trainable tensor of the policy+value module (what resume loads)
    optimizer.safetensors      optimizer tensors, flattened as ``state.<param index>.<name>``
    state.json                 iteration, data cursor, optimizer param groups, scheduler,
                               KL controller, score moments, metrics so far
    rng-<rank>.safetensors / rng-<rank>.json   torch (+CUDA) / python / numpy RNG of each process
    checkpoint.json            written last: its presence means the checkpoint is complete

Only the main process writes shared files; each process writes its own RNG files. The
directory is written under a temporary name and renamed, so a kill mid-save leaves the
previous checkpoint as ``latest``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.artifacts import POLICY_ADAPTER
from pipeline.errors import PipelineError

COMPLETE = "checkpoint.json"


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter-{iteration:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("iter-") and (p / COMPLETE).exists())


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json`` (iteration, data cursor, fingerprint, ...), without loading tensors."""
    return json.loads((path / "state.json").read_text())


def resolve(root: Path, spec: str) -> Path:
    """``latest`` -> newest complete checkpoint under ``root``; else a checkpoint path."""
    if spec == "latest":
        found = list_checkpoints(root)
        if not found:
            raise PipelineError(f"--resume_from_checkpoint latest: no complete checkpoint under {root}")
        return found[-1]
    path = Path(spec)
    if not (path / COMPLETE).exists():
        raise PipelineError(f"--resume_from_checkpoint {spec}: not a complete PPO checkpoint (no {COMPLETE})")
    return path


def _optimizer_to_flat(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save(root: Path, iteration: int, accelerator, module, optimizer, scheduler, state: dict, policy_peft) -> Path:
    """Write checkpoint ``iteration`` under ``root`` (collective call: every process enters)."""
    final = iteration_dir(root, iteration)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_tensors, rng_meta = _rng_state()
    rank = accelerator.process_index
    save_file(rng_tensors, str(tmp / f"rng-{rank}.safetensors"))
    (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_meta))
    if accelerator.is_main_process:
        save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        policy_peft.save_pretrained(str(tmp / POLICY_ADAPTER))
        full = {
            **state,
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(),
            "world_size": accelerator.num_processes,
        }
        (tmp / "state.json").write_text(json.dumps(full, indent=1, default=_json_default))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(json.dumps({"iteration": iteration}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _json_default(obj):
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return None  # scheduler lr_lambdas (functions) are rebuilt from the config


def load(path: Path, accelerator, module, optimizer, scheduler) -> dict:
    """Restore a checkpoint into the live objects; returns its ``state.json`` (iteration, cursor, ...)."""
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != accelerator.num_processes:
        raise PipelineError(
            f"{path} was written by {state['world_size']} processes and this run has {accelerator.num_processes}; "
            "resume with the same number of processes"
        )
    tensors = load_file(str(path / "trainable.safetensors"))
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        raise PipelineError(
            f"{path} does not match this model's trainable parameters (different LoRA or value setup?)"
        )
    module.load_state_dict(tensors, strict=False)
    _optimizer_from_flat(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rank = accelerator.process_index
    _set_rng_state(
        load_file(str(path / f"rng-{rank}.safetensors")), json.loads((path / f"rng-{rank}.json").read_text())
    )
    return state
