"""What the engine hands out for a request after each step: new tokens, text and logprobs. It
crosses process boundaries (decode replica -> ingress), so it is a msgspec Struct."""

from __future__ import annotations

import msgspec


class TokenLogprob(msgspec.Struct, frozen=True):
    """One output token's log-probability and the best alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


class RequestOutput(msgspec.Struct, kw_only=True):
    """What one step produced for one request: the new tokens and text since the last output.
    ``generate`` accumulates these into whole outputs."""

    request_id: str
    token_ids: list[int]  # new token ids
    text: str  # new text
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total so far
    prompt_token_ids: list[int] | None = None  # set on the first output only
    error: str | None = None

    def absorb(self, later: RequestOutput) -> None:
        """Append a later output of the same request (tokens, text, logprobs; its state)."""
        self.token_ids += later.token_ids
        self.text += later.text
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finished, self.finish_reason = later.finished, later.finish_reason
        self.stop_reason, self.num_output_tokens = later.stop_reason, later.num_output_tokens
