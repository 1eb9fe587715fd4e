"""The engine's greedy tokens and logits equal transformers' DeepseekV3ForCausalLM in float32.

Prompts of 1 to 600 tokens run batched; a small token budget forces chunked prefill and mixes
prefill chunks with decodes in one step; block size 16 puts block boundaries everywhere.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from tests.hf_reference import hf_greedy

NEW_TOKENS = 16
LENGTHS = (1, 2, 7, 15, 16, 17, 64, 130, 301)


def _engine(path: str, budget: int = 64) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=path,
            dtype="float32",
            cache=CacheConfig(block_size=16),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        )
    )


def _hf(path: str):
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def _check_tokens(path: str, lengths, seed: int) -> None:
    engine, hf = _engine(path), _hf(path)
    prompts = _prompts(engine.vocab_size, lengths, seed)
    prompts.append("A sentence about the cache block, in text.")  # a text prompt, BOS added
    outs = engine.generate(
        prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    )
    for prompt, out in zip(prompts, outs):
        ids = engine.tokenize(prompt)
        assert out.token_ids == hf_greedy(hf, ids, NEW_TOKENS), f"prompt of {len(ids)} tokens"
        assert out.num_output_tokens == NEW_TOKENS and out.finish_reason == "length"
    assert engine.blocks.num_used == 0


def _check_logits(path: str, lengths, seed: int) -> None:
    engine, hf = _engine(path, budget=4096), _hf(path)
    for prompt in _prompts(engine.vocab_size, lengths, seed):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=1))
        sched = engine.scheduler.schedule()
        assert len(sched.chunks) == 1 and sched.chunks[0].sample
        ours = engine.runner.compute_logits(sched)[0]
        with torch.inference_mode():
            ref = hf(torch.tensor([prompt])).logits[0, -1].float()
        torch.testing.assert_close(ours.cpu(), ref, rtol=1e-4, atol=1e-4)
        engine.abort(rid)


def test_greedy_tokens_match_transformers(tiny_model):
    _check_tokens(tiny_model, LENGTHS, seed=1)


def test_greedy_tokens_match_transformers_yarn_without_q_lora(yarn_model):
    # 600 tokens run past YaRN's original 512-position context
    _check_tokens(yarn_model, LENGTHS[::2] + (600,), seed=2)


@pytest.mark.parametrize("which", ["tiny_model", "yarn_model"])
def test_last_position_logits_match_transformers(which, request):
    _check_logits(request.getfixturevalue(which), (1, 33, 257), seed=4)


def test_fp8_checkpoint_gives_transformers_tokens_on_its_dequantized_weights(
    fp8_model, fp8_model_dequantized
):
    """DeepSeek's release format (float8 E4M3, 128x128 block scales; its routed experts hold
    MXFP4-representable values, so storing them as MXFP4 loses nothing) against transformers
    on the same weights dequantized."""
    engine, hf = _engine(fp8_model), _hf(fp8_model_dequantized)
    attn = engine.runner.model.model.layers[0].self_attn  # q_a and kv_a stacked with their scales
    assert attn.fp8_names() == ("q_a_proj", "kv_a_proj_with_mqa")
    prompts = _prompts(engine.vocab_size, (1, 17, 130), seed=6)
    outs = engine.generate(
        prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    )
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt of {len(prompt)}"
    rid = engine.add_request(prompts[1], SamplingParams(max_tokens=1))
    ours = engine.runner.compute_logits(engine.scheduler.schedule())[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([prompts[1]])).logits[0, -1].float()
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-4, atol=1e-4)
    engine.abort(rid)
