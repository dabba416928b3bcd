"""Tiny models and tokenizers built from config inside the tests (no hub, no real weights), and the helpers
the PPO tests share."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Explain why volcanoes erupt. Answer in all lowercase.",
    "volcanoes erupt when magma rises through the crust and pressure builds.",
    "Describe photosynthesis to a beginner. Do not use any commas.",
    "Plants turn sunlight, water and air into sugar and oxygen.",
    "- first point\n- second point\n- third point",
    '{"answer": "coffee is a drink made from roasted beans."}',
    "Sure! Here is a short answer about the ocean, tides and the moon. Hope this helps!",
    "What is the capital of France? The capital of France is Paris.",
]


def make_tokenizer(path: Path, vocab_size: int = 300, seed_text: list[str] | None = None):
    """A byte-level BPE tokenizer with ChatML specials; pad (<|endoftext|>) differs from eos (<|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator((seed_text or CORPUS) * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return tok


def tiny_llama_config(tok, **kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    base.update(kw)
    return LlamaConfig(**base)


def make_causal_lm(path: Path, tok, seed: int = 0, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tok, **kw))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def make_seq_cls(path: Path, tok, seed: int = 1, num_labels: int = 1, **kw):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_llama_config(tok, **kw)
    cfg.num_labels = num_labels
    model = AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def fake_stage(artifact_dir: Path, stage: str, maker, tok, **kw) -> Path:
    """Write a complete stage directory (model + manifest) as if the stage had run."""
    from pipeline.artifacts import Layout

    d = Layout(artifact_dir).stage(stage)
    maker(Layout(artifact_dir).model(stage), tok, **kw)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "status": "complete", "fingerprint": "test"}))
    return d


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def tiny_artifacts(tmp_path, tiny_tok):
    """An artifact dir with tiny sft/ and reward/ stages."""
    art = tmp_path / "artifacts"
    fake_stage(art, "sft", make_causal_lm, tiny_tok)
    fake_stage(art, "reward", make_seq_cls, tiny_tok)
    return art


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_rows(n: int) -> list[dict]:
    topics = ["volcanoes", "coffee", "the ocean", "photosynthesis", "chess", "bread", "rain", "trains"]
    return [
        {"prompt": [{"role": "user", "content": f"Tell me about {topics[i % len(topics)]}, take {i}."}]}
        for i in range(n)
    ]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; a test that sets it up itself starts and ends clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# ----------------------------------------------------------------------------- PPO runs on tiny models

# Small, fast PPO settings shared by the PPO tests; tests override what they exercise.
PPO_BASE = dict(
    num_iterations=2,
    rollout_batch_size=4,
    num_mini_batches=2,
    per_device_train_batch_size=2,
    local_rollout_forward_batch_size=4,
    response_length=6,
    save_every=100,
    sample_every=0,
    lora_r=4,
    lora_alpha=8,
    seed=0,
    dtype="float32",  # not the default auto: the same precision on every host
    mixed_precision="no",
)


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)]
    return out


def run_ppo(art: Path, prompts: Path, **kw) -> int:
    """The PPO stage's command line on ``art`` (``PPO_BASE`` plus ``kw``); returns the exit status."""
    from pipeline.stage_ppo import cli

    return cli(["--artifact_dir", str(art), "--dataset_name", str(prompts)] + flags({**PPO_BASE, **kw}))


def ppo_arguments(art: Path, prompts: Path, **kw):
    """``(StageArguments, ModelArguments, PPOArguments)`` as the PPO command line parses them."""
    from pipeline.stage_ppo import make_parser

    argv = ["--artifact_dir", str(art), "--dataset_name", str(prompts)] + flags({**PPO_BASE, **kw})
    return make_parser().parse_args_and_config(args=argv, fail_with_unknown_args=True)[:3]


def make_trainer(art: Path, prompts: Path, reward_fn=None, **kw):
    """The PPO trainer the stage builds, before its loop: ``(trainer, the stage's own reward_fn, a batch)``. On
    the CPU on every machine (its callers check CPU-path choices such as the update's chunking); Accelerate's
    process-wide state must be fresh or CPU already (``fresh_accelerate_state``)."""
    from accelerate import Accelerator

    from pipeline.stage_ppo import check_args, setup

    stage, model_args, args = ppo_arguments(art, prompts, **kw)
    check_args(model_args, args, has_cuda=False)  # as the stage's main: checked, auto settings resolved
    trainer = setup(stage, model_args, args, Accelerator(cpu=True, mixed_precision=args.mixed_precision))
    own = trainer.reward_fn
    if reward_fn is not None:
        trainer.reward_fn = reward_fn
    return trainer, own, [r["prompt"] for r in prompt_rows(args.rollout_batch_size)]


def replace_reward(monkeypatch, reward_fn=None, wrap=None) -> None:
    """Make the PPO stage use ``reward_fn(prompts, responses) -> Tensor[B]`` instead of the reward model
    (or ``wrap(real_reward_fn)``)."""
    import pipeline.stage_ppo as stage_ppo

    real_build = stage_ppo.build

    def build(*a, **k):
        built = real_build(*a, **k)
        built.reward_fn = wrap(built.reward_fn) if wrap is not None else reward_fn
        return built

    monkeypatch.setattr(stage_ppo, "build", build)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_lines(err: str) -> list[str]:
    """The ``error: ...`` lines of a run's stderr; the message, if any, must be its last line (one line)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    if lines:
        assert err.rstrip().splitlines()[-1] == lines[-1], err[-2000:]
    return lines


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(32))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls are far slower with 2 spinning OpenMP threads on a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: str, *script_args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 CPU processes (``--cpu --num_processes 2`` would silently run one)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {
        **os.environ,
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        script,
        *script_args,
    ]
    return subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300
    )


# ----------------------------------------------------------------------------- SFT and reward stages on tiny models

FAST = [
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--lora_r",
    "4",
    "--lora_alpha",
    "8",
]


def error_line(capsys) -> str:
    """The one `error: ...` line a failed stage prints (progress bars may precede it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def sft_rows(n=16):
    return [
        {
            "prompt": [{"role": "user", "content": f"Explain volcanoes, take {i}. Answer in all lowercase."}],
            "completion": [{"role": "assistant", "content": "volcanoes erupt when magma rises."}],
        }
        for i in range(n)
    ]


def pref_rows(n=16):
    return [
        {
            "prompt": [{"role": "user", "content": f"Explain volcanoes, take {i}. Answer in all lowercase."}],
            "chosen": [{"role": "assistant", "content": "volcanoes erupt when magma rises."}],
            "rejected": [{"role": "assistant", "content": "Volcanoes erupt when magma rises."}],
        }
        for i in range(n)
    ]


@pytest.fixture
def setup(tmp_path, tiny_tok):
    """A tiny base model and SFT and preference files, for the SFT and reward stages."""
    base = tmp_path / "base"
    make_causal_lm(base, tiny_tok)
    data = tmp_path / "data"
    data.mkdir()
    return {
        "base": base,
        "artifacts": tmp_path / "artifacts",
        "sft": write_jsonl(data / "sft.jsonl", sft_rows()),
        "pref": write_jsonl(data / "pref.jsonl", pref_rows()),
    }


def run_sft(s, *extra):
    from pipeline.stage_sft import cli as sft_cli

    return sft_cli(
        [
            "--model_name_or_path",
            str(s["base"]),
            "--dataset_name",
            str(s["sft"]),
            "--artifact_dir",
            str(s["artifacts"]),
            *FAST,
            *extra,
        ]
    )


def run_rm(s, *extra):
    from pipeline.stage_reward import cli as rm_cli

    return rm_cli(["--dataset_name", str(s["pref"]), "--artifact_dir", str(s["artifacts"]), *FAST, *extra])
