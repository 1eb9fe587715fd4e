"""The prefill pool's Serve request router: a retry goes to another replica.

A decode replica whose prefill attempt failed names the replicas it already tried in the next
``PrefillRequest.avoid``; this router leaves them out while any other replica is there, then
picks like Serve's default (two at random; the router sends to the shorter queue). With only
the failed replicas left it uses them: a retry on the same replica beats none.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_CLASS = "pdserve.deploy.prefill_router:AvoidTriedReplicas"


def without_tried(replicas: Sequence[Any], avoid: Sequence[str]) -> list[Any]:
    """``replicas`` (anything with ``replica_id.unique_id``) minus those in ``avoid``, unless
    that leaves none."""
    kept = [r for r in replicas if r.replica_id.unique_id not in avoid]
    return kept or list(replicas)


def _avoid(pending: PendingRequest | None) -> tuple[str, ...]:
    if pending is None or not pending.args:
        return ()
    return tuple(getattr(pending.args[0], "avoid", ()) or ())


class AvoidTriedReplicas(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        kept = without_tried(candidate_replicas, _avoid(pending_request))
        return [random.sample(kept, min(2, len(kept)))] if kept else []
