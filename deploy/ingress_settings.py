"""What the OpenAI ingress needs to know about the model it serves."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IngressSettings:
    """Fixed per deployment; the app builder fills it from the YAML config."""

    served_model_name: str  # the only ``model`` requests may name
    model_path: str  # checkpoint directory: tokenizer files, config.json (vocabulary size)
    max_model_len: int  # prompt + output tokens, as the decode engines enforce it
    max_n: int = 16  # choices per prompt (``n``) at most
    max_body_bytes: int = 32 << 20  # larger request bodies get 413

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
