"""A decode step's floor on the tiny model: the weights it reads counted independently from the
checkpoint's shapes, the routed experts its routing hits, the KV of every request's context;
and a prompt's FLOPs."""

from __future__ import annotations

import torch

from pdserve.bench.step_floor import expert_bytes, prefill_flops, step_bytes, weight_bytes
from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
from pdserve.cluster.model.moe import MoEBlock


def _engine(path: str) -> LLMEngine:
    cfg = EngineConfig(model=path, dtype="float32", role="decode", cache=CacheConfig(block_size=16))
    return LLMEngine(cfg)


def _checkpoint_bytes(engine: LLMEngine, itemsize: int = 4) -> int:
    """Weights a step reads, from the model's config alone (float32, no FP8)."""
    c = engine.model_config
    h, n, qk = c.hidden_size, c.num_attention_heads, c.qk_head_dim
    q = h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * n * qk  # q_a, its norm, q_b
    kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # kv_a, its norm
    kv += c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b
    attn = q + kv + n * c.v_head_dim * h  # and o_proj
    norms = 2 * h
    dense = 3 * h * c.intermediate_size
    moe = c.n_routed_experts * h + c.n_routed_experts + 3 * h * c.moe_intermediate_size
    layers = sum(
        attn + norms + (moe if c.is_moe_layer(i) else dense) for i in range(c.num_hidden_layers)
    )
    return (layers + h + c.vocab_size * h) * itemsize  # + final norm + LM head


def test_a_steps_bytes_are_its_weights_its_routed_experts_and_its_kv(tiny_model):
    engine = _engine(tiny_model)
    assert weight_bytes(engine.runner.model) == _checkpoint_bytes(engine)
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for i in range(3):
        engine.add_request([5 + i] * (10 + 7 * i), sp)
    for _ in range(4):  # every request prefilled, then decoding
        engine.step()
    context = sum(r.num_computed_tokens for r in engine.scheduler.running)
    b = step_bytes(engine)
    cfg = engine.model_config
    assert b.kv == context * cfg.kv_bytes_per_token(torch.float32)
    assert len(b.experts_hit) == 2
    assert all(cfg.num_experts_per_tok <= n <= min(3 * 2, 8) for n in b.experts_hit)
    block = next(m for m in engine.runner.model.modules() if isinstance(m, MoEBlock))
    assert expert_bytes(block) == 3 * 128 * 64 // 2 + 3 * 128 * 64 // 32  # codes + scales
    assert b.experts == sum(b.experts_hit) * expert_bytes(block)
    assert b.total == b.weights + b.experts + b.kv


def test_a_prompts_flops_grow_with_its_length_and_the_square_of_its_attention(tiny_model):
    engine = _engine(tiny_model)
    cfg, model = engine.model_config, engine.runner.model
    one, two = prefill_flops(cfg, model, 100), prefill_flops(cfg, model, 200)
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    linear = (two - one - attn * (200 * 201 - 100 * 101)) / 100  # per token, the head aside
    head = one - linear * 100 - attn * 100 * 101
    assert head == 2 * cfg.vocab_size * cfg.hidden_size  # the LM head: the last token only
    assert linear > 2 * 3 * cfg.hidden_size * cfg.intermediate_size  # a dense MLP at least


def test_a_gpt_oss_steps_kv_stops_at_the_window_and_its_experts_carry_biases(gpt_oss_model):
    """Sliding layers (window 6) read at most 6 tokens of KV; an expert's bytes hold its MXFP4
    codes, scales and biases; the weights are counted from the config alone."""
    from pdserve.bench.step_floor import MOE_BLOCKS

    engine = _engine(gpt_oss_model)
    c = engine.model_config
    h, n, kv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attn = (h + 1) * (n + 2 * kv) * d + (n * d + 1) * h + n  # q, k, v, o with biases; sinks
    router = c.n_routed_experts * (h + 1)
    layers = c.num_hidden_layers * (attn + 2 * h + router)
    assert weight_bytes(engine.runner.model) == (layers + h + c.vocab_size * h) * 4
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for length in (3, 20):
        engine.add_request(list(range(10, 10 + length)), sp)
    for _ in range(3):
        engine.step()
    contexts = [r.num_computed_tokens for r in engine.scheduler.running]
    assert contexts and max(contexts) > 6
    b = step_bytes(engine)
    row = 2 * kv * d * 4  # float32 K and V of every KV head
    assert b.kv == row * sum(2 * c_ + 2 * min(c_, 6) for c_ in contexts)  # 2 full, 2 sliding
    block = next(m for m in engine.runner.model.modules() if isinstance(m, MOE_BLOCKS))
    i = c.moe_intermediate_size
    codes = 3 * h * i // 2 + 3 * h * i // 32
    assert expert_bytes(block) == codes + (2 * i + h) * 4
    assert len(b.experts_hit) == 4 and b.experts == sum(b.experts_hit) * expert_bytes(block)
