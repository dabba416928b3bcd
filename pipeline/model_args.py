"""TRL's ``ModelConfig`` plus the adapter placement the SFT and reward stages add to it."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig


@dataclass
class ModelArguments(ModelConfig):
    lora_layers: int | None = field(
        default=None,
        metadata={
            "help": "Put the LoRA adapter on the top N transformer layers only, so the backward pass stops there "
            "(default: every layer)."
        },
    )
