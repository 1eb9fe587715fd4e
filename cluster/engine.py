"""The single-process engine: plan -> launch -> collect -> emit, step by step (a pure decode step
on the decode-graph path has the next one launched before it is collected).

Tests use it directly, ``pdserve generate`` wraps it, and a colocated decode replica runs it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from pdserve.cluster.block_manager import BlockManager
from pdserve.cluster.config import EngineConfig, ModelConfig
from pdserve.cluster.detokenizer import IncrementalDetokenizer
from pdserve.cluster.engine_step import CollectedStep, LaunchedStep, make_output
from pdserve.cluster.errors import OverloadedError, RequestError
from pdserve.cluster.executor import Executor
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.model_runner import ModelRunner
from pdserve.cluster.request import FinishReason, Request
from pdserve.cluster.request_output import RequestOutput
from pdserve.cluster.sampler import SampledToken
from pdserve.cluster.sampling_params import SamplingParams
from pdserve.cluster.scheduler import Scheduler, SchedulerOutput
from pdserve.cluster.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer(config.model)
        limit = config.scheduler.max_model_len or self.model_config.max_position_embeddings
        if limit > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {limit} exceeds the model's max_position_embeddings "
                f"{self.model_config.max_position_embeddings}"
            )
        self.max_model_len = limit
        self.runner = executor or _make_executor(config, self.model_config, limit)
        self.blocks = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.prefix_caching
        )
        self.groups = KVGroups.of(self.model_config)
        self.scheduler = Scheduler(config.scheduler, self.blocks, limit, self.groups)
        self.eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._sent_prompt: set[str] = set()
        self._ids = itertools.count()
        self._ahead: LaunchedStep | None = None  # launched before the step it follows landed
        self.faults = None  # a FaultInjector, set by a replica that injects faults

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    # ---- requests ----

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        """Raise RequestError (a ValueError) naming what makes the request unservable."""
        sampling.validate(self.vocab_size)
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                "prompt",
            )
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens; the context limit is {self.max_model_len}", "prompt"
            )
        if n + sampling.max_tokens > self.max_model_len:
            raise RequestError(
                f"max_tokens {sampling.max_tokens} plus the prompt's {n} tokens exceeds the "
                f"context limit of {self.max_model_len}",
                "max_tokens",
            )
        # the whole sequence must fit the cache at once, or it could never finish
        budget = self.config.scheduler.max_num_batched_tokens
        chunk = min(self.config.scheduler.long_prefill_token_threshold or budget, budget)
        need = self.groups.most_blocks(n + sampling.max_tokens, chunk, self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise RequestError(
                f"prompt + max_tokens needs {need} KV blocks"
                f"{' (with the sliding window blocks)' if self.groups.windowed else ''}; "
                "the cache holds "
                f"{self.blocks.num_blocks}",
                "max_tokens",
            )

    def add_request(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams,
        request_id: str | None = None,
        bounded: bool = False,
    ) -> str:
        """Queue a request. ``bounded`` (serving): OverloadedError rather than queue more than
        ``max_waiting`` requests; the offline ``generate`` queues everything it is given."""
        ids = self.tokenize(prompt)
        self.validate(ids, sampling)
        sched = self.config.scheduler
        limit = sched.max_waiting or 4 * sched.max_num_seqs
        if bounded and len(self.scheduler.waiting) >= limit:
            raise OverloadedError(
                f"{len(self.scheduler.waiting)} requests already wait for a slot (limit {limit})"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.scheduler.add(Request(rid, ids, sampling))
        self._detok[rid] = self._detokenizer(ids, sampling)
        return rid

    def _detokenizer(self, prompt_ids: list[int], sp: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self.tokenizer, prompt_ids, sp.stop, sp.include_stop_str_in_output,
            sp.skip_special_tokens,
        )  # fmt: skip

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self._forget(request_id)
        return req is not None

    def has_unfinished(self) -> bool:
        """Requests to run, or a step planned ahead to collect."""
        return self.scheduler.has_unfinished() or self._ahead is not None

    # ---- one step ----
    # A step is plan -> launch -> collect -> emit. ``step`` runs them in a row; the serving loop
    # (``AsyncEngine``) emits a step's text while the device runs the next one. A pure decode
    # step replayed from a graph has the step after it planned and launched before it is
    # collected (``launch_ahead``); the next ``step`` collects that one.

    def step(self) -> list[RequestOutput]:
        try:
            launched = self.take_ahead()
            if launched is None:
                sched = self.plan()
                if sched is None:
                    return []
                launched = self.launch(sched)
            self.launch_ahead(launched)
            return self.emit(self.collect(launched))
        except BaseException:
            self.drop_launched()
            raise

    def plan(self) -> SchedulerOutput | None:
        """Schedule the next step; None when there is nothing to run."""
        sched = self.scheduler.schedule()
        return sched if sched.chunks else None

    def launch(self, sched: SchedulerOutput, after: LaunchedStep | None = None) -> LaunchedStep:
        """Start the step on the executor; returns before the device is done where it can. A
        step planned ahead (``plan_ahead``) takes its input tokens from ``after``'s."""
        if self.faults is not None and sched.num_decode_chunks:
            self.faults.maybe_fail("decode_step")  # the caller fails this step's requests
        requests = tuple(self.scheduler.requests[c.request_id] for c in sched.chunks)
        number = self.blocks.launched()  # counted first: a launch that fails midway is dropped
        if sched.feed_rows is None:
            handle = self.runner.launch(sched)
        else:
            assert after is not None, "a step planned ahead needs the step it follows"
            handle = self.runner.launch(sched, feed=after.handle)
        return LaunchedStep(sched, handle, requests, number)

    def launch_ahead(self, launched: LaunchedStep) -> None:
        """Plan and launch the step after ``launched`` now, before ``launched`` is collected,
        where it can be (``plan_ahead``); ``take_ahead`` hands it over."""
        sched = self.plan_ahead(launched)
        if sched is not None:
            self._ahead = self.launch(sched, after=launched)

    def take_ahead(self) -> LaunchedStep | None:
        """The step ``launch_ahead`` launched, to collect next, or None."""
        launched, self._ahead = self._ahead, None
        return launched

    def plan_ahead(self, launched: LaunchedStep) -> SchedulerOutput | None:
        """The pure decode step after ``launched``, planned (and launchable) while it runs, before
        its tokens are known; None where the executor would wait for the device anyway or the
        scheduler cannot tell the next step yet (``Scheduler.schedule_ahead``)."""
        most = self.runner.ahead_rows(launched.sched) if self.config.plan_ahead else 0
        return self.scheduler.schedule_ahead(launched.sched, most) if most else None

    def collect(self, launched: LaunchedStep) -> CollectedStep:
        """Wait for the step's tokens and apply them: append, stop checks, finished requests
        leave the scheduler (their blocks are freed, once no launched step can touch them).
        Unless a step launched ahead is still in flight (``take_ahead``), the next step can be
        planned now."""
        applied = []
        try:
            tokens = self.runner.collect(launched.handle)
        finally:  # a step that failed is over too: the blocks it held may go
            self.blocks.landed(launched.number)
        it = iter(tokens)
        self.scheduler.written(launched.sched, launched.requests)
        for chunk, req in zip(launched.sched.chunks, launched.requests):
            if not chunk.sample:
                continue
            tok = next(it)
            if req.is_finished:  # aborted while the step ran, or ended by the step before
                continue
            applied.append((req, tok, self._apply(req, tok)))
        return CollectedStep(tuple(applied))

    def drop_launched(self) -> None:
        """Forget steps launched and never collected (a step failed before them), once the
        device is done with them: the blocks they held go back."""
        self._ahead = None
        if self.blocks.num_landed < self.blocks.num_launched:
            try:
                self.runner.synchronize()
            except Exception:  # noqa: BLE001 - a device that failed runs nothing more
                log.exception("waiting for the dropped steps failed")
            self.blocks.landed(self.blocks.num_launched)

    def emit(self, collected: CollectedStep) -> list[RequestOutput]:
        """The outputs of a collected step: new text, logprobs, finish reasons."""
        outputs = []
        for req, tok, reason in collected.tokens:
            # else aborted since (its id may name a new request by now)
            if req.request_id in self._detok and req.finish_reason is not FinishReason.ABORT:
                outputs.append(self._output(req, tok, reason))
        return outputs

    def _apply(self, req: Request, tok: SampledToken) -> FinishReason | None:
        """Append the token and decide whether the request finished (then it leaves the
        scheduler). Text waits for ``_output`` unless stop strings need it now."""
        reason = self._decide(req, tok, self._detok[req.request_id])
        if reason is not None:
            self.on_finish(req)
            self.scheduler.finish(req, reason)
        return reason

    def _decide(
        self, req: Request, tok: SampledToken, detok: IncrementalDetokenizer
    ) -> FinishReason | None:
        """Append the token to ``req`` and say whether it ends the request; touches nothing of
        the engine's own."""
        sp = req.sampling
        req.output_token_ids.append(tok.token_id)
        stop_str = detok.add(tok.token_id) if detok.stop else None
        reason: FinishReason | None = None
        if tok.token_id in sp.stop_token_ids:
            reason, req.stop_reason = FinishReason.STOP, tok.token_id
        elif not sp.ignore_eos and tok.token_id in self.eos_ids:
            reason = FinishReason.STOP
        elif stop_str is not None:
            reason, req.stop_reason = FinishReason.STOP, stop_str
        elif len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        return reason

    def _output(
        self, req: Request, tok: SampledToken, reason: FinishReason | None
    ) -> RequestOutput:
        first = req.request_id not in self._sent_prompt
        self._sent_prompt.add(req.request_id)
        out = make_output(req, tok, reason, self._detok[req.request_id], first)
        if reason is not None:
            self._forget(req.request_id)
        return out

    def on_finish(self, req: Request) -> None:
        """Called with a request that just finished, before its KV blocks are freed."""

    def _forget(self, request_id: str) -> None:
        self._detok.pop(request_id, None)
        self._sent_prompt.discard(request_id)

    # ---- offline batch API ----

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams],
    ) -> list[RequestOutput]:
        """Run prompts to completion; one accumulated output per prompt, in order."""
        params = (
            [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in done:
                    done[out.request_id].absorb(out)
                else:
                    done[out.request_id] = out
                    out.logprobs = None if out.logprobs is None else list(out.logprobs)
        return [done[r] for r in rids]


def _make_executor(config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> Executor:
    if config.tp < 1:
        raise ValueError(f"tp must be >= 1, got {config.tp}")
    if config.tp == 1 and not config.rank_actors:
        return ModelRunner(config, model_config, max_model_len)
    from pdserve.cluster.tp_executor import RayTPExecutor  # imports ray

    return RayTPExecutor(config, model_config, max_model_len)
