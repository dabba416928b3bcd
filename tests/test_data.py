"""Data loading: every accepted format converts to the canonical form; bad files fail in one line."""

from __future__ import annotations

import pytest

from pipeline.artifacts import PipelineError
from pipeline.data import convert_preference, convert_prompt, convert_sft, load_for, parse_hh
from tests.conftest import write_jsonl

U = {"role": "user", "content": "Hi there"}
A = {"role": "assistant", "content": "Hello!"}
B = {"role": "assistant", "content": "Go away."}


def test_sft_formats_agree():
    want = {"prompt": [U], "completion": [A]}
    assert convert_sft({"messages": [U, A]}) == want
    assert convert_sft({"prompt": [U], "completion": [A]}) == want
    assert convert_sft({"prompt": "Hi there", "completion": "Hello!"}) == want
    assert convert_sft({"text": "\n\nHuman: Hi there\n\nAssistant: Hello!"}) == want


def test_multi_turn_messages_keep_history_and_train_on_last_reply():
    sys = {"role": "system", "content": "Be brief."}
    out = convert_sft({"messages": [sys, U, A, U, B]})
    assert out["prompt"] == [sys, U, A, U] and out["completion"] == [B]


def test_preference_formats_agree():
    want = {"prompt": [U], "chosen": [A], "rejected": [B]}
    assert convert_preference({"prompt": [U], "chosen": [A], "rejected": [B]}) == want
    assert convert_preference({"prompt": "Hi there", "chosen": "Hello!", "rejected": "Go away."}) == want
    assert convert_preference({"chosen": [U, A], "rejected": [U, B]}) == want  # implicit prompt
    hh = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away.",
    }
    assert convert_preference(hh) == want


def test_prompt_formats_agree():
    want = {"prompt": [U]}
    assert convert_prompt({"prompt": "Hi there"}) == want
    assert convert_prompt({"prompt": [U]}) == want
    assert convert_prompt({"messages": [U, A]}) == want
    assert convert_prompt({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!"}) == want


def test_parse_hh_multi_turn():
    msgs = parse_hh("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_file_types(tmp_path, fmt):
    from datasets import Dataset

    rows = [{"prompt": "Hi there", "completion": "Hello!"}] * 3
    path = tmp_path / f"d.{fmt}"
    ds = Dataset.from_list(rows)
    {
        "jsonl": lambda: ds.to_json(path, lines=True),
        "json": lambda: ds.to_json(path, lines=False),
        "csv": lambda: ds.to_csv(path),
        "parquet": lambda: ds.to_parquet(path),
    }[fmt]()
    out = load_for("sft", str(path))
    assert len(out) == 3 and out[0]["completion"] == [A]


def test_embedded_default_loads():
    assert len(load_for("prompt", None, "test")) >= 200


@pytest.mark.parametrize(
    "content, kind, needle",
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', "sft", "line 2: invalid JSON"),
        ('["not", "an", "object"]\n', "sft", "line 1: expected a JSON object"),
        ('{"question": "a", "answer": "b"}\n', "sft", "row 0: expected columns `messages`"),
        ('{"prompt": "a", "chosen": "b"}\n', "preference", "row 0: expected columns `chosen` + `rejected`"),
        (
            '{"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}], '
            '"rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "c"}]}\n',
            "preference",
            "share no prompt",
        ),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', "sft", "must end with an assistant turn"),
        ('{"messages": [{"role": "robot", "content": "a"}]}\n', "sft", "role in"),
        ('{"text": "plain"}\n', "prompt", "expected a `prompt` column"),
    ],
)
def test_bad_rows_fail_in_one_line(tmp_path, content, kind, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PipelineError) as e:
        load_for(kind, str(path))
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_empty_missing_and_unsupported_files(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    for name, needle in (
        (str(empty), "empty"),
        (str(tmp_path / "nope.jsonl"), "does not exist"),
        (str(write_jsonl(tmp_path / "x.txt", [{"a": 1}])), "unsupported file type"),
    ):
        with pytest.raises(PipelineError, match=needle):
            load_for("sft", name)


def test_sharegpt_conversations():
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Name a volcano."},
            {"from": "gpt", "value": "Etna."},
        ]
    }
    assert convert_sft(row) == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a volcano."}],
        "completion": [{"role": "assistant", "content": "Etna."}],
    }
    assert convert_prompt(row)["prompt"][-1] == {"role": "user", "content": "Name a volcano."}


def test_ultrafeedback_h4_layout():
    """A prompt string plus chosen/rejected holding the whole conversation (HuggingFaceH4/ultrafeedback_binarized)."""
    user = {"role": "user", "content": "Name a volcano."}
    row = {
        "prompt": "Name a volcano.",
        "chosen": [user, {"role": "assistant", "content": "Etna."}],
        "rejected": [user, {"role": "assistant", "content": "A mountain."}],
    }
    assert convert_preference(row) == {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "Etna."}],
        "rejected": [{"role": "assistant", "content": "A mountain."}],
    }


def test_non_utf8_file_is_one_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(PipelineError, match="not UTF-8 text .*save the file as UTF-8"):
        load_for("prompt", str(bad))
