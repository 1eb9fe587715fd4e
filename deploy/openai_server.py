"""The OpenAI API's logic, free of HTTP and of Ray: validate, tokenize, fan out, format.

body --decode_request--> CompletionRequest | ChatCompletionRequest
     --checks, tokenize, chat template--> Job (prompts x n GenerateRequests)
     --merge_streams(generate)--> RequestOutput deltas --*Format--> JSON | SSE events
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.errors import ModelNotFoundError, RequestError
from pdserve.cluster.harmony import HarmonyTokens, reply_parser
from pdserve.cluster.sampling_params import MAX_LOGPROBS, SamplingParams
from pdserve.cluster.tokenizer import Tokenizer
from pdserve.deploy.chat_format import ChatFormat
from pdserve.deploy.completion_format import CompletionFormat
from pdserve.deploy.ingress_settings import IngressSettings
from pdserve.deploy.job import Job
from pdserve.deploy.logprob_formatter import LogprobFormatter
from pdserve.deploy.openai_errors import error_reply
from pdserve.deploy.openai_protocol import ChatCompletionRequest, CompletionRequest, decode_request
from pdserve.deploy.openai_responses import ModelCard, ModelList, encode
from pdserve.deploy.prompt_encoder import PromptEncoder
from pdserve.deploy.reply import JSONReply, Reply, StreamReply, error_json
from pdserve.deploy.sse import DONE, event
from pdserve.deploy.stream_merge import Generate, merge_streams

log = logging.getLogger(__name__)

METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI


class OpenAIServer:
    """Serves the OpenAI endpoints through three injected callables:

    - ``generate(GenerateRequest) -> AsyncIterator[RequestOutput]``: one completion's deltas,
      the first with ``prompt_token_ids``, the last with ``finished=True``; errors are raised
      while iterating (``cluster.errors`` classes map to statuses); closing the iterator early
      must abort the request.
    - ``health() -> (live, detail)``; ``metrics() -> Prometheus text``.

    Every method returns a reply and never raises: a bad request gets a 4xx naming the
    problem, overload 503 with Retry-After, anything else 500 (logged).
    """

    def __init__(
        self,
        settings: IngressSettings,
        generate: Generate,
        health: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
        metrics: Callable[[], Awaitable[str]],
    ) -> None:
        self.settings = settings
        self.tokenizer = Tokenizer(settings.model_path)
        self.harmony = HarmonyTokens.of(self.tokenizer)  # None: replies are plain text
        self.prompts = PromptEncoder(self.tokenizer, settings)
        self.vocab_size = ModelConfig.from_dir(settings.model_path).vocab_size
        self.token_text = LogprobFormatter(self.tokenizer)
        self._generate = generate
        self._health = health
        self._metrics = metrics
        self.created = int(time.time())

    # ---- endpoints ----

    async def completions(self, body: bytes) -> Reply:
        try:
            req = decode_request(body, CompletionRequest)
            job = await self._completion_job(req)
            lp = self.token_text if req.logprobs is not None else None
            return await self._run(job, CompletionFormat(job, lp))
        except Exception as e:  # noqa: BLE001 - every failure becomes a reply
            return error_json(e)

    async def chat_completions(self, body: bytes) -> Reply:
        try:
            req = decode_request(body, ChatCompletionRequest)
            job = await self._chat_job(req)
            lp = self.token_text if req.logprobs else None
            parsers = None
            if self.harmony is not None:  # each reply split into its channels
                tok, ids = self.tokenizer, self.harmony
                parsers = [reply_parser(tok, ids, r.sampling) for r in job.requests]
            return await self._run(job, ChatFormat(job, lp, parsers))
        except Exception as e:  # noqa: BLE001
            return error_json(e)

    async def models(self) -> JSONReply:
        s = self.settings
        card = ModelCard(
            id=s.served_model_name,
            created=self.created,
            root=s.model_path,
            max_model_len=s.max_model_len,
        )
        return JSONReply(200, encode(ModelList(data=[card])))

    async def health(self, detail: bool = True) -> JSONReply:
        """200 when both pools are live, else 503; the body carries ``health()``'s detail, or
        only the status when ``detail`` is false (a caller without an API key)."""
        try:
            live, info = await self._health()
            info = info if isinstance(info, dict) else {"detail": info}
        except Exception as e:  # noqa: BLE001
            log.warning("health check failed: %s", e)
            live, info = False, {"error": f"health check failed: {type(e).__name__}: {e}"}
        body: dict[str, Any] = {"status": "ok" if live else "unavailable"}
        if detail:
            body.update((k, v) for k, v in info.items() if k != "status")
        return JSONReply(200 if live else 503, encode(body))

    async def metrics(self) -> Reply:
        try:
            text = str(await self._metrics())
        except Exception as e:  # noqa: BLE001
            return error_json(e)
        return JSONReply(200, text.encode(), media_type=METRICS_MEDIA_TYPE)

    # ---- requests -> jobs ----

    async def _completion_job(self, req: CompletionRequest) -> Job:
        self._check_model(req.model)
        req.unsupported()
        req.check_sizes()
        self._check_n(req.n)
        batch = req.prompts()
        self._check_choices(len(batch), req.n)
        wheres = ["the prompt" if len(batch) == 1 else f"prompt {i}" for i in range(len(batch))]
        texts = [(p, w) for p, w in zip(batch, wheres) if isinstance(p, str)]
        encoded = iter(await self.prompts.texts(texts))
        prompts = [next(encoded) if isinstance(p, str) else p for p in batch]
        sampling = []
        for ids, where in zip(prompts, wheres):
            self._check_prompt(ids, where, "prompt")
            max_tokens = self._max_tokens(
                req.max_tokens, "max_tokens", len(ids), where, DEFAULT_COMPLETION_TOKENS
            )
            sampling.append(self._sampling(req, max_tokens, req.logprobs))
        return Job.create(
            "cmpl",
            self.settings.served_model_name,
            prompts,
            sampling,
            stream=req.stream,
            include_usage=req.include_usage,
            return_token_ids=req.return_token_ids,
        )

    async def _chat_job(self, req: ChatCompletionRequest) -> Job:
        self._check_model(req.model)
        req.unsupported()
        req.check_sizes()
        self._check_n(req.n)
        self._check_choices(1, req.n)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise RequestError(
                f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                "top_logprobs",
            )
        conversation = req.conversation()
        args = {"reasoning_effort": req.reasoning_effort} if req.reasoning_effort else None
        ids = await self.prompts.conversation(conversation, args)
        self._check_prompt(ids, "the conversation", "messages")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(req.requested_max_tokens, param, len(ids), "conversation")
        return Job.create(
            "chatcmpl",
            self.settings.served_model_name,
            [ids],
            [self._sampling(req, max_tokens, req.num_logprobs)],
            stream=req.stream,
            include_usage=req.include_usage,
            return_token_ids=req.return_token_ids,
        )

    def _check_model(self, model: str) -> None:
        if model != self.settings.served_model_name:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; this server serves "
                f"{self.settings.served_model_name!r}",
                "model",
            )

    def _check_n(self, n: int) -> None:
        if not 1 <= n <= self.settings.max_n:
            raise RequestError(f"n must be in [1, {self.settings.max_n}], got {n}", "n")

    def _check_choices(self, prompts: int, n: int) -> None:
        limit = self.settings.max_choices
        if prompts * n > limit:
            raise RequestError(
                f"the request asks for {prompts} prompt(s) x n={n} = {prompts * n} completions; "
                f"this server takes at most {limit} per request (split the batch)",
                "prompt" if prompts > 1 else "n",
            )

    def _check_prompt(self, ids: list[int], where: str, param: str) -> None:
        limit = self.settings.max_model_len
        if len(ids) >= limit:  # first: a cheap check that refuses huge prompts at once
            raise RequestError(
                f"{where} has {len(ids)} tokens; the context limit is {limit} tokens, "
                "output included",
                param,
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(
                f"{where} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}",
                param,
            )

    def _max_tokens(
        self, requested: int | None, param: str, prompt_len: int, where: str, default: int = 0
    ) -> int:
        """The output budget: ``requested`` if it fits the context, else a RequestError; when
        not requested, ``default`` (0: no default) cut to the rest of the context."""
        room = self.settings.max_model_len - prompt_len
        if requested is None:
            return min(default, room) if default else room
        if requested < 1:
            raise RequestError(f"{param} must be >= 1, got {requested}", param)
        if requested > room:
            raise RequestError(
                f"{param} {requested} plus the {prompt_len} tokens of {where} exceeds the "
                f"context limit of {self.settings.max_model_len} tokens",
                param,
            )
        return requested

    def _sampling(
        self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int, lp: int | None
    ) -> list[SamplingParams]:
        """One SamplingParams per choice; they differ only in the seed."""
        sampling = [req.sampling_params(max_tokens, lp, j) for j in range(req.n)]
        sampling[0].validate(self.vocab_size)
        return sampling

    # ---- jobs -> replies ----

    async def _run(self, job: Job, fmt: CompletionFormat | ChatFormat) -> Reply:
        stream = merge_streams(self._generate, job.requests)
        if not job.stream:
            async with aclosing(stream):
                async for k, out in stream:
                    job.choices[k].add(out)
            return JSONReply(200, encode(fmt.response()))
        # wait for the first token, so that a failure before it (overload, a request the
        # decode side rejects) still gets its HTTP status rather than an error event
        try:
            first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        return StreamReply(self._events(job, fmt, first, stream))

    async def _events(
        self, job: Job, fmt: CompletionFormat | ChatFormat, first: tuple, stream: AsyncIterator
    ) -> AsyncIterator[bytes]:
        try:
            for chunk in fmt.opening():
                yield event(encode(chunk))
            item = first
            while True:
                k, out = item
                choice = job.choices[k]
                choice.add(out)
                chunk = fmt.chunk(choice, out)
                if chunk is not None:
                    yield event(encode(chunk))
                item = await anext(stream, None)
                if item is None:
                    break
            if job.include_usage:
                yield event(encode(fmt.usage_chunk()))
        except Exception as e:  # noqa: BLE001 - the stream ends with an error event
            yield event(encode(error_reply(e).body))
        finally:
            await stream.aclose()  # also on a client that went away: cancels the generation
        yield DONE
