"""The engine on a GPU with the kernels the registry picks there (Triton on Hopper)."""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from tests.cluster.test_engine_matches_transformers import _hf, _prompts
from tests.hf_reference import hf_greedy

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def _engine(path: str, dtype: str, budget: int = 64, **kw) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=path,
            dtype=dtype,
            device="cuda",
            cache=CacheConfig(block_size=16),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget),
            **kw,
        )
    )


def test_registry_picks_triton_on_the_gpu(tiny_model):
    names = _engine(tiny_model, "bfloat16").runner.kernel_names
    assert names == {op: "triton" for op in names}, names


@pytest.mark.parametrize("which", ["tiny_model", "yarn_model"])
def test_float32_on_the_gpu_matches_transformers(which, request):
    path = request.getfixturevalue(which)
    engine, hf = _engine(path, "float32"), _hf(path)
    prompts = _prompts(engine.vocab_size, (1, 17, 130, 301), seed=11)
    for prompt, out in zip(prompts, engine.generate(prompts, GREEDY)):
        assert out.token_ids == hf_greedy(hf, prompt, 16), f"prompt of {len(prompt)} tokens"


def test_bfloat16_triton_kernels_agree_with_the_torch_reference(tiny_model):
    triton_engine = _engine(tiny_model, "bfloat16", budget=4096)  # each prompt in one step
    torch_engine = _engine(
        tiny_model,
        "bfloat16",
        budget=4096,
        kernel_overrides={
            "moe_small": "torch",
            "moe_large": "torch",
            "mla_decode": "torch",
            "mla_prefill": "torch",
        },
    )
    for prompt in _prompts(triton_engine.vocab_size, (5, 70, 300), seed=12):
        logits = []
        for engine in (triton_engine, torch_engine):
            rid = engine.add_request(prompt, SamplingParams(max_tokens=1))
            logits.append(engine.runner.compute_logits(engine.scheduler.schedule())[0])
            engine.abort(rid)
        a, b = logits  # float32 logits of bf16 models, std about 3
        # bf16 rounding differs between the kernels: seen on an H100, cos 0.99997, max 0.08
        assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.999
        assert (a - b).abs().max().item() < 0.25
        assert a.argmax() == b.argmax()


def test_decode_graphs_replay_the_tokens_of_eager_steps(tiny_model):
    from tests.cluster.test_decode_graphs import _prompts as some_prompts
    from tests.cluster.test_decode_graphs import _staggered

    eager = _engine(tiny_model, "float32", decode_graphs="off")
    replayed = _engine(tiny_model, "float32", decode_graph_max_batch=4)  # auto: captured
    assert eager.runner.graphs is None
    assert sorted(replayed.runner.graphs.graphs) == [1, 2, 4]
    prompts = some_prompts(eager.vocab_size, 7)  # decode batches of 1 to 7: replays and eager
    assert _staggered(replayed, prompts) == _staggered(eager, prompts)
    assert replayed.blocks.num_used == 0


def test_gpt_oss_float32_on_the_gpu_matches_transformers(gpt_oss_model):
    """GPT-OSS through the GPU kernels, its sliding layers on their own tables: prompts shorter
    and longer than the window and than a block, chunked prefill, decode graphs; the sliding
    blocks before the window go back as the sequences grow."""
    from transformers import GptOssForCausalLM

    from tests.cluster.test_gpt_oss_matches_transformers import LENGTHS, _check

    engine = _engine(gpt_oss_model, "float32", budget=16)
    assert engine.groups.windowed and engine.runner.graphs is not None
    hf = GptOssForCausalLM.from_pretrained(gpt_oss_model, dtype=torch.float32).eval()
    _check(engine, hf, LENGTHS, seed=1)
