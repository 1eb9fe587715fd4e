"""The engine in the decode role: besides serving requests of its own (colocated), it takes over
requests whose prompt a prefill replica ran. It reserves their blocks (a cached prefix of the
prompt need not travel), makes their first token's output before it holds them, and adopts them
into its running batch once their KV is in those blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.cluster.detokenizer import IncrementalDetokenizer
from pdserve.cluster.engine import LLMEngine
from pdserve.cluster.engine_step import make_output
from pdserve.cluster.errors import OverloadedError, PrefixEvicted, RequestError
from pdserve.cluster.messages import FirstToken
from pdserve.cluster.request import Request, RequestStatus
from pdserve.cluster.request_output import RequestOutput
from pdserve.cluster.sampler import SampledToken
from pdserve.cluster.sampling_params import SamplingParams


@dataclass(frozen=True)
class Prefilled:
    """A request a prefill replica started, its first token applied, not yet in the engine
    (``DecodeEngine.first_output``; ``adopt`` hands it over)."""

    request: Request
    detok: IncrementalDetokenizer
    output: RequestOutput  # the first token's


class DecodeEngine(LLMEngine):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reserved = 0  # block reservations for prompts being prefilled elsewhere

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
