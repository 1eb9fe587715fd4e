"""The prefill pool's autoscaling policy: Serve's own (ongoing requests per replica against
``target_ongoing_requests``, with its delays and factors), where the ongoing requests include
the prefill calls decode replicas make over direct lines, which Serve's metrics do not see:
each prefill replica reports those as a custom metric (``PrefillServer.record_autoscaling_stats``).

Serve pickles this module by value into its controller; it needs nothing of the project there.
"""

from __future__ import annotations

import copy
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

from pdserve.prefill_worker.server import LINE_ONGOING

PREFILL_POLICY = "pdserve.deploy.prefill_autoscaling:count_line_calls"


def line_calls(ctx: Any) -> float:
    """Prefill calls open on the pool's direct lines (averaged over Serve's look-back)."""
    per_replica = (ctx.aggregated_metrics or {}).get(LINE_ONGOING) or {}
    return float(sum(per_replica.values()))


def count_line_calls(ctx: Any) -> tuple[int | float, dict[str, Any]]:
    """Serve's default decision, made on Serve's requests plus the line calls."""
    total = ctx.total_num_requests + line_calls(ctx)
    counted = copy.copy(ctx)
    counted.__dict__.pop("total_num_requests", None)  # in case Serve caches it
    counted._total_num_requests_value = total
    return replica_queue_length_autoscaling_policy(counted)
