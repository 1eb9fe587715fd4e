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


def _wide_mla_model(tmp_path, monkeypatch, triton_rows: dict[int, int] | None = None) -> str:
    """``tests.flashinfer_mla``'s model. Its 16 heads would run steps of few decode rows through
    the Triton kernel (``TRITON_ROWS``): FlashInfer's kernel runs every step here unless
    ``triton_rows`` says otherwise."""
    from pdserve.kernels import mla_decode_flashinfer
    from tests.flashinfer_mla import wide_mla_model

    monkeypatch.setattr(mla_decode_flashinfer, "TRITON_ROWS", triton_rows or {})
    return wide_mla_model(tmp_path / "wide")


def test_registry_picks_triton_on_the_gpu(tiny_model):
    """Triton everywhere but the FP8 linear, which is cuBLAS's on sm_90 where torch has its
    block-scaled GEMM, and the MoE, whose kernels read the fragment layout there. Where
    FlashInfer's MLA decode is the choice (sm_90 with FlashInfer and nvcc), the tiny model's
    64 + 16 latent, which its kernels do not take, runs the Triton kernel, and the runner
    reports that."""
    from pdserve.kernels import fp8_gemm_scaled_mm
    from pdserve.kernels.mla_decode_flashinfer import unavailable

    runner = _engine(tiny_model, "bfloat16").runner
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    cublas = sm90 and fp8_gemm_scaled_mm.unavailable() is None
    want = {op: "triton" for op in runner.kernel_names}
    want["linear_fp8"] = "scaled_mm" if cublas else "triton"
    if sm90:
        want["moe_small"] = want["moe_large"] = "triton_interleaved"
    assert runner.kernel_names == want
    chosen = {c.op: c.backend.name for c in runner.kernels.choices}["mla_decode"]
    fa3 = sm90 and unavailable() is None
    assert chosen == ("flashinfer_fa3" if fa3 else "triton")


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


@pytest.mark.parametrize("which", ["tiny_model", "yarn_model"])  # q_lora_rank set / None
def test_decode_graphs_replay_the_tokens_of_eager_steps(which, request):
    """The graphs run the shared experts beside the routed ones (and without a query latent
    the query and KV projections side by side): the eager steps' tokens still."""
    from tests.cluster.test_decode_graphs import _prompts as some_prompts
    from tests.cluster.test_decode_graphs import _staggered

    path = request.getfixturevalue(which)
    eager = _engine(path, "float32", decode_graphs="off")
    replayed = _engine(path, "float32", decode_graph_max_batch=4)  # auto: captured
    assert eager.runner.graphs is None
    assert sorted(replayed.runner.graphs.graphs) == [1, 2, 4]
    prompts = some_prompts(eager.vocab_size, 7)  # decode batches of 1 to 7: replays and eager
    assert _staggered(replayed, prompts) == _staggered(eager, prompts)
    assert replayed.blocks.num_used == 0


@pytest.mark.parametrize("which", ["tiny_model", "gpt_oss_model"])  # MLA; GQA, sliding layers
def test_mixed_graphs_replay_the_tokens_of_eager_steps(which, request, monkeypatch):
    """Fresh prompts, a chunked one and prefix-cache hits beside decode rows: steps with
    prefill chunks replayed from the captured mixed-step graphs give the eager steps' tokens."""
    model = request.getfixturevalue(which)
    from tests.cluster.test_decode_graphs import _staggered
    from tests.cluster.test_mixed_graphs import _again as mixed_again
    from tests.cluster.test_mixed_graphs import _prompts as mixed_prompts

    kw = dict(decode_graph_max_batch=4, mixed_graph_max_tokens=64)
    eager = _engine(model, "float32", mixed_graphs="off", **kw)
    replayed = _engine(model, "float32", **kw)  # auto: captured
    mixed = replayed.runner.mixed
    assert eager.runner.mixed is None and len(mixed.graphs) == 2 * 3  # rows 0, 4 x 16, 32, 64
    keys = []
    run = mixed.run
    monkeypatch.setattr(mixed, "run", lambda sched, key: keys.append(key) or run(sched, key))
    prompts = mixed_prompts(eager.vocab_size)
    again = mixed_again(prompts)  # after the first block, cached by the first run
    assert _staggered(replayed, prompts) == _staggered(eager, prompts)
    assert _staggered(replayed, again) == _staggered(eager, again)
    assert len(keys) >= len(prompts) and all(k in mixed.graphs for k in keys)
    assert replayed.blocks.num_used == 0


@pytest.mark.parametrize("which", ["tiny_model", "gpt_oss_model"])
def test_steps_planned_ahead_replay_the_tokens_of_steps_planned_after(which, request):
    """Captured decode graphs, each pure decode step launched while the one before runs, its
    input ids taken from that step's samples on the GPU: the outputs of steps planned after
    the tokens (requests ending by length, by stop token, seeded, with logprobs)."""
    from tests.cluster.test_engine_ahead import _counting, _workload

    path = request.getfixturevalue(which)
    after = _engine(path, "float32", decode_graph_max_batch=8, plan_ahead=False)
    ahead = _engine(path, "float32", decode_graph_max_batch=8)
    assert ahead.runner.graphs is not None and ahead.runner.graphs.graphs
    prompts, params = _workload(after)
    rows = _counting(ahead)
    expected, got = after.generate(prompts, params), ahead.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in expected]
    assert len(rows) >= 5 and ahead.blocks.num_used == ahead.blocks.num_parked == 0


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


def test_flashinfer_mla_decode_agrees_with_the_triton_kernel(tmp_path, monkeypatch):
    """DeepSeek's latent widths (512 + 64) in a small model, bf16: FlashInfer's MLA decode,
    planned per step, gives the Triton kernel's logits up to bf16 rounding, replayed from decode
    graphs (batches of 1 and 6, padded to 8) and in an eager step that also carries a prefill
    chunk (mixed-step graphs off: ``test_flashinfer_mla_decode_in_mixed_graphs`` replays
    those)."""
    path = _wide_mla_model(tmp_path, monkeypatch)
    # each prompt's prefill in one step; plan_ahead off: the prefill step would launch the next
    # step before the test's own
    kw = dict(budget=4096, mixed_graphs="off", plan_ahead=False)
    fi = _engine(path, "bfloat16", **kw)
    triton = _engine(path, "bfloat16", kernel_overrides={"mla_decode": "triton"}, **kw)
    assert fi.runner.kernel_names["mla_decode"] == "flashinfer_fa3"
    assert fi.runner.graphs is not None and fi.runner.graphs.graphs
    prompts = _prompts(fi.vocab_size, (1, 17, 130, 301, 64, 65, 40), seed=5)
    # (prompts prefilled first, prompts added after): pure decode steps of 1 and 6 rows, then
    # one decode row beside a prefill chunk
    for first, then in (([prompts[0]], []), (prompts[:6], []), ([prompts[2]], [prompts[6]])):
        _same_logits(fi, triton, first, then)
    assert fi.blocks.num_used == 0 and triton.blocks.num_used == 0


def _same_logits(fi: LLMEngine, triton: LLMEngine, first, then, check=lambda sched: None):
    """The next step's logits of both engines after ``first`` was prefilled and ``then`` added
    (``check``: fi's step, before it runs), equal up to bf16 rounding; every request aborted
    after."""
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    logits = []
    for engine in (fi, triton):
        ids = [engine.add_request(p, sp) for p in first]
        engine.step()  # the prefills, each request's first token
        ids += [engine.add_request(p, sp) for p in then]
        sched = engine.scheduler.schedule()
        assert sched.num_decode_chunks == len(first)
        if engine is fi:
            check(sched)
        logits.append(engine.runner.compute_logits(sched))
        for rid in ids:
            engine.abort(rid)
    a, b = logits  # [rows, vocab] float32
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cos.min().item() > 0.999, cos
    assert (a - b).abs().max().item() < 0.25


def test_flashinfer_mla_decode_in_mixed_graphs(tmp_path, monkeypatch):
    """Decode rows beside a prefill chunk replayed from a mixed-step graph, FlashInfer's MLA
    decode planned for the graph's rows (padding included) before each replay: the logits of
    the Triton kernel's eager steps up to bf16 rounding, at 1 and 3 decode rows (bucket 4),
    with a pure decode step of 3 rows between them replaying the decode graph of batch 4 (the
    same FlashInfer plan buffers)."""
    path = _wide_mla_model(tmp_path, monkeypatch)
    kw = dict(budget=4096, decode_graph_max_batch=4, mixed_graph_max_tokens=512, plan_ahead=False)
    fi = _engine(path, "bfloat16", **kw)
    triton = _engine(
        path, "bfloat16", mixed_graphs="off", kernel_overrides={"mla_decode": "triton"}, **kw
    )
    mixed = fi.runner.mixed
    assert fi.runner.kernel_names["mla_decode"] == "flashinfer_fa3"
    assert mixed is not None and (4, 512) in mixed.graphs and triton.runner.mixed is None
    monkeypatch.setattr(mixed, "times", {})  # every bucket replays, whatever start-up timed
    prompts = _prompts(fi.vocab_size, (1, 17, 130, 301, 64, 65, 40), seed=5)

    def replayed(sched) -> None:
        if sched.num_decode_chunks == len(sched.chunks):  # pure decode
            assert fi.runner.graphs.fits(sched) and fi.runner.graphs.bucket(len(sched.chunks)) == 4
        else:
            assert mixed.bucket(sched) in mixed.graphs

    for first, then in (
        ([prompts[2]], [prompts[6]]),
        (prompts[:3], []),
        (prompts[:3], [prompts[4], prompts[5]]),
    ):
        _same_logits(fi, triton, first, then, replayed)
    assert fi.blocks.num_used == 0 and triton.blocks.num_used == 0


def test_flashinfer_plans_steps_planned_ahead(tmp_path, monkeypatch):
    """FlashInfer's MLA decode plans each replay on the host: a step planned while the one
    before runs gives the tokens of steps planned after it, in bf16."""
    from tests.cluster.test_engine_ahead import _counting

    path = _wide_mla_model(tmp_path, monkeypatch)
    after = _engine(path, "bfloat16", budget=4096, plan_ahead=False)
    ahead = _engine(path, "bfloat16", budget=4096)
    assert ahead.runner.kernel_names["mla_decode"] == "flashinfer_fa3"
    prompts = _prompts(ahead.vocab_size, (1, 17, 130, 301, 64, 65), seed=5)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    rows = _counting(ahead)
    got = [o.token_ids for o in ahead.generate(prompts, sp)]
    assert got == [o.token_ids for o in after.generate(prompts, sp)]
    assert len(rows) >= 20 and ahead.blocks.num_used == 0


def test_steps_of_few_decode_rows_run_the_triton_kernel(tmp_path, monkeypatch):
    """Up to ``TRITON_ROWS`` decode rows (4 here) FlashInfer's backend runs the Triton kernel:
    the decode graphs of 1, 2 and 4 rows plan nothing on FlashInfer's wrappers, the graph of 8
    does; the logits of steps of 3 and 6 rows (graphs of 4 and 8) are the Triton kernel's up to
    bf16 rounding."""
    path = _wide_mla_model(tmp_path, monkeypatch, triton_rows={16: 4})
    kw = dict(budget=4096, decode_graph_max_batch=8, mixed_graphs="off", plan_ahead=False)
    fi = _engine(path, "bfloat16", **kw)
    triton = _engine(path, "bfloat16", kernel_overrides={"mla_decode": "triton"}, **kw)
    assert fi.runner.kernel_names["mla_decode"] == "flashinfer_fa3"
    assert {1, 2, 4, 8} <= set(fi.runner.graphs.graphs)
    wrappers = fi.runner.kernels.mla_decode._wrappers
    assert 8 in wrappers and not {1, 2, 4} & set(wrappers)
    prompts = _prompts(fi.vocab_size, (1, 17, 130, 301, 64, 65, 40), seed=5)
    for first in (prompts[:3], prompts[:6]):
        _same_logits(fi, triton, first, [])
    assert fi.blocks.num_used == 0 and triton.blocks.num_used == 0


def test_fp8_linears_give_the_dequantized_models_logits(tmp_path, monkeypatch):
    """DeepSeek's FP8 release format in a small model whose projections cuBLAS takes (K in 512s),
    at a prefill of 930 tokens and a decode step of 7 rows (replayed from a graph of 8). The FP8
    GEMMs the registry picks, cuBLAS's on sm_90 (made to run from one token, so the graph holds
    it), against the Triton FP8 kernel (the same activation codes: a few bf16 roundings apart)
    and against the weights dequantized to bf16 at load (apart by the activations' E4M3
    rounding: the logits' cosine stays above 0.99)."""
    from pdserve.cluster.checkpoint_maker import make_model
    from pdserve.kernels import fp8_gemm_scaled_mm

    monkeypatch.setattr(fp8_gemm_scaled_mm, "scaled_mm_from_m", lambda n, k: 1)
    dims = dict(hidden_size=512, q_lora_rank=512, kv_lora_rank=512, v_head_dim=128,
                intermediate_size=1024)  # fmt: skip
    path = str(make_model(tmp_path / "fp8", "tiny", fp8=True, seed=4, overrides=dims))
    engines = {
        "picked": _engine(path, "bfloat16", budget=4096),
        "triton": _engine(path, "bfloat16", budget=4096, kernel_overrides={"linear_fp8": "triton"}),
        "dense": _engine(path, "bfloat16", budget=4096, kernel_overrides={"linear_fp8": "torch"}),
    }
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    cublas = sm90 and fp8_gemm_scaled_mm.unavailable() is None
    assert engines["picked"].runner.kernel_names["linear_fp8"] == (
        "scaled_mm" if cublas else "triton"
    )
    prompts = _prompts(engines["dense"].vocab_size, (300, 17, 130, 301, 64, 65, 53), seed=6)
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    steps: dict[str, dict[str, torch.Tensor]] = {"prefill": {}, "decode": {}}
    for name, engine in engines.items():
        ids = [engine.add_request(p, sp) for p in prompts]
        steps["prefill"][name] = engine.runner.compute_logits(engine.scheduler.schedule())
        for rid in ids:
            engine.abort(rid)
        ids = [engine.add_request(p, sp) for p in prompts]
        engine.step()  # the prefills
        sched = engine.scheduler.schedule()
        assert sum(len(c.token_ids) == 1 for c in sched.chunks) == len(prompts)
        steps["decode"][name] = engine.runner.compute_logits(sched)
        for rid in ids:
            engine.abort(rid)
        assert engine.blocks.num_used == 0
    for step, got in steps.items():
        a, b, dense = (got[n].float() for n in ("picked", "triton", "dense"))
        assert ((a - b).norm() / b.norm()).item() < 3e-2, step
        cos = torch.nn.functional.cosine_similarity(a, dense, dim=1)
        assert cos.min().item() > 0.99, (step, cos)


def test_eager_steps_after_the_warm_up_compile_nothing(tiny_model):
    """Prompts of many lengths under a small step budget: chunked prefills beside decode rows
    whose block tables widen step by step (new split counts for the decode kernels). After
    start-up's warm-up, serving them compiles no Triton kernel."""
    from pdserve.kernels.compile_watch import WATCH

    engine = _engine(tiny_model, "bfloat16", budget=256)
    before = WATCH.totals()["serving"][0]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for p in _prompts(engine.vocab_size, (5, 70, 300, 700, 1100, 1900, 33, 129), seed=7):
        engine.add_request(p, sp)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    assert steps > 20
    assert WATCH.totals()["serving"][0] == before, [c.kernel for c in WATCH.recent()[-8:]]
