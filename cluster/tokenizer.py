"""A checkpoint's tokenizer and chat template (Hugging Face files, loaded offline)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer  # heavy; only processes that tokenize pay for it

        if not (Path(path) / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in model directory {str(path)!r}")
        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.hf)
        self.eos_token_id = self.hf.eos_token_id
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render the conversation and tokenize it; the template supplies any BOS itself."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text, add_special_tokens=False)
