"""1P1D on GPUs, bf16, Triton kernels: one GPU shared (KV over the object store) and two GPUs
(KV over NCCL); greedy tokens equal the single-process engine on the same GPU."""

from __future__ import annotations

import pytest

from cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
from tests.e2e.conftest import deploy

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _matches_single_process(ray_serve, tiny_model, name: str, pool: dict):
    """Deploy 1P1D with ``pool`` for both pools; three prompts' greedy tokens over HTTP equal
    the single-process engine's; every decode block comes back. Returns the app."""
    model = {"path": tiny_model, "name": "tiny", "block_size": 64, "dtype": "bfloat16"}
    app = deploy(
        ray_serve, {"name": name, "model": model, "prefill": dict(pool), "decode": dict(pool)}
    )
    ref = LLMEngine(
        EngineConfig(
            model=tiny_model,
            dtype="bfloat16",
            device="cuda",
            cache=CacheConfig(block_size=64, num_blocks=256),
        )
    )
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for prompt in ("The expert router", "A much longer prompt about caches, " * 20, "x"):
        ids = ref.tokenize(prompt)
        want = ref.generate([ids], sp)[0].token_ids
        body = {"model": "tiny", "prompt": ids, "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        code, r = app.post("/v1/completions", body)
        assert code == 200, r
        assert r["choices"][0]["token_ids"] == want, prompt[:30]
    used = 'pdserve_kv_blocks_used{pool="decode"}'
    moved = 'pdserve_kv_transfers_total{pool="decode"}'
    # replicas report every few seconds: wait for a report made after the requests
    m = app.wait_metrics(lambda m: m.get(used, 1) == 0 and m.get(moved, 0) >= 3)
    assert m[used] == 0 and m[moved] >= 3
    return app


def test_1p1d_on_one_gpu_matches_single_process(ray_serve, tiny_model):
    pool = {"num_replicas": 1, "gpus_per_rank": 0.5, "kv_cache_memory_fraction": 0.2}
    _matches_single_process(ray_serve, tiny_model, "gpu", pool)


@pytest.mark.multi_gpu
def test_1p1d_nccl_across_two_gpus_matches_single_process(ray_serve, tiny_model):
    """One GPU each; kv_transport auto picks NCCL; decode pulls from a prefill rank actor."""
    pool = {"num_replicas": 1, "gpus_per_rank": 1, "kv_cache_memory_fraction": 0.3}
    app = _matches_single_process(ray_serve, tiny_model, "nccl", pool)
    from deploy import serve_app

    assert {s.kv_transport for s in serve_app.replica_stats(app.name)} == {"nccl"}
