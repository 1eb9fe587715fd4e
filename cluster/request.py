"""A request inside one engine: integers and lists only, never tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pdserve.cluster.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; no KV blocks held
    RUNNING = "running"  # holds KV blocks; prefilling in chunks, then decoding
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence token, stop token id or stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine could not serve it (say, a prompt that no cache could hold)


@dataclass
class Request:
    """One sequence: the first ``num_computed_tokens`` of ``all_token_ids`` have KV in
    ``block_ids`` (and, for a model with sliding layers, the window of them in
    ``window_block_ids``: ``kv_groups``)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    window_block_ids: list[int] = field(default_factory=list)  # sliding layers' table; entries
    # before the window name the cache's spare block (empty without sliding layers)
    window_start_block: int = 0  # window_block_ids' entries before this one name the spare block
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # when its first chunk ran (queueing ends)
    error: str | None = None
    # tokens whose KV a finished step wrote (num_computed_tokens runs ahead: it counts tokens
    # planned); only these may be keyed: a failed step leaves its tokens' KV unwritten
    num_written_tokens: int = 0
    # prefix cache: content keys of its full blocks (grown as needed), how many of its blocks
    # are keyed in the block manager, and the tokens its last admission found cached
    block_hashes: list[bytes] = field(default_factory=list)
    num_keyed_blocks: int = 0
    num_cached_tokens: int = 0
    # prefill role: the prompt's KV transfer starts at this block (decode holds those before)
    first_sent_block: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without copying the whole sequence."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model: the rest of the prompt, or the last sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
