"""Messages between the ingress, decode replicas and prefill replicas (msgspec Structs).

ingress --GenerateRequest--> decode --PrefillRequest--> prefill
ingress <--RequestOutput*--- decode <--PrefillAccepted, PrefillResult-- prefill  (+ KV over the
                                                                          transport)
"""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.cluster.kv_layout import KVFingerprint
from pdserve.cluster.sampling_params import SamplingParams


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One completion, already tokenized and validated by the ingress."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float  # time.time() when the ingress received it, for end-to-end TTFT


class KVDestination(msgspec.Struct, frozen=True, kw_only=True):
    """Where prefill must deliver a request's KV. Prefill needs only how many blocks; decode
    fills in ``block_ids`` (its own copy) once it has reserved them, so the prefill call need
    not wait for the reservation."""

    transfer_id: str  # unique per attempt: late data of a failed attempt is recognised and dropped
    decode_replica: str  # the decode replica's id
    num_blocks: int  # the prompt's KV fills this many blocks
    # decode holds the KV of blocks before this one from its own prefix cache (the previous turn
    # of a conversation ran there): prefill sends blocks first_block .. num_blocks - 1, in order
    first_block: int = 0
    # sliding layers' blocks of the window at the prompt's end (``kv_groups``): they always
    # travel, after the full layers' blocks
    num_window_blocks: int = 0
    fingerprint: KVFingerprint  # the decode side's layout, checked by prefill on first contact
    endpoint: Any = (
        None  # transport-specific address (NCCL: rank endpoints); None for the object store
    )
    block_ids: list[int] = msgspec.field(default_factory=list)  # decode side: where the sent
    # blocks land (``num_sent`` of them)

    @property
    def num_sent(self) -> int:
        """Blocks the transfer carries."""
        return self.num_blocks - self.first_block + self.num_window_blocks


class PrefillRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams  # the request's own; prefill samples exactly one token with it
    kv: KVDestination
    avoid: tuple[str, ...] = ()  # Serve ids of prefill replicas this request failed on: a retry
    # goes elsewhere while another replica exists (deploy/prefix_router.py)


class FirstToken(msgspec.Struct, frozen=True):
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


class KVHandle(msgspec.Struct, frozen=True, kw_only=True):
    """What decode needs to collect the KV a prefill replica sent."""

    transport: str  # "object_store" or "nccl"
    transfer_id: str
    num_blocks: int  # blocks it carries (KVDestination's first_block on)
    nbytes: int
    payload: Any = (
        None  # object store: the ObjectRef of the [slots, blocks, block_size, width] tensor
    )


class PrefillAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """The first item of a prefill replica's streamed reply, sent when it admits the prompt."""

    replica: str  # its Serve replica id, for ``PrefillRequest.avoid`` should this attempt fail
    kv: KVHandle | None  # where the transport can receive before the prompt ends (p2p), or None


class PrefillResult(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    prefill_replica: str
    first: FirstToken  # sampled by prefill: token index 0 of the output
    kv: KVHandle
    queue_s: float  # waiting in the prefill replica before its first chunk ran
    prefill_s: float  # first chunk to first token
    send_s: float  # handing the KV to the transport
    # wall clock (time.time()) of the prefill replica when the call reached it and when it
    # replied: the decode side times the hops to and from it (exact on one host; across hosts
    # they include the clocks' offset)
    started_at: float = 0.0
    replied_at: float = 0.0
