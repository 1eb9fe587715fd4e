"""gqa_decode and gqa_prefill: the reference against transformers' GPT-OSS eager attention, and
the Triton kernels against the reference (sinks, sliding windows, GQA groups, paged caches)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

from pdserve.kernels.gqa_decode_triton import gqa_decode_triton
from pdserve.kernels.gqa_prefill_triton import gqa_prefill_triton
from pdserve.kernels.gqa_reference import gqa_decode_torch, gqa_prefill_torch
from tests.kernels.kernel_cases import nan_like, rel_err
from tests.kernels.test_mla_decode import paged

F32, BF16 = torch.float32, torch.bfloat16
SMALL_DECODE = dict(BLOCK_N=16, num_warps=4, num_stages=1)
SMALL_PREFILL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def hf_attention(q, k, v, qpos, sinks, scale, window) -> torch.Tensor:
    """transformers' GPT-OSS eager attention of one sequence in float64: q [n, H, D] at positions
    qpos [n] among keys k, v [m, KVH, D] at 0..m-1 -> [n, H, D]. No sinks is a -inf sink."""
    h, kvh = q.shape[1], k.shape[1]
    sink = torch.full((h,), float("-inf")) if sinks is None else sinks.cpu()
    module = SimpleNamespace(num_key_value_groups=h // kvh, sinks=sink.double(), training=False)
    rule = sliding_window_causal_mask_function(window) if window else causal_mask_function
    seen = rule(0, 0, qpos[:, None], torch.arange(k.shape[0])[None, :])  # [n, m]
    mask = torch.zeros(seen.shape, dtype=torch.float64).masked_fill(~seen, torch.finfo().min)

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # [n, heads, D] -> [1, heads, n, D]
        return x.cpu().double().transpose(0, 1)[None]

    out, _ = eager_attention_forward(
        module, heads_first(q), heads_first(k), heads_first(v), mask[None, None], scale
    )
    return out[0]  # [n, H, D]


def naive_decode(q, cache, table, lens, sinks, scale, window) -> torch.Tensor:
    """Each sequence's rows looked up token by token, then ``hf_attention`` of its last one."""
    b, h, d = q.shape
    page = cache.shape[1]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i, n in enumerate(lens.tolist()):
        rows = torch.stack([cache[table[i, j // page], j % page] for j in range(n)])  # [n, C]
        kv = rows.view(n, -1, 2, d)  # [n, KVH, 2, D]
        qpos = torch.tensor([n - 1])
        out[i] = hf_attention(q[i : i + 1], kv[:, :, 0], kv[:, :, 1], qpos, sinks, scale, window)
    return out


def naive_prefill(q, k, v, cu_q, cu_k, sinks, scale, window) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(len(cq) - 1):
        qs, ks, vs = q[cq[s] : cq[s + 1]], k[ck[s] : ck[s + 1]], v[ck[s] : ck[s + 1]]
        qpos = torch.arange(qs.shape[0]) + ks.shape[0] - qs.shape[0]
        out[cq[s] : cq[s + 1]] = hf_attention(qs, ks, vs, qpos, sinks, scale, window)
    return out


def decode_inputs(heads, kv_heads, d, page, lens, dtype, device, seed=0):
    """q [B, H, D], a shuffled paged cache of KVH * 2 * D rows, its block table, lengths, sinks."""
    cache, table, seq_lens = paged(lens, page, kv_heads * 2 * d, dtype, device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), heads, d, generator=gen).to(dtype).to(device)
    sinks = (2 * torch.randn(heads, generator=gen)).to(dtype).to(device)  # some dominate a row
    return q, cache, table, seq_lens, sinks


def prefill_inputs(heads, kv_heads, d, q_lens, k_lens, dtype, device, seed=0):
    """q [Tq, H, D], k and v [Tk, KVH, D], cu_seqlens_q and _k, sinks."""
    gen = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).int().to(device)
    cu_k = torch.tensor([0, *k_lens]).cumsum(0).int().to(device)
    q = torch.randn(sum(q_lens), heads, d, generator=gen).to(dtype).to(device)
    k = torch.randn(sum(k_lens), kv_heads, d, generator=gen).to(dtype).to(device)
    v = torch.randn(sum(k_lens), kv_heads, d, generator=gen).to(dtype).to(device)
    sinks = (2 * torch.randn(heads, generator=gen)).to(dtype).to(device)  # any float dtype
    return q, k, v, cu_q, cu_k, sinks


# heads, kv heads, head dim, page, lengths (1, a page, a page + 1, longer), window
REFERENCE_CASES = [
    (4, 4, 16, 4, [1, 4, 5, 13], 0),  # group 1, full attention
    (4, 2, 16, 4, [1, 4, 5, 13], 3),  # group 2, window below most contexts
    (8, 2, 16, 16, [1, 16, 17, 40], 17),  # group 4, window at the boundary of 17
    (8, 2, 32, 16, [3, 9], 64),  # a window longer than every context
]


@pytest.mark.parametrize("with_sinks", [True, False])
@pytest.mark.parametrize("heads, kv_heads, d, page, lens, window", REFERENCE_CASES)
def test_decode_reference_matches_transformers(with_sinks, heads, kv_heads, d, page, lens, window):
    q, cache, table, seq_lens, sinks = decode_inputs(heads, kv_heads, d, page, lens, F32, "cpu")
    sinks = sinks if with_sinks else None
    ref = gqa_decode_torch(q.double(), cache.double(), table, seq_lens, sinks, 0.3, window)
    assert ref.dtype == torch.float64
    assert rel_err(ref, naive_decode(q, cache, table, seq_lens, sinks, 0.3, window)) < 1e-12


@pytest.mark.parametrize("with_sinks", [True, False])
@pytest.mark.parametrize("heads, kv_heads, d, page, lens, window", REFERENCE_CASES)
def test_prefill_reference_matches_transformers(with_sinks, heads, kv_heads, d, page, lens, window):
    q_lens = [max(1, n // 2) for n in lens]  # chunks after cached prefixes, and whole prompts
    q, k, v, cu_q, cu_k, sinks = prefill_inputs(heads, kv_heads, d, q_lens, lens, F32, "cpu")
    sinks = sinks if with_sinks else None
    args = (cu_q, cu_k, max(q_lens), max(lens), 0.3, sinks, window)
    ref = gqa_prefill_torch(q.double(), k.double(), v.double(), *args)
    assert rel_err(ref, naive_prefill(q, k, v, cu_q, cu_k, sinks, 0.3, window)) < 1e-12


def test_reference_window_one_and_dominant_sink():
    """Window 1: each query sees itself alone; a sink far above the scores leaves ~nothing."""
    q, k, v, cu_q, cu_k, _ = prefill_inputs(2, 1, 16, [3], [5], F32, "cpu")
    out = gqa_prefill_torch(q, k, v, cu_q, cu_k, 3, 5, 0.1, None, 1)
    assert torch.allclose(out, v[2:].expand(-1, 2, -1))
    out = gqa_prefill_torch(q, k, v, cu_q, cu_k, 3, 5, 0.1, torch.full((2,), 60.0), 0)
    assert out.abs().max() < 1e-20


# dtype, heads, kv heads, head dim, page, lengths, window, splits
DECODE_CASES = [
    (F32, 4, 4, 16, 4, [1, 4, 5, 30], 0, 1),
    (F32, 4, 2, 16, 4, [1, 4, 5, 6, 7, 30], 6, 3),  # lengths around the window
    (F32, 8, 2, 32, 16, [1, 16, 17, 50], 16, 1),  # a window of exactly a page
    (F32, 8, 2, 16, 16, [1, 16, 17, 50], 17, 4),
    (BF16, 8, 2, 64, 16, [2, 33, 16], 0, 2),  # GPT-OSS's head dim
    (BF16, 4, 1, 16, 4, [7, 20, 5], 5, None),  # one KV head, the shape-derived split count
]


@pytest.mark.parametrize("with_sinks", [True, False])
@pytest.mark.parametrize("dtype, heads, kv_heads, d, page, lens, window, splits", DECODE_CASES)
def test_decode_triton_matches_reference(
    device, with_sinks, dtype, heads, kv_heads, d, page, lens, window, splits
):
    q, cache, table, seq_lens, sinks = decode_inputs(heads, kv_heads, d, page, lens, dtype, device)
    sinks = sinks if with_sinks else None
    out = gqa_decode_triton(
        q, cache, table, seq_lens, sinks, d**-0.5, window, num_splits=splits,
        config=SMALL_DECODE, out=nan_like(tuple(q.shape), dtype, device),
    )  # fmt: skip
    ref = gqa_decode_torch(q, cache, table, seq_lens, sinks, d**-0.5, window)
    assert rel_err(out, ref) < tol(dtype)


def test_decode_tensor_parallel_column_view(device):
    """A rank reads the columns of its own KV heads: rows longer than the view's width."""
    q, cache, table, seq_lens, sinks = decode_inputs(4, 4, 16, 4, [9, 22], F32, device)
    mine = cache[..., 2 * 32 : 4 * 32]  # KV heads 2 and 3: [N, bs, 2 * 2 * D]
    q, sinks = q[:, :2].contiguous(), sinks[:2].contiguous()  # one query head per KV head
    ref = gqa_decode_torch(q, mine.contiguous(), table, seq_lens, sinks, 0.25, 7)
    for splits in (1, 3):
        out = gqa_decode_triton(
            q, mine, table, seq_lens, sinks, 0.25, 7, num_splits=splits, config=SMALL_DECODE
        )
        assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("splits", [1, 3, None])
def test_decode_never_reads_pages_before_the_window(device, splits):
    """Pages wholly before the window may be freed: junk block ids and NaN rows there."""
    page, window, lens = 4, 6, [40, 9, 3]
    q, cache, table, seq_lens, sinks = decode_inputs(4, 2, 16, page, lens, F32, device)
    ref = gqa_decode_torch(q, cache, table, seq_lens, sinks, 0.3, window)
    table, cache = table.clone(), cache.clone()
    for i, n in enumerate(lens):
        first = max(n - window, 0)  # positions before it are out of sight
        for j in range(first):
            cache[table[i, j // page], j % page] = float("nan")
        table[i, : first // page] = cache.shape[0] + 99  # pages wholly before it
    out = gqa_decode_triton(
        q, cache, table, seq_lens, sinks, 0.3, window, num_splits=splits, config=SMALL_DECODE
    )
    assert rel_err(out, ref) < 1e-5


def test_decode_empty_sequence_and_more_splits_than_tokens(device):
    q, cache, table, seq_lens, sinks = decode_inputs(4, 2, 16, 4, [3, 0, 1], F32, device)
    out = gqa_decode_triton(q, cache, table, seq_lens, sinks, 0.3, 0, num_splits=8)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # nothing to attend: the sink takes all
    keep = [0, 2]
    ref = gqa_decode_torch(q[keep], cache, table[keep], seq_lens[keep], sinks, 0.3, 0)
    assert rel_err(out[keep], ref) < 1e-5


def test_decode_bad_inputs(device):
    q, cache, table, seq_lens, sinks = decode_inputs(4, 2, 16, 4, [5], F32, device)
    with pytest.raises(ValueError, match="power of two"):
        gqa_decode_triton(q[..., :12], cache[..., :48], table, seq_lens, None, 0.1, 0)
    with pytest.raises(ValueError, match="KV heads"):
        gqa_decode_triton(q[:, :3], cache, table, seq_lens, None, 0.1, 0)
    with pytest.raises(ValueError, match="dtype"):
        gqa_decode_triton(q.bfloat16(), cache, table, seq_lens, None, 0.1, 0)
    with pytest.raises(ValueError, match="sinks"):
        gqa_decode_triton(q, cache, table, seq_lens, sinks[:2], 0.1, 0)


# dtype, heads, kv heads, head dim, query lengths, key lengths, window
PREFILL_CASES = [
    (F32, 4, 4, 16, [5, 1, 20, 17], [5, 9, 40, 17], 0),  # cached prefixes, one query alone
    (F32, 4, 2, 16, [5, 1, 20, 17], [5, 9, 40, 17], 6),
    (F32, 8, 2, 32, [16, 17, 3], [16, 17, 35], 16),  # a tile, a tile + 1; window of a tile
    (F32, 4, 1, 16, [7, 30], [7, 30], 1),  # each query sees only itself
    (BF16, 8, 2, 64, [33, 2], [40, 70], 0),
    (BF16, 4, 2, 16, [20, 6], [20, 30], 7),
]


@pytest.mark.parametrize("with_sinks", [True, False])
@pytest.mark.parametrize("dtype, heads, kv_heads, d, q_lens, k_lens, window", PREFILL_CASES)
def test_prefill_triton_matches_reference(
    device, with_sinks, dtype, heads, kv_heads, d, q_lens, k_lens, window
):
    q, k, v, cu_q, cu_k, sinks = prefill_inputs(heads, kv_heads, d, q_lens, k_lens, dtype, device)
    sinks = sinks if with_sinks else None
    args = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), d**-0.5, sinks, window)
    out = gqa_prefill_triton(*args, config=SMALL_PREFILL, out=nan_like(q.shape, dtype, device))
    assert rel_err(out, gqa_prefill_torch(*args)) < tol(dtype)


def test_prefill_skips_key_tiles_before_the_window(device):
    """Keys in tiles before any query's window are never loaded: NaN there changes nothing."""
    q, k, v, cu_q, cu_k, sinks = prefill_inputs(4, 2, 16, [3, 20], [40, 20], F32, device)
    args = (cu_q, cu_k, 20, 40, 0.3, sinks, 5)
    ref = gqa_prefill_torch(q, k, v, *args)
    k, v = k.clone(), v.clone()
    k[:32], v[:32] = float("nan"), float("nan")  # sequence 0's first query (37) sees 33..37
    assert rel_err(gqa_prefill_triton(q, k, v, *args, config=SMALL_PREFILL), ref) < 1e-5


def test_prefill_strided_views_of_gathered_rows_and_default_config(device):
    """k and v as the model passes them: views into gathered cache rows [Tk, KVH, 2, D]."""
    q, _, _, cu_q, cu_k, sinks = prefill_inputs(4, 2, 16, [9, 4], [12, 30], F32, device)
    rows = torch.randn(42, 2, 2, 16, device=device)  # [Tk, KVH, 2, D]
    k, v = rows[:, :, 0], rows[:, :, 1]
    args = (q, k, v, cu_q, cu_k, 9, 30, 0.2, sinks, 6)
    ref = gqa_prefill_torch(*args)
    assert rel_err(gqa_prefill_triton(*args, config=SMALL_PREFILL), ref) < 1e-5
    assert rel_err(gqa_prefill_triton(*args), ref) < 1e-5


def test_prefill_bad_inputs(device):
    q, k, v, cu_q, cu_k, sinks = prefill_inputs(4, 2, 16, [3], [3], F32, device)
    with pytest.raises(ValueError, match="disagree"):
        gqa_prefill_triton(q[:, :3], k, v, cu_q, cu_k, 3, 3, 0.1, None, 0)
    with pytest.raises(ValueError, match="window"):
        gqa_prefill_triton(q, k, v, cu_q, cu_k, 3, 3, 0.1, sinks, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 128])
def test_gpt_oss_shapes_gpu(window):
    """64 query heads over 8 KV heads of 64, pages of 16, bf16, default tiles and splits."""
    dev = torch.device("cuda")
    lens = [1, 127, 128, 129, 4000, 300]
    q, cache, table, seq_lens, sinks = decode_inputs(64, 8, 64, 16, lens, BF16, dev)
    out = gqa_decode_triton(q, cache, table, seq_lens, sinks, 0.125, window)
    ref = gqa_decode_torch(q, cache, table, seq_lens, sinks, 0.125, window)
    assert rel_err(out, ref) < 1e-2
    q_lens, k_lens = [512, 1, 77, 1024], [512, 900, 2000, 3000]
    q, k, v, cu_q, cu_k, sinks = prefill_inputs(64, 8, 64, q_lens, k_lens, BF16, dev)
    args = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 0.125, sinks, window)
    assert rel_err(gqa_prefill_triton(*args), gqa_prefill_torch(*args)) < 1e-2


@pytest.mark.gpu
def test_decode_cuda_graph_replay_gpu():
    dev = torch.device("cuda")
    q, cache, table, seq_lens, sinks = decode_inputs(64, 8, 64, 16, [128, 2048, 128], BF16, dev)
    seq_lens.copy_(torch.tensor([100, 2000, 7], dtype=torch.int32))
    for window in (0, 128):
        gqa_decode_triton(q, cache, table, seq_lens, sinks, 0.125, window)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = gqa_decode_triton(q, cache, table, seq_lens, sinks, 0.125, window)
        for new_lens in ([101, 1999, 64], [1, 2048, 65]):  # lengths change, shapes do not
            seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
            q.copy_(torch.randn_like(q))
            graph.replay()
            ref = gqa_decode_torch(q, cache, table, seq_lens, sinks, 0.125, window)
            assert rel_err(out, ref) < 1e-2
