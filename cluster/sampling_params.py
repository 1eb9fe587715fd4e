"""How to pick each next token and when to stop: travels with a request to every worker."""

from __future__ import annotations

import msgspec

from pdserve.cluster.errors import RequestError

MAX_LOGPROBS = 20  # top logprobs a request may ask for, as OpenAI allows


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request sampling and stopping; validated at the API boundary and again by the engine."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    seed: int | None = None  # per-request seed: the same seed gives the same tokens in any batch
    stop: tuple[str, ...] = ()  # stop strings; the text stops before the first one found
    stop_token_ids: tuple[
        int, ...
    ] = ()  # extra token ids that end the request (kept in the output)
    ignore_eos: bool = False  # keep going past the model's end-of-sequence tokens
    logprobs: int | None = None  # None: no logprobs; n >= 0: the sampled token's and n top ones
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # in the detokenized text

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise RequestError (a ValueError) naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens"
            )
        if not self.temperature >= 0.0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise RequestError(
                f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}", "top_k"
            )
        if self.seed is not None and not isinstance(self.seed, int):
            raise RequestError(f"seed must be an integer, got {self.seed!r}", "seed")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}", "logprobs"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop must be non-empty strings, got {list(self.stop)!r}", "stop")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(
                    f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})",
                    "stop_token_ids",
                )
