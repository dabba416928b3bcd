"""Dataset loading and conversion to the conversational formats the stages train on.

``--dataset_name`` is a hub id or a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file.
Accepted row formats (TRL's standard ones, plus Anthropic HH raw text):

=================  ==========================================================  ==========
kind               columns                                                     used by
=================  ==========================================================  ==========
conversational     ``messages`` (list of {role, content})                      sft, prompt
ShareGPT           ``conversations`` (list of {from: human/gpt/system, value}) sft, prompt
H4/UltraFeedback   ``prompt`` + ``chosen`` + ``rejected`` whole conversations  rm
prompt-completion  ``prompt`` + ``completion`` (strings or message lists)      sft
preference         ``prompt`` + ``chosen`` + ``rejected``                      rm
implicit prompt    ``chosen`` + ``rejected`` (shared conversation prefix)      rm
prompt-only        ``prompt``                                                  ppo, eval
HH raw text        "\\n\\nHuman: ... \\n\\nAssistant: ..." in any of the above   all
=================  ==========================================================  ==========

Every stage receives rows in one canonical form: ``prompt`` is a list of messages ending
with a user turn; ``completion``/``chosen``/``rejected`` are one-message assistant lists.
A file that fits no format gets a one-line :class:`PipelineError` naming file, row and need.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pipeline.artifacts import embedded_data, input_record
from pipeline.errors import PipelineError

Kind = Literal["sft", "preference", "prompt"]

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_ROLES = {"system", "user", "assistant"}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


# --------------------------------------------------------------------------- raw loading
def _check_jsonl(path: Path) -> None:
    """Fail on the first malformed line with its number (datasets' own error is pages long)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(
                f"{path}: line {i}: invalid JSON ({e.msg}); expected one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise PipelineError(f"{path}: line {i}: expected a JSON object, got {type(obj).__name__}")


def load_rows(name: str, split: str = "train", config: str | None = None):
    """Load a ``datasets.Dataset`` from a local file or a hub id, with one-line errors."""
    from datasets import load_dataset

    path = Path(name)
    if path.suffix.lower() in LOCAL_BUILDERS or path.exists():
        if not path.is_file():
            raise PipelineError(f"dataset file {path} does not exist")
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise PipelineError(f"{path}: unsupported file type {path.suffix!r}; use .json, .jsonl, .parquet or .csv")
        if path.stat().st_size == 0:
            raise PipelineError(
                f"{path}: the file is empty; expected rows in one of the formats in `pipeline/data.py`"
            )
        if path.suffix.lower() == ".jsonl":
            _check_jsonl(path)
        try:
            ds = load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many types; we report one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PipelineError(f"{path}: could not be read as {builder} ({msg})") from None
    else:
        try:
            ds = load_dataset(name, config, split=split)
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PipelineError(f"could not load dataset {name!r} split {split!r} ({msg})") from None
    if len(ds) == 0:
        raise PipelineError(f"{name}: no rows")
    return ds


# --------------------------------------------------------------------------- conversion
def parse_hh(text: str) -> list[dict]:
    """Anthropic HH raw text -> messages. ``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> user/assistant."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))  # -> ['', 'Human', 'a', 'Assistant', 'b', ...]
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not Human/Assistant text")
    role_map = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role_map[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _is_hh(text: Any) -> bool:
    return isinstance(text, str) and bool(re.search(r"(^|\n\n)Human: ", text)) and "Assistant:" in text


def _as_messages(value: Any, default_role: str) -> list[dict]:
    """A cell (string, HH text or message list) -> a list of messages."""
    if isinstance(value, str):
        if _is_hh(value):
            return parse_hh(value)
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        if all("from" in m and "value" in m for m in value):  # ShareGPT: {"from": "human", "value": ...}
            value = [{"role": _SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]} for m in value]
        for m in value:
            if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages need a role in {sorted(_ROLES)} and string content, got {m!r}")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"expected a string or a list of messages, got {type(value).__name__}")


def _split_last_assistant(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant turn")
    prompt = messages[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the assistant turn must follow a user turn")
    return prompt, messages[-1:]


def _prompt_only(messages: list[dict]) -> list[dict]:
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn")
    return messages


def _common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _conversation(row: dict):
    """The ``messages`` column, or ShareGPT's ``conversations``."""
    for key in ("messages", "conversations"):
        if row.get(key) is not None:
            return row[key]
    return None


def convert_sft(row: dict) -> dict:
    if _conversation(row) is not None:
        prompt, completion = _split_last_assistant(_as_messages(_conversation(row), "user"))
    elif "prompt" in row and "completion" in row:
        prompt = _prompt_only(_as_messages(row["prompt"], "user"))
        completion = _as_messages(row["completion"], "assistant")
        if len(completion) != 1 or completion[0]["role"] != "assistant":
            raise ValueError("completion must be one assistant message")
    elif "text" in row and _is_hh(row["text"]):
        prompt, completion = _split_last_assistant(parse_hh(row["text"]))
    else:
        raise KeyError(
            "expected columns `messages` (or ShareGPT `conversations`), or `prompt` + `completion`, or HH-style `text`"
        )
    return {"prompt": prompt, "completion": completion}


def _after_prompt(messages: list[dict], prompt: list[dict]) -> list[dict]:
    """``messages`` without a leading copy of ``prompt``."""
    n = len(prompt)
    return messages[n:] if len(messages) > n and messages[:n] == prompt else messages


def convert_preference(row: dict) -> dict:
    if "chosen" not in row or "rejected" not in row:
        raise KeyError("expected columns `chosen` + `rejected` (and optionally `prompt`)")
    if row.get("prompt") is not None:
        prompt = _prompt_only(_as_messages(row["prompt"], "user"))
        # UltraFeedback / H4 layout: chosen and rejected hold the whole conversation, the prompt included.
        chosen = _after_prompt(_as_messages(row["chosen"], "assistant"), prompt)
        rejected = _after_prompt(_as_messages(row["rejected"], "assistant"), prompt)
    else:  # implicit prompt: both sides hold the whole conversation
        c = _as_messages(row["chosen"], "assistant")
        r = _as_messages(row["rejected"], "assistant")
        n = _common_prefix(c, r)
        while n > 0 and c[n - 1]["role"] != "user":
            n -= 1
        if n == 0:
            raise ValueError("chosen and rejected share no prompt; add a `prompt` column")
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise ValueError(f"{side} must be one assistant reply after the prompt")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def convert_prompt(row: dict) -> dict:
    if row.get("prompt") is not None:
        return {"prompt": _prompt_only(_as_messages(row["prompt"], "user"))}
    if _conversation(row) is not None:
        return {"prompt": _prompt_only(_as_messages(_conversation(row), "user"))}
    if row.get("chosen") is not None and _is_hh(row["chosen"]):
        return {"prompt": _prompt_only(parse_hh(row["chosen"]))}
    raise KeyError("expected a `prompt` column (or `messages`)")


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "sft": convert_sft,
    "preference": convert_preference,
    "prompt": convert_prompt,
}


def load_for(kind: Kind, name: str | None, split: str = "train", config: str | None = None, limit: int | None = None):
    """Load ``name`` (or the embedded data when None) and convert every row for ``kind``."""
    from datasets import Dataset

    source = str(embedded_data(kind, split)) if name is None else name
    ds = load_rows(source, split=split, config=config)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    convert = CONVERTERS[kind]
    rows = []
    for i, row in enumerate(ds):
        try:
            rows.append(convert(row))
        except (KeyError, ValueError) as e:
            msg = e.args[0] if e.args else str(e)
            raise PipelineError(
                f"{source}: row {i}: {msg} for {kind} data (columns: {', '.join(ds.column_names)})"
            ) from None
    return Dataset.from_list(rows)


def prompt_text(prompt: list[dict] | str) -> str:
    """The last user message of a prompt (what the gold judge reads)."""
    if isinstance(prompt, str):
        return prompt
    for m in reversed(prompt):
        if m["role"] == "user":
            return m["content"]
    return ""


def source_record(kind: Kind, name: str | None, split: str = "train") -> dict:
    """The input record (path and content hash) of the data ``load_for(kind, name, split)`` reads."""
    return input_record(name if name is not None else embedded_data(kind, split))
