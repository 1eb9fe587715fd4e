"""Prompts to token ids for the ingress: completion texts and chat conversations, refused from
their length when they cannot fit the context, and tokenized off the event loop when long."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from pdserve.cluster.errors import RequestError
from pdserve.cluster.tokenizer import PromptTooLong, Tokenizer
from pdserve.deploy.ingress_settings import IngressSettings

_THREAD_TOKENIZE_CHARS = 1 << 16  # longer text is tokenized off the event loop
T = TypeVar("T")


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, settings: IngressSettings) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.limit = settings.max_model_len - 1  # prompt tokens at most: one left for output

    async def texts(self, texts: list[tuple[str, str]]) -> list[list[int]]:
        """Each ``(text, where)`` completion prompt's ids; special-token text is the special
        token unless the settings say ``prompt_special_tokens=False``. ``where`` names the
        prompt in errors."""
        special, limit = self.settings.prompt_special_tokens, self.limit

        def run() -> list[list[int]]:
            out = []
            for text, where in texts:
                try:
                    out.append(self.tokenizer.encode(text, special_tokens=special, limit=limit))
                except PromptTooLong as e:
                    raise self._too_long(e, where, "prompt") from None
            return out

        try:
            return await self._run(run, sum(len(t) for t, _ in texts))
        except RequestError:
            raise
        except (TypeError, ValueError) as e:
            raise RequestError(f"cannot tokenize the prompt: {e}", "prompt") from None

    async def conversation(
        self, conversation: list[dict[str, str]], template_args: dict[str, Any] | None = None
    ) -> list[int]:
        """The chat template applied to ``conversation`` (and ``template_args``, the variables
        it may read beside the messages): message text is plain text."""

        def run() -> list[int]:
            return self.tokenizer.apply_chat_template(
                conversation, limit=self.limit, template_args=template_args
            )

        try:
            return await self._run(run, sum(len(m["content"]) for m in conversation))
        except PromptTooLong as e:
            raise self._too_long(e, "the conversation", "messages") from None
        except ValueError as e:
            raise RequestError(f"cannot apply the chat template: {e}", "messages") from None

    async def _run(self, fn: Callable[[], T], chars: int) -> T:
        if chars > _THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(fn)
        return fn()

    def _too_long(self, e: PromptTooLong, where: str, param: str) -> RequestError:
        return RequestError(
            f"{where} has at least {e.at_least} tokens ({e.chars} characters); the context "
            f"limit is {self.settings.max_model_len} tokens, output included",
            param,
        )
