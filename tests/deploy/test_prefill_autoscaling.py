"""The prefill pool's autoscaling policy counts the calls on its direct lines as load: Serve's
default decision made on Serve's requests plus those."""

from __future__ import annotations

from ray.serve.config import AutoscalingConfig, AutoscalingContext

from pdserve.deploy.app import _deployment_options
from pdserve.deploy.prefill_autoscaling import PREFILL_POLICY, count_line_calls, line_calls
from pdserve.deploy.schema import PoolSpec
from pdserve.prefill_worker.server import LINE_ONGOING


def _ctx(serve_requests: float, line_per_replica: list[float], replicas: int = 2):
    config = AutoscalingConfig(min_replicas=1, max_replicas=16, target_ongoing_requests=4)
    metrics = {LINE_ONGOING: {f"r{i}": v for i, v in enumerate(line_per_replica)}}
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="Prefill",
        app_name="app",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[],
        total_num_requests=lambda: serve_requests,  # Serve passes it lazily too
        total_queued_requests=0.0,
        aggregated_metrics=lambda: metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=16,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=0.0,
        config=config,
    )


def test_line_calls_add_to_servers_requests():
    # 2 replicas aiming at 4 each: 16 requests in all want 4 replicas
    ctx = _ctx(serve_requests=0.0, line_per_replica=[10.0, 6.0])
    assert line_calls(ctx) == 16.0
    desired, _ = count_line_calls(ctx)
    assert desired == 4
    assert ctx.total_num_requests == 0.0  # Serve's own context is left as it was
    desired, _ = count_line_calls(_ctx(serve_requests=8.0, line_per_replica=[4.0, 4.0]))
    assert desired == 4
    # no line calls and no metric: Serve's own decision
    desired, _ = count_line_calls(_ctx(serve_requests=4.0, line_per_replica=[]))
    assert desired == 1


def test_an_autoscaled_prefill_pool_gets_the_policy_and_decode_does_not():
    pool = PoolSpec(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    prefill = _deployment_options(pool, "Prefill", 0.0)
    assert prefill["autoscaling_config"]["policy"] == {"policy_function": PREFILL_POLICY}
    AutoscalingConfig(**prefill["autoscaling_config"])  # Serve accepts it (imports the policy)
    decode = _deployment_options(pool, "Decode", 0.0)
    assert "policy" not in decode["autoscaling_config"]
