"""``/v1/completions`` responses and stream chunks, built from a Job's choices."""

from __future__ import annotations

from msgspec import UNSET

from pdserve.cluster.request_output import RequestOutput
from pdserve.deploy.job import Choice, Job
from pdserve.deploy.logprob_formatter import LogprobFormatter
from pdserve.deploy.openai_responses import Completion, CompletionChoice


class CompletionFormat:
    def __init__(self, job: Job, logprobs: LogprobFormatter | None) -> None:
        self.job = job
        self.logprobs = logprobs  # None: the request asked for no logprobs

    def opening(self) -> list[Completion]:
        """Chunks a stream starts with before any token: none for completions."""
        return []

    def chunk(self, choice: Choice, out: RequestOutput) -> Completion | None:
        """The stream chunk for ``out``, just added to ``choice``; None when it carries nothing
        to send (text held back by the decode side, and no token ids or logprobs wanted)."""
        job = self.job
        if not (out.text or out.finished or self.logprobs or job.return_token_ids):
            return None
        c = CompletionChoice(index=choice.index, text=out.text)
        if out.finished:
            c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        if self.logprobs is not None:
            c.logprobs, choice.text_offset = self.logprobs.completion(
                out.logprobs or [], choice.text_offset
            )
        if job.return_token_ids:
            c.token_ids = list(out.token_ids)
            if not choice.sent:
                c.prompt_token_ids = job.prompt_ids(choice)
        choice.sent = True
        return self._wrap([c], None if job.include_usage else UNSET)

    def usage_chunk(self) -> Completion:
        return self._wrap([], self.job.usage())

    def response(self) -> Completion:
        job = self.job
        choices = []
        for choice in job.choices:
            c = CompletionChoice(
                index=choice.index,
                text=choice.text,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
            if self.logprobs is not None:
                c.logprobs, _ = self.logprobs.completion(choice.logprobs, 0)
            if job.return_token_ids:
                c.token_ids, c.prompt_token_ids = choice.token_ids, job.prompt_ids(choice)
            choices.append(c)
        return self._wrap(choices, job.usage())

    def _wrap(self, choices: list[CompletionChoice], usage) -> Completion:
        job = self.job
        return Completion(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=usage
        )
