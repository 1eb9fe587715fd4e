"""``/v1/chat/completions`` responses and stream chunks, built from a Job's choices.

A choice with a harmony parser (a model that answers in harmony's channels) takes its message
from its token ids: the final channel's text is ``content``, the analysis channel's
``reasoning_content``; otherwise ``content`` is the engine's text.
"""

from __future__ import annotations

from msgspec import UNSET

from pdserve.cluster.harmony import HarmonyParser
from pdserve.cluster.request_output import RequestOutput
from pdserve.deploy.job import Choice, Job
from pdserve.deploy.logprob_formatter import LogprobFormatter
from pdserve.deploy.openai_responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Delta,
)


class ChatFormat:
    def __init__(
        self,
        job: Job,
        logprobs: LogprobFormatter | None,
        parsers: list[HarmonyParser | None] | None = None,
    ) -> None:
        self.job = job
        self.logprobs = logprobs  # None: the request asked for no logprobs
        # per choice: the harmony parser of its reply, or None (content is the engine's text)
        self.parsers = parsers or [None] * len(job.choices)

    def opening(self) -> list[ChatCompletionChunk]:
        """Each choice's first chunk, ``{"role": "assistant", "content": ""}``; the first one
        also carries the prompt's token ids when ``return_token_ids`` is set."""
        job = self.job
        chunks = []
        for choice in job.choices:
            c = ChatChunkChoice(index=choice.index, delta=Delta(role="assistant", content=""))
            chunk = self._wrap([c])
            if job.return_token_ids and not chunks:
                chunk.prompt_token_ids = job.prompts[0]
            chunks.append(chunk)
        return chunks

    def chunk(self, choice: Choice, out: RequestOutput) -> ChatCompletionChunk | None:
        """The stream chunk for ``out``, just added to ``choice``; None when it carries nothing
        to send (text held back by the decode side, and no token ids or logprobs wanted)."""
        job = self.job
        parser = self.parsers[choice.index]
        if parser is None:
            text, reasoning = out.text, ""
        else:
            text, reasoning = parser.feed(out.token_ids, out.finished)
        if not (text or reasoning or out.finished or self.logprobs or job.return_token_ids):
            return None
        delta = Delta(content=text) if text or not (reasoning or out.finished) else Delta()
        if reasoning:
            delta.reasoning_content = reasoning
        c = ChatChunkChoice(index=choice.index, delta=delta)
        if out.finished:
            c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        if self.logprobs is not None:
            c.logprobs = self.logprobs.chat(out.logprobs or [])
        if job.return_token_ids:
            c.token_ids = list(out.token_ids)
        choice.sent = True
        return self._wrap([c])

    def usage_chunk(self) -> ChatCompletionChunk:
        chunk = self._wrap([])
        chunk.usage = self.job.usage()
        return chunk

    def response(self) -> ChatCompletion:
        job = self.job
        choices = []
        for choice in job.choices:
            c = ChatChoice(
                index=choice.index,
                message=self._message(choice),
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
            if self.logprobs is not None:
                c.logprobs = self.logprobs.chat(choice.logprobs)
            if job.return_token_ids:
                c.token_ids = choice.token_ids
            choices.append(c)
        out = ChatCompletion(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=job.usage()
        )
        if job.return_token_ids:
            out.prompt_token_ids = job.prompts[0]
        return out

    def _message(self, choice: Choice) -> AssistantMessage:
        parser = self.parsers[choice.index]
        if parser is None:
            return AssistantMessage(content=choice.text)
        content, reasoning = parser.feed(choice.token_ids, finished=True)
        message = AssistantMessage(content=content)
        if reasoning:
            message.reasoning_content = reasoning
        return message

    def _wrap(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        job = self.job
        return ChatCompletionChunk(
            id=job.id,
            created=job.created,
            model=job.model,
            choices=choices,
            usage=None if job.include_usage else UNSET,
        )
