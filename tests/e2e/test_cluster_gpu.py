"""1P1D on GPUs, Triton kernels: one GPU shared (KV over the object store) and two GPUs (KV over
NCCL), against the single-process engine on the same GPU.

In float32 the greedy tokens are equal. In bf16 a prefill replica, a decode replica and a
single-process engine may round differently (each runs its own step shapes through the
kernels), so a near-tie between two tokens can go either way: there every token the cluster
picks must be, given the same prefix, the single-process engine's pick or within ``BF16_TIE``
nats of it."""

from __future__ import annotations

import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
from tests.e2e.conftest import deploy

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

# the long prompt: 1041 tokens, one prefill step above the MoE crossover (1024 on H100 and H200)
PROMPTS = ("The expert router", "A much longer prompt about caches, " * 80, "x")
MAX_TOKENS = 24
BF16_TIE = 0.1  # nats between the reference's best token and the cluster's, where they differ


def _reference(tiny_model, dtype: str, kernels: dict[str, str] | None = None) -> LLMEngine:
    cache = CacheConfig(block_size=64, num_blocks=256)
    return LLMEngine(
        EngineConfig(
            model=tiny_model,
            dtype=dtype,
            device="cuda",
            cache=cache,
            kernel_overrides=kernels or {},
        )  # fmt: skip
    )


def _greedy(ref: LLMEngine, ids: list[int], n: int, logprobs: int | None = None):
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=logprobs)
    return ref.generate([ids], sp)[0]


def _tie_gaps(ref: LLMEngine, prompt: list[int], got: list[int]) -> list[float]:
    """Where ``got`` leaves the reference's greedy path, the reference's logprob gap between
    its pick and ``got``'s token (asserted at most ``BF16_TIE``); the reference then continues
    from ``got``'s prefix. One gap per divergence."""
    gaps, pos = [], 0
    while pos < len(got):
        out = _greedy(ref, prompt + got[:pos], len(got) - pos, logprobs=5)
        for want, lp in zip(out.token_ids, out.logprobs):
            if got[pos] != want:
                top = dict(lp.top)
                assert got[pos] in top, f"token {pos}: {got[pos]} not in the top 5 {lp.top}"
                gaps.append(lp.logprob - top[got[pos]])
                assert gaps[-1] <= BF16_TIE, f"token {pos}: a gap of {gaps[-1]:.3f} nats"
                pos += 1
                break
            pos += 1
    return gaps


def _check_against_single_process(
    ray_serve,
    tiny_model,
    name: str,
    pool: dict,
    dtype: str,
    prefill: dict | None = None,
    ref_kernels: dict[str, str] | None = None,
    copies: int = 1,
):
    """Deploy 1P1D with ``pool`` for both pools (and ``prefill``'s settings on the prefill
    pool) and ``dtype``; the cluster's greedy tokens over HTTP equal the single-process
    engine's (``ref_kernels``: its overrides) in float32 or differ only at near-ties (bf16);
    every decode block comes back. ``copies``: each prompt sent that many times at once (the
    decode pool then batches them). Returns the app."""
    from concurrent.futures import ThreadPoolExecutor

    model = {"path": tiny_model, "name": "tiny", "block_size": 64, "dtype": dtype}
    pools = {"prefill": {**pool, **(prefill or {})}, "decode": dict(pool)}
    app = deploy(ray_serve, {"name": name, "model": model, **pools})
    ref = _reference(tiny_model, dtype, ref_kernels)
    requests = [(p, ref.tokenize(p)) for p in PROMPTS for _ in range(copies)]

    def post(ids: list[int]) -> tuple[int, dict]:
        body = {"model": "tiny", "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        return app.post("/v1/completions", body)

    with ThreadPoolExecutor(copies) as threads:
        answers = list(threads.map(post, [ids for _, ids in requests]))
    for (prompt, ids), (code, r) in zip(requests, answers):
        assert code == 200, r
        got = r["choices"][0]["token_ids"]
        if dtype == "float32":
            assert got == _greedy(ref, ids, MAX_TOKENS).token_ids, prompt[:30]
        else:
            gaps = _tie_gaps(ref, ids, got)
            print(f"{name} {prompt[:20]!r}: {len(gaps)} near-ties, gaps {gaps}")
    used = 'pdserve_kv_blocks_used{pool="decode"}'
    moved = 'pdserve_kv_transfers_total{pool="decode"}'
    # replicas report every few seconds: wait for a report made after the requests
    m = app.wait_metrics(lambda m: m.get(used, 1) == 0 and m.get(moved, 0) >= 3)
    assert m[used] == 0 and m[moved] >= 3
    return app


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_1p1d_on_one_gpu_matches_single_process(ray_serve, tiny_model, dtype):
    pool = {"num_replicas": 1, "gpus_per_rank": 0.5, "kv_cache_memory_fraction": 0.2}
    _check_against_single_process(ray_serve, tiny_model, f"gpu-{dtype}", pool, dtype)


@pytest.mark.multi_gpu
def test_1p1d_nccl_across_two_gpus_matches_single_process(ray_serve, tiny_model):
    """One GPU each; kv_transport auto picks NCCL; decode pulls from a prefill rank actor."""
    pool = {"num_replicas": 1, "gpus_per_rank": 1, "kv_cache_memory_fraction": 0.3}
    app = _check_against_single_process(ray_serve, tiny_model, "nccl", pool, "bfloat16")
    from pdserve.deploy import serve_app

    assert {s.kv_transport for s in serve_app.replica_stats(app.name)} == {"nccl"}


def test_prefill_through_flashinfer_moe_matches_the_triton_path(ray_serve, tiny_model):
    """Where FlashInfer's fused_moe_90 module is installed (``pdserve build-kernels``) on an
    SM90 GPU, a prefill pool that names it runs its large-M MoE with it (as ``pdserve status``
    reports) and the cluster's bf16 greedy tokens match the single-process Triton engine's up
    to near-ties. The long prompt's prefill runs at M above the MoE crossover."""
    import torch

    from pdserve.deploy import serve_app
    from pdserve.kernels.moe_flashinfer import unavailable

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("FlashInfer's CUTLASS MoE module is built for sm_90a")
    if reason := unavailable():
        pytest.skip(reason)
    pool = {"num_replicas": 1, "gpus_per_rank": 0.5, "kv_cache_memory_fraction": 0.2}
    named = {"kernels": {"moe_large": "flashinfer_cutlass"}}
    app = _check_against_single_process(ray_serve, tiny_model, "fi", pool, "bfloat16", named)
    kernels = {s.pool: s.kernels for s in serve_app.replica_stats(app.name)}
    assert kernels["prefill"]["moe_large"] == "flashinfer_cutlass", kernels
    assert kernels["decode"]["moe_large"] != "flashinfer_cutlass", kernels


def test_decode_through_flashinfer_mla_matches_the_triton_path(ray_serve, tmp_path):
    """Where FlashInfer's MLA decode can run (SM90, FlashInfer and nvcc), the decode pool of a
    model with DeepSeek's latent widths (512 + 64) picks it by default (as ``pdserve status``
    reports) and the prefill pool, which does not decode, does not; the cluster's bf16 greedy
    tokens match the single-process engine's with the Triton kernel up to near-ties. Each
    prompt is sent 8 times at once, so that decode steps of more than 4 rows, which run
    FlashInfer's kernel (fewer run the Triton kernel: ``TRITON_ROWS``), are likely; which
    kernel each step ran is not reported, so not asserted."""
    from pdserve.deploy import serve_app
    from tests.flashinfer_mla import wide_mla_model

    path = wide_mla_model(tmp_path / "wide")
    pool = {"num_replicas": 1, "gpus_per_rank": 0.5, "kv_cache_memory_fraction": 0.2}
    app = _check_against_single_process(
        ray_serve, path, "fi-mla", pool, "bfloat16", ref_kernels={"mla_decode": "triton"},
        copies=8,
    )  # fmt: skip
    kernels = {s.pool: s.kernels for s in serve_app.replica_stats(app.name)}
    assert kernels["decode"]["mla_decode"] == "flashinfer_fa3", kernels
    assert kernels["prefill"]["mla_decode"] != "flashinfer_fa3", kernels


def test_gpt_oss_1p1d_on_one_gpu_gives_transformers_tokens(ray_serve, gpt_oss_model):
    """A GPT-OSS checkpoint written by transformers (sliding layers of 6 tokens, random sinks
    and biases) served 1P1D on one GPU in float32 through the Triton GQA kernels, the sliding
    tables handed over with the full ones: transformers' greedy tokens for prompts shorter and
    longer than the window and than a block; every decode block comes back."""
    import torch
    from transformers import GptOssForCausalLM

    from tests.hf_reference import hf_greedy

    pool = {"num_replicas": 1, "gpus_per_rank": 0.5, "kv_cache_memory_fraction": 0.2}
    model = {"path": gpt_oss_model, "name": "tiny", "block_size": 16, "dtype": "float32"}
    app = deploy(ray_serve, {"name": "gpt-oss", "model": model, "prefill": dict(pool),
                             "decode": dict(pool)})  # fmt: skip
    hf = GptOssForCausalLM.from_pretrained(gpt_oss_model, dtype=torch.float32).eval()
    for prompt in ([7], [11, 12, 13, 14], list(range(20, 45))):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        code, r = app.post("/v1/completions", body)
        assert code == 200, r
        want = hf_greedy(hf, prompt, MAX_TOKENS)
        assert r["choices"][0]["token_ids"] == want, f"prompt of {len(prompt)} tokens"
    used = 'pdserve_kv_blocks_used{pool="decode"}'
    m = app.wait_metrics(lambda m: m.get(used, 1) == 0)
    assert m[used] == 0
