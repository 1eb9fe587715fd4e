"""grouped_topk and topk_softmax, Triton (interpreter on CPU, compiled on CUDA), against the
PyTorch versions: the same experts per token and their weights. grouped_topk at DeepSeek-V3's
routing (256 experts in 8 groups, 4 kept, top-8, correction bias), V2-Lite's shape (64
experts, one group, top-6), groups not a power of two, and without normalization; topk_softmax
at GPT-OSS's shapes (32 and 128 experts, top-4), a count not a power of two, 16-bit logits;
grouped_topk also from the hidden states and the router weight (the scores in its launch)."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.routing import grouped_topk, topk_softmax
from pdserve.kernels.routing_triton import grouped_topk_triton, topk_softmax_triton

CASES = {  # E, top_k, n_group, topk_group, bias, norm, scale
    "deepseek-v3": (256, 8, 8, 4, True, True, 2.5),
    "v2-lite-shape": (64, 6, 1, 1, True, True, 1.0),
    "three-groups": (24, 3, 3, 2, False, False, 1.0),
    "one-expert-groups": (8, 2, 8, 3, True, True, 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_same_experts_and_weights_as_the_reference(device, case):
    e, k, n_group, topk_group, bias, norm, scale = CASES[case]
    g = torch.Generator().manual_seed(e + k)
    logits = (torch.randn(9, e, generator=g) * 2).to(device)
    cb = (torch.randn(e, generator=g) * 0.1).to(device) if bias else None
    kw = dict(correction_bias=cb, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
              routed_scaling_factor=scale)  # fmt: skip
    w, ids = grouped_topk_triton(logits, k, **kw)
    rw, rids = grouped_topk(logits, k, **kw)
    assert ids.dtype == rids.dtype == torch.int64 and w.dtype == torch.float32
    ids, order = ids.sort(dim=-1)
    rids, rorder = rids.sort(dim=-1)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w.gather(1, order), rw.gather(1, rorder), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 9, 70])  # 70: past the fused launch's 64, one matmul first
@pytest.mark.parametrize("case, hidden", [("v2-lite-shape", 2048), ("deepseek-v3", 300)])
def test_scores_from_the_hidden_states_in_the_same_launch(device, case, hidden, tokens, dtype):
    """Given the router weight, the hidden states in place of logits: the experts and weights
    of the logits' float32 matmul, twice over (each token's arrival count is back to 0)."""
    e, k, n_group, topk_group, bias, norm, scale = CASES[case]
    g = torch.Generator().manual_seed(e + tokens)
    x = torch.randn(tokens, hidden, generator=g).to(dtype).to(device)
    w = (torch.randn(e, hidden, generator=g) / hidden**0.5).to(dtype).to(device)
    cb = (torch.randn(e, generator=g) * 0.1).to(device) if bias else None
    kw = dict(correction_bias=cb, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
              routed_scaling_factor=scale)  # fmt: skip
    rw, rids = grouped_topk(x.float() @ w.float().T, k, **kw)
    assert torch.equal(grouped_topk(x, k, router_weight=w, **kw)[1], rids)
    rids, rorder = rids.sort(dim=-1)
    for _ in range(2):
        got, ids = grouped_topk_triton(x, k, router_weight=w, **kw)
        ids, order = ids.sort(dim=-1)
        assert torch.equal(ids, rids)
        torch.testing.assert_close(got.gather(1, order), rw.gather(1, rorder), rtol=1e-5, atol=1e-6)


def test_an_empty_batch_and_uneven_groups(device):
    w, ids = grouped_topk_triton(torch.zeros(0, 64, device=device), 6, n_group=1)
    assert w.shape == ids.shape == (0, 6)
    with pytest.raises(ValueError, match="do not split into n_group=3"):
        grouped_topk_triton(torch.zeros(2, 64, device=device), 6, n_group=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e, k", [(32, 4), (128, 4), (5, 2), (6, 6)])
def test_topk_softmax_matches_the_reference(device, dtype, e, k):
    g = torch.Generator().manual_seed(e * 10 + k)
    # each row a permutation of 0, 0.25, ..., (e - 1) / 4 - 9: distinct in bf16 too, no ties
    rows = [torch.randperm(e, generator=g).float() / 4 - 9 for _ in range(9)]
    logits = torch.stack(rows).to(dtype).to(device)  # [9, E]
    w, ids = topk_softmax_triton(logits, k)
    rw, rids = topk_softmax(logits, k)
    assert ids.dtype == rids.dtype == torch.int64 and w.dtype == rw.dtype == torch.float32
    assert torch.equal(ids, rids)  # the same experts, largest logit first
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.sum(-1), torch.ones(9, device=device))


def test_topk_softmax_takes_distinct_experts_past_the_finite_logits(device):
    """Two finite logits and top-4: those two first, then the lowest experts not yet taken,
    each once, weighing 0."""
    logits = torch.full((2, 8), float("-inf"))
    logits[0, 5], logits[0, 0] = 2.0, 1.0
    logits[1, 3], logits[1, 6] = 0.5, 0.25
    w, ids = topk_softmax_triton(logits.to(device), 4)
    assert ids.tolist() == [[5, 0, 1, 2], [3, 6, 0, 1]]
    assert (w[:, 2:] == 0).all() and torch.allclose(w[:, :2].sum(1), torch.ones(2, device=device))


def test_topk_softmax_of_an_empty_batch_float64_and_a_bad_k(device):
    w, ids = topk_softmax_triton(torch.zeros(0, 32, device=device), 4)
    assert w.shape == ids.shape == (0, 4)
    logits = torch.randn(3, 32, dtype=torch.float64, device=device)
    w, ids = topk_softmax_triton(logits, 4)  # the PyTorch version's ranking, as float64
    assert torch.equal(ids, torch.topk(logits, 4, dim=-1)[1])
    with pytest.raises(ValueError, match="top_k 33 must be in"):
        topk_softmax_triton(torch.zeros(2, 32, device=device), 33)


@pytest.mark.gpu
@pytest.mark.parametrize("counters_first", [True, False])
def test_scores_in_the_same_launch_replay_from_cuda_graphs(monkeypatch, counters_first):
    """Two graphs captured largest first, replayed smallest first with new hidden states: each
    replay routes as the PyTorch version does. Arrival counts made by an eager call before the
    captures; without one, the captures take the matmul first (a capture would not run the
    counts' zero fill)."""
    from pdserve.kernels import routing_triton

    monkeypatch.setattr(routing_triton, "_counters", {})
    e, k, n_group, topk_group, _, norm, scale = CASES["v2-lite-shape"]
    g = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(e, 2048, device="cuda", generator=g, dtype=torch.bfloat16) / 45
    kw = dict(n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
              routed_scaling_factor=scale)  # fmt: skip
    xs = {n: torch.zeros(n, 2048, device="cuda", dtype=torch.bfloat16) for n in (8, 1)}
    if counters_first:
        grouped_topk_triton(xs[8], k, router_weight=w, **kw)
    graphs, outs = {}, {}
    for n, x in xs.items():
        graphs[n] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[n]):
            outs[n] = grouped_topk_triton(x, k, router_weight=w, **kw)
    assert (torch.device("cuda", 0) in routing_triton._counters) == counters_first
    for n in (1, 8, 1):
        xs[n].copy_(torch.randn(xs[n].shape, device="cuda", generator=g))
        graphs[n].replay()
        got, ids = outs[n]
        rw, rids = grouped_topk(xs[n].float() @ w.float().T, k, **kw)
        (ids_s, order), (rids_s, rorder) = ids.sort(dim=-1), rids.sort(dim=-1)
        assert torch.equal(ids_s, rids_s)
        torch.testing.assert_close(got.gather(1, order), rw.gather(1, rorder), rtol=1e-5, atol=1e-6)
