"""Serve's request router for both pools: a request goes where its prompt's prefix went.

Each caller (an ingress replica routing to the decode pool; a decode replica routing to the
prefill pool when it goes through Serve) keeps its own ``PrefixRoutes``: the replica it last
sent each prompt block's content key to. A request goes to the replica that got the longest
prefix of its prompt, which likely caches that prefix's KV (prefill: compute saved; decode:
a conversation's next turn, whose earlier turns' KV is not sent again), unless that replica's
queue is longer than the less loaded of two random ones by more than ``slack`` requests; then
to that one (of two equally loaded, the one fewer prefixes went to). Queue lengths are those
Serve's router caches (unknown counts as empty).

A prefill call that failed names the replicas it tried (``PrefillRequest.avoid``): they are left
out while any other replica is there. With only those left, they are used: a retry on the same
replica beats none.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from pdserve.cluster.block_hash import prompt_block_keys
from pdserve.decode_worker.prefix_routes import PrefixRoutes

ROUTER_CLASS = "pdserve.deploy.prefix_router:PrefixAffinityRouter"
# how many more requests than the less loaded random pick the replica holding the prefix may
# have and still get the request. Prefill: a cache hit saves its prefix's compute, a queue costs
# every prompt ahead. Decode replicas run many requests at once, and a step's cost grows slowly
# with the batch, so a longer queue there costs less than moving the conversation.
PREFILL_SLACK = 2
DECODE_SLACK = 8


def without_tried(replicas: Sequence[Any], avoid: Sequence[str]) -> list[Any]:
    """``replicas`` (anything with ``replica_id.unique_id``) minus those in ``avoid``, unless
    that leaves none."""
    kept = [r for r in replicas if r.replica_id.unique_id not in avoid]
    return kept or list(replicas)


def _request(pending: PendingRequest | None) -> Any:
    """The GenerateRequest or PrefillRequest being routed, or None for other calls."""
    if pending is None or not pending.args:
        return None
    return pending.args[0]


def _avoid(pending: PendingRequest | None) -> tuple[str, ...]:
    return tuple(getattr(_request(pending), "avoid", ()) or ())


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, block_size: int = 64, slack: int = PREFILL_SLACK) -> None:
        """``request_router_kwargs``: the pool's KV block size (keys must match its cache's)
        and how much busier than the alternative a replica holding the prefix may be."""
        self.block_size, self.slack = block_size, slack
        self.routes = PrefixRoutes()
        self.affinity_picks = 0  # choices the cached prefix decided, for tests and logs

    def keys(self, pending: PendingRequest | None) -> list[bytes]:
        """The prompt's full-block keys, the last token left out (as an engine matches)."""
        ids = getattr(_request(pending), "prompt_token_ids", None)
        return prompt_block_keys(ids, self.block_size) if ids else []

    def queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        kept = without_tried(candidate_replicas, _avoid(pending_request))
        if not kept:
            return []
        two = random.sample(kept, min(2, len(kept)))
        # the shorter queue; between equal ones, the replica fewer of our prefixes went to, so
        # new conversations spread over the pool's caches
        pick = min(
            two, key=lambda r: (self.queue_len(r), self.routes.owned(r.replica_id.unique_id))
        )
        by_id = {r.replica_id.unique_id: r for r in kept}
        chosen, decided = self.routes.prefer(
            self.keys(pending_request),
            set(by_id),
            pick.replica_id.unique_id,
            lambda rid: self.queue_len(by_id[rid]),
            self.slack,
        )  # recorded there: Serve sends to the first rank unless its queue is full
        self.affinity_picks += decided
        pick = by_id[chosen]
        rest = [r for r in two if r is not pick]
        return [[pick], rest] if rest else [[pick]]
