"""The engine in the prefill role: runs prompts in token-budget batches and samples each one's
first token. The executor stages a finished prompt's KV blocks for the transport inside the step
that finished it (``ModelRunner.stage_finished``), before the blocks are freed."""

from __future__ import annotations

from pdserve.cluster.engine import LLMEngine
from pdserve.cluster.request import Request
from pdserve.cluster.sampling_params import SamplingParams


class PrefillEngine(LLMEngine):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # request id -> seconds it queued before its first chunk ran, for prompts whose KV
        # is staged
        self.captured: dict[str, float] = {}

    def add_prompt(
        self, prompt_ids: list[int], sampling: SamplingParams, request_id: str, first_block: int
    ) -> None:
        """Queue a prompt whose KV goes out from block ``first_block`` on (the decode replica
        holds the blocks before); OverloadedError when too many wait already."""
        self.add_request(prompt_ids, sampling, request_id, bounded=True)
        self.scheduler.requests[request_id].first_sent_block = first_block

    def on_finish(self, req: Request) -> None:
        # the prompt's blocks: KV for exactly the prompt tokens; the sampled token has none yet
        assert req.num_computed_tokens == len(req.prompt_token_ids)
        queued = (req.first_scheduled_time or req.arrival_time) - req.arrival_time
        self.captured[req.request_id] = queued

    def abort(self, request_id: str) -> bool:
        # drop the copy nobody will collect (a stream cancelled as its prompt finished), or
        # mark it dropped so a send posted for it gives up now
        self.captured.pop(request_id, None)
        self.runner.drop_staged(request_id)
        return super().abort(request_id)
