"""The engine in the prefill role: runs prompts in token-budget batches, samples each one's first
token, and keeps a copy of its KV blocks for the transport before the blocks are freed."""

from __future__ import annotations

import torch

from cluster.engine import LLMEngine
from cluster.request import Request


class PrefillEngine(LLMEngine):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # request id -> (KV [layers, n, block_size, width], seconds it queued before running)
        self.captured: dict[str, tuple[torch.Tensor, float]] = {}

    def on_finish(self, req: Request) -> None:
        # the prompt's blocks: KV for exactly the prompt tokens; the sampled token has none yet
        assert req.num_computed_tokens == len(req.prompt_token_ids)
        queued = (req.first_scheduled_time or req.arrival_time) - req.arrival_time
        self.captured[req.request_id] = (self.read_kv(req.block_ids), queued)

    def abort(self, request_id: str) -> bool:
        # a stream cancelled as its request finished: drop the copy nobody will collect
        self.captured.pop(request_id, None)
        return super().abort(request_id)
