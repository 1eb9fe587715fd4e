"""MLA without a query latent (DeepSeek-V2-Lite's shape): kv_a_proj_with_mqa and q_proj stacked
in one weight at load, each a view of its rows, giving the tokens of the two projections run
apart."""

from __future__ import annotations

import torch

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
from pdserve.cluster.model.attention import MLAAttention


def _engine(model: str) -> LLMEngine:
    cache = CacheConfig(block_size=16, num_blocks=64)
    return LLMEngine(EngineConfig(model=model, device="cpu", dtype="float32", cache=cache))


def _attentions(engine: LLMEngine) -> list[MLAAttention]:
    return [m for m in engine.runner.model.modules() if isinstance(m, MLAAttention)]


def test_kv_a_and_q_are_views_of_one_weight(yarn_model):
    engine = _engine(yarn_model)
    attns = _attentions(engine)
    assert attns
    for attn in attns:
        stack = attn.kv_a_q_weight  # [r + rope + H * qk, hidden]
        kv_a, q = attn.kv_a_proj_with_mqa.weight, attn.q_proj.weight
        assert stack.shape == (kv_a.shape[0] + q.shape[0], kv_a.shape[1])
        assert kv_a.data_ptr() == stack.data_ptr()  # the latent's rows first, then the query's
        assert q.data_ptr() == stack[kv_a.shape[0] :].data_ptr()
        assert "kv_a_q_weight" not in attn.state_dict()


def test_the_stacked_projection_gives_the_tokens_of_two(yarn_model):
    prompts = [[5, 9, 13, 2, 7, 11, 3], [4] * 20 + [8, 6]]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    stacked = _engine(yarn_model)
    apart = _engine(yarn_model)
    for attn in _attentions(apart):  # back to two projections beside each other
        del attn.kv_a_q_weight
    with torch.no_grad():
        want = [o.token_ids for o in apart.generate(prompts, sp)]
        got = [o.token_ids for o in stacked.generate(prompts, sp)]
    assert got == want
