"""The engine in the prefill role: runs prompts in token-budget batches, samples each one's first
token, and stages its KV blocks in the executor for the transport before the blocks are freed."""

from __future__ import annotations

from cluster.engine import LLMEngine
from cluster.request import Request


class PrefillEngine(LLMEngine):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # request id -> (KV bytes staged, seconds it queued before its first chunk ran)
        self.captured: dict[str, tuple[int, float]] = {}

    def on_finish(self, req: Request) -> None:
        # the prompt's blocks: KV for exactly the prompt tokens; the sampled token has none yet
        assert req.num_computed_tokens == len(req.prompt_token_ids)
        queued = (req.first_scheduled_time or req.arrival_time) - req.arrival_time
        nbytes = self.runner.stage_kv(req.request_id, req.block_ids)
        self.captured[req.request_id] = (nbytes, queued)

    def abort(self, request_id: str) -> bool:
        # a stream cancelled as its request finished: drop the copy nobody will collect
        if self.captured.pop(request_id, None) is not None:
            self.runner.drop_staged(request_id)
        return super().abort(request_id)
