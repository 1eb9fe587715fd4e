"""The single-process engine: plan -> launch -> collect -> emit, one step at a time.

Tests use it directly, ``pdserve generate`` wraps it, and a colocated decode replica runs it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from pdserve.cluster.block_manager import BlockManager
from pdserve.cluster.config import EngineConfig, ModelConfig
from pdserve.cluster.detokenizer import IncrementalDetokenizer
from pdserve.cluster.engine_step import CollectedStep, LaunchedStep, Prefilled, make_output
from pdserve.cluster.errors import OverloadedError, PrefixEvicted, RequestError
from pdserve.cluster.executor import Executor
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.messages import FirstToken
from pdserve.cluster.model_runner import ModelRunner
from pdserve.cluster.request import FinishReason, Request, RequestStatus
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
        self._reserved = 0  # block reservations for prompts being prefilled elsewhere
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
        return self.scheduler.has_unfinished()

    # ---- one step ----
    # A step is plan -> launch -> collect -> emit. ``step`` runs them in a row; the serving loop
    # (``AsyncEngine``) emits a step's text while the device runs the next one.

    def step(self) -> list[RequestOutput]:
        sched = self.plan()
        if sched is None:
            return []
        return self.emit(self.collect(self.launch(sched)))

    def plan(self) -> SchedulerOutput | None:
        """Schedule the next step; None when there is nothing to run."""
        sched = self.scheduler.schedule()
        return sched if sched.chunks else None

    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        """Start the step on the executor; returns before the device is done where it can."""
        if self.faults is not None and sched.num_decode_chunks:
            self.faults.maybe_fail("decode_step")  # the caller fails this step's requests
        return LaunchedStep(sched, self.runner.launch(sched))

    def collect(self, launched: LaunchedStep) -> CollectedStep:
        """Wait for the step's tokens and apply them: append, stop checks, finished requests
        leave the scheduler (their blocks are freed). The next step can be planned now."""
        applied = []
        it = iter(self.runner.collect(launched.handle))
        self.scheduler.written(launched.sched)
        for chunk in launched.sched.chunks:
            if not chunk.sample:
                continue
            tok = next(it)
            req = self.scheduler.requests.get(chunk.request_id)
            if req is None:  # aborted while the step ran
                continue
            applied.append((req, tok, self._apply(req, tok)))
        return CollectedStep(tuple(applied))

    def emit(self, collected: CollectedStep) -> list[RequestOutput]:
        """The outputs of a collected step: new text, logprobs, finish reasons."""
        outputs = []
        for req, tok, reason in collected.tokens:
            if req.request_id in self._detok:  # else aborted since
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

    # ---- prefill/decode handoff ----

    def reserve(self, num_tokens: int, prefix_keys: Sequence[bytes] = ()) -> list[int]:
        """Blocks for a prompt whose KV another replica computes: first the cached blocks of
        ``prefix_keys`` (its first full blocks, whose KV this engine holds: they need not
        travel), then fresh ones, then (sliding layers) the window's blocks at the prompt's
        end, which always travel. OverloadedError when the cache or the running-request limit
        has no room for it now; PrefixEvicted when a block of the prefix is gone."""
        bs = self.blocks.block_size
        need = self.blocks.blocks_for(num_tokens) + self.groups.window_blocks(num_tokens, bs)
        held = self.blocks.match(list(prefix_keys))
        if len(held) < len(prefix_keys):
            self.blocks.free(held)
            raise PrefixEvicted(
                f"{len(prefix_keys) - len(held)} of the prompt's {len(prefix_keys)} cached "
                "prefix blocks were evicted"
            )
        free = self.blocks.num_free - self.scheduler.watermark
        running = len(self.scheduler.running) + len(self.scheduler.waiting) + self._reserved
        if need - len(held) > free or running >= self.config.scheduler.max_num_seqs:
            self.blocks.free(held)
            raise OverloadedError(
                f"decode replica is full: {need - len(held)} KV blocks wanted, "
                f"{max(free, 0)} free; "
                f"{running} requests of {self.config.scheduler.max_num_seqs} admitted"
            )
        self._reserved += 1
        return held + self.blocks.allocate(need - len(held))

    def release(self, block_ids: list[int]) -> None:
        """Give back blocks from ``reserve`` that never became a request."""
        self._reserved -= 1
        self.blocks.free(block_ids)

    def first_output(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, first: FirstToken
    ) -> Prefilled:
        """A request whose prompt a prefill replica ran, with the first token it sampled
        applied and that token's output made (stop checks and text included), before this
        engine holds the request: it touches no engine state, so a replica calls it on its own
        thread and streams the token while the KV is still on its way. ``adopt`` hands the
        request over unless its output is already the last."""
        req = Request(request_id, prompt_ids, sampling)
        detok = self._detokenizer(prompt_ids, sampling)
        tok = SampledToken(first.token_id, first.logprob, first.top_logprobs)
        reason = self._decide(req, tok, detok)
        return Prefilled(req, detok, make_output(req, tok, reason, detok, first=True))

    def adopt(
        self, prefilled: Prefilled, block_ids: list[int] | None, num_held_blocks: int = 0
    ) -> None:
        """Start decoding a ``first_output`` request: from ``block_ids`` (from ``reserve``),
        whose first ``num_held_blocks`` this engine's prefix cache held and the rest a
        transport filled with its prompt's KV; or, with None, as a request whose prompt and
        first token this engine computes again (the way a preempted request comes back).
        If it raises, a reservation is untouched (the caller releases it)."""
        req = prefilled.request
        assert not prefilled.output.finished, "a finished request has nothing to decode"
        if req.request_id in self.scheduler.requests:
            raise RequestError(f"request id {req.request_id!r} is already in use", "request_id")
        if block_ids is None:
            self.scheduler.add(req)
        else:  # nothing below can fail: the blocks now belong to the request
            self._reserved -= 1
            n = req.num_computed_tokens = len(req.prompt_token_ids)
            full = self.blocks.blocks_for(n)
            req.block_ids = list(block_ids[:full])
            if self.groups.windowed:  # the window's blocks at the prompt's end, after them
                req.window_start_block = self.groups.window_start_block(n, self.blocks.block_size)
                req.window_block_ids = [self.scheduler.null] * req.window_start_block
                req.window_block_ids += block_ids[full:]
            assert len(req.window_block_ids) in (0, full), (len(block_ids), full)
            req.num_written_tokens = req.num_computed_tokens  # the transport wrote it
            req.status = RequestStatus.RUNNING
            self.scheduler.add_running(req)
            self.scheduler.num_prefix_query_tokens += len(req.prompt_token_ids)
            self.scheduler.num_prefix_hit_tokens += num_held_blocks * self.blocks.block_size
        self._detok[req.request_id] = prefilled.detok
        self._sent_prompt.add(req.request_id)

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
