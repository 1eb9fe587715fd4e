"""The transformers peer computes our model: built from an MXFP4 checkpoint, its greedy tokens
equal our engine's (float32, CPU)."""

from __future__ import annotations

import torch

from pdserve.bench.hf_peer import load
from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
from pdserve.cluster.checkpoint_maker import make_model


def test_the_peer_built_from_mxfp4_experts_generates_our_tokens(tmp_path):
    path = make_model(tmp_path / "m", "tiny", mxfp4=True, dtype="float32", seed=5)
    hf, impl = load(path, "cpu", torch.float32)
    assert impl in ("grouped_mm", "batched_mm", "eager")
    engine = LLMEngine(
        EngineConfig(model=str(path), dtype="float32", cache=CacheConfig(block_size=16))
    )
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, engine.vocab_size, (n,), generator=g).tolist() for n in (5, 40)]
    ours = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, ours):
        ids = torch.tensor([prompt])
        theirs = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        assert out.token_ids == theirs[0, len(prompt) :].tolist()
