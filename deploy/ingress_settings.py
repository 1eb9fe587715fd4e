"""What the OpenAI ingress needs to know about the model it serves, and its limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from pdserve.deploy.api_keys import check_key, keys_from_env


@dataclass(frozen=True)
class IngressSettings:
    """Fixed per deployment; the app builder fills it from the YAML config."""

    served_model_name: str  # the only ``model`` requests may name
    model_path: str  # checkpoint directory: tokenizer files, config.json (vocabulary size)
    max_model_len: int  # prompt + output tokens, as the decode engines enforce it
    max_n: int = 16  # choices per prompt (``n``) at most
    max_body_bytes: int = 16 << 20  # larger request bodies get 413
    max_choices: int = 256  # prompts x n of one request at most: one request fans out this far
    # /v1/completions text prompts: special-token text is the special token (as in vLLM); False
    # encodes it as plain text. Token-id prompts name any token either way; chat message text
    # is always plain text (only the chat template writes control tokens).
    prompt_special_tokens: bool = True
    # requests must carry one of these (the ingress adds PDSERVE_API_KEYS); empty: open
    api_keys: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_choices < 1:
            raise ValueError(f"max_choices must be >= 1, got {self.max_choices}")
        if not isinstance(self.api_keys, tuple):
            raise ValueError(f"api_keys must be a tuple, got {type(self.api_keys).__name__}")
        for i, key in enumerate(self.api_keys):
            check_key(key, f"api_keys[{i}]")

    def with_env_keys(self, environ: Mapping[str, str]) -> IngressSettings:
        """These settings with the keys of ``PDSERVE_API_KEYS`` in ``environ`` added."""
        return replace(self, api_keys=self.api_keys + keys_from_env(environ))
