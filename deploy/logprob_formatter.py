"""Token log-probabilities in the two OpenAI formats: legacy completions and chat."""

from __future__ import annotations

from pdserve.cluster.request_output import TokenLogprob
from pdserve.cluster.tokenizer import Tokenizer
from pdserve.deploy.openai_responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)

_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way


class LogprobFormatter:
    """Renders ``TokenLogprob``s with each token's own text, ``tokenizer.decode([id])`` with
    special tokens kept (so an end-of-sequence token shows as itself, not as "")."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._text: dict[int, str] = {}  # token id -> text; bounded by the vocabulary

    def token(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._tok.decode([token_id], skip_special_tokens=False)
            self._text[token_id] = text
        return text

    def completion(
        self, logprobs: list[TokenLogprob], offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """The legacy format for consecutive tokens whose text starts at character ``offset``
        of the choice; also returns the offset after them. Each ``top_logprobs`` entry holds the
        best alternatives and the sampled token."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for lp in logprobs:
            text = self.token(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(max(lp.logprob, _FLOOR))
            top = {self.token(t): max(v, _FLOOR) for t, v in lp.top}
            top.setdefault(text, max(lp.logprob, _FLOOR))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        return out, offset

    def chat(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for lp in logprobs:
            text = self.token(lp.token_id)
            top = [
                TopLogprob(token=(t := self.token(i)), logprob=max(v, _FLOOR), bytes=_bytes(t))
                for i, v in lp.top
            ]
            content.append(
                ChatTokenLogprob(
                    token=text,
                    logprob=max(lp.logprob, _FLOOR),
                    bytes=_bytes(text),
                    top_logprobs=top,
                )
            )
        return ChatLogprobs(content=content)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))
