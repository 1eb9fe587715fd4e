"""One API request as the ingress runs it: the generate requests it fans out to, and the state
of each choice as outputs arrive."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from pdserve.cluster.messages import GenerateRequest
from pdserve.cluster.request_output import RequestOutput, TokenLogprob
from pdserve.cluster.sampling_params import SamplingParams
from pdserve.deploy.openai_responses import Usage


@dataclass
class Choice:
    """Choice ``index`` (= prompt index * n + sample index) accumulated over its outputs."""

    index: int
    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_output_tokens: int = 0
    text_offset: int = 0  # characters of token text so far (legacy logprobs' text_offset)
    sent: bool = False  # a stream chunk of this choice has gone out

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
        self.num_output_tokens = max(out.num_output_tokens, len(self.token_ids))
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


@dataclass
class Job:
    """``prompts`` x ``n`` generations. ``requests[k]`` produces ``choices[k]``."""

    id: str  # "cmpl-<hex>" or "chatcmpl-<hex>"
    model: str
    prompts: list[list[int]]
    n: int
    stream: bool
    include_usage: bool
    return_token_ids: bool
    created: int = field(default_factory=lambda: int(time.time()))
    requests: list[GenerateRequest] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)

    @staticmethod
    def create(
        prefix: str,
        model: str,
        prompts: list[list[int]],
        sampling: list[list[SamplingParams]],  # [prompt i][sample j]
        *,
        stream: bool = False,
        include_usage: bool = False,
        return_token_ids: bool = False,
    ) -> Job:
        job = Job(
            id=f"{prefix}-{uuid.uuid4().hex}",
            model=model,
            prompts=prompts,
            n=len(sampling[0]),
            stream=stream,
            include_usage=include_usage,
            return_token_ids=return_token_ids,
        )
        now = time.time()
        for i, (ids, per_prompt) in enumerate(zip(prompts, sampling, strict=True)):
            for j, sp in enumerate(per_prompt):
                job.requests.append(
                    GenerateRequest(
                        request_id=f"{job.id}-{i}-{j}",
                        prompt_token_ids=ids,
                        sampling=sp,
                        arrival_time=now,
                    )
                )
                job.choices.append(Choice(index=len(job.choices), prompt_index=i))
        return job

    def prompt_ids(self, choice: Choice) -> list[int]:
        return self.prompts[choice.prompt_index]

    def usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.num_output_tokens for c in self.choices)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
