"""GPT-OSS: the engine's greedy tokens and logits equal transformers' GptOssForCausalLM in
float32, on a checkpoint transformers wrote (sliding layers of 6 tokens, random sinks and
biases) and on one in the released MXFP4 layout (``make-model --preset gpt-oss-tiny --mxfp4``)
that transformers' own MXFP4 dequantization reads.

Prompts run shorter and longer than the window, batched; a small token budget chunks prefill
and mixes chunks with decodes; block size 4 puts block (and window) boundaries everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from pdserve.cluster.config import ModelConfig
from tests.hf_reference import hf_greedy

NEW_TOKENS = 12
LENGTHS = (1, 3, 6, 7, 13, 40)  # the window is 6 tokens


def _engine(path: str, budget: int = 16) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=path,
            dtype="float32",
            cache=CacheConfig(block_size=4),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        )
    )


def _prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


def _check(engine: LLMEngine, hf, lengths, seed: int) -> None:
    prompts = _prompts(engine.vocab_size, lengths, seed)
    outs = engine.generate(
        prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    )
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt of {len(prompt)}"
    assert engine.blocks.num_used == 0
    rid = engine.add_request(prompts[-1], SamplingParams(max_tokens=1))
    sched = engine.scheduler.schedule()
    ours = engine.runner.compute_logits(sched)[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([prompts[-1]])).logits[0, -1].float()
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-4, atol=1e-4)
    engine.abort(rid)


def test_config_of_a_transformers_checkpoint(gpt_oss_model):
    cfg = ModelConfig.from_dir(gpt_oss_model)
    assert cfg.is_gqa and cfg.architecture == "GptOssForCausalLM"
    assert [cfg.window(i) for i in range(4)] == [6, 0, 6, 0]
    assert cfg.kv_cache_dim == 2 * 2 * 16 and cfg.softmax_scale == 16**-0.5
    assert cfg.rope.rope_type == "yarn" and not cfg.rope.truncate and cfg.rope.factor == 32
    assert (cfg.swiglu_alpha, cfg.swiglu_beta, cfg.swiglu_limit) == (1.702, 1.0, 7.0)


def test_greedy_tokens_and_logits_match_transformers(gpt_oss_model):
    from transformers import GptOssForCausalLM

    hf = GptOssForCausalLM.from_pretrained(gpt_oss_model, dtype=torch.float32).eval()
    _check(_engine(gpt_oss_model), hf, LENGTHS, seed=1)


def test_released_mxfp4_layout_matches_transformers_dequantization(tmp_path):
    """Experts as ``*_blocks``/``*_scales`` (rows interleaved gate/up), read by transformers'
    ``convert_moe_packed_tensors`` into the model transformers runs."""
    from safetensors.torch import load_file
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from pdserve.cluster.checkpoint_maker import make_model

    path = make_model(tmp_path / "m", "gpt-oss-tiny", mxfp4=True, dtype="float32", seed=2)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    del cfg["quantization_config"]
    hf = GptOssForCausalLM(GptOssConfig(**cfg)).eval()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    state = {}
    for name, t in tensors.items():
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            state[base] = convert_moe_packed_tensors(
                t, tensors[base + "_scales"], dtype=torch.float32
            )
        elif not name.endswith("_scales"):
            state[name] = t
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    _check(_engine(str(path)), hf, (2, 8, 9, 30), seed=3)


def test_both_expert_layouts_of_one_seed_give_the_same_tokens(tmp_path):
    from pdserve.cluster.checkpoint_maker import make_model

    a = make_model(tmp_path / "a", "gpt-oss-tiny", mxfp4=True, seed=4)
    b = make_model(tmp_path / "b", "gpt-oss-tiny", mxfp4=False, seed=4)
    prompts = _prompts(500, (5, 20), seed=5)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ta = [o.token_ids for o in _engine(str(a)).generate(prompts, sp)]
    assert ta == [o.token_ids for o in _engine(str(b)).generate(prompts, sp)]


def test_prefix_cache_hits_past_the_window_give_transformers_tokens(gpt_oss_model):
    """A second prompt sharing 24 tokens (6 blocks, four windows) starts after the cached
    prefix: its sliding layers attend to cached KV only, and the tokens stay transformers'."""
    from transformers import GptOssForCausalLM

    hf = GptOssForCausalLM.from_pretrained(gpt_oss_model, dtype=torch.float32).eval()
    engine = _engine(gpt_oss_model)
    shared = _prompts(engine.vocab_size, (24,), seed=7)[0]
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for tail in ([40, 41, 42], [50, 51, 52, 53, 54]):
        prompt = shared + tail
        assert engine.generate([prompt], sp)[0].token_ids == hf_greedy(hf, prompt, NEW_TOKENS)
    assert engine.scheduler.num_prefix_hit_tokens == 24
    assert engine.blocks.num_used == 0
