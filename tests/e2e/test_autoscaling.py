"""An autoscaled prefill pool grows under load that reaches it only over its direct line: Serve's
own metrics see none of those calls, so only the pool's policy, which counts the line's calls
(``deploy/prefill_autoscaling.py``), can scale it."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request

import pytest

from tests.e2e.conftest import app_args, deploy

pytestmark = pytest.mark.slow


def _complete(url: str, prompt: list[int]) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0}
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200


def test_prefill_pool_scales_up_on_line_calls(ray_serve, tiny_model):
    from pdserve.deploy import serve_app

    prefill = {
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0,
        },
        "num_kv_blocks": 512,
    }
    args = app_args(tiny_model, prefill, {"num_replicas": 1, "num_kv_blocks": 1024}, "scalep")
    app = deploy(ray_serve, {**args, "kv_transport": "nccl"})
    stop, failures = threading.Event(), []

    def load(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                _complete(app.url, [rng.randrange(4, 200) for _ in range(rng.randint(60, 120))])
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(repr(e))
                return

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(12)]
    for t in threads:
        t.start()
    deadline, prefills = time.monotonic() + 180, []
    try:
        while time.monotonic() < deadline and not failures:
            prefills = [s for s in serve_app.replica_stats(app.name) if s.pool == "prefill"]
            if len(prefills) >= 2:
                break
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    assert not failures, failures[:3]
    assert len(prefills) == 2, f"the prefill pool did not grow: {len(prefills)} replica(s)"
    assert sum(s.line_calls for s in prefills) > 0  # the load went over the line
