"""The triton_kernels peer adapter (bench/moe_peer_triton_kernels.py) against moe_mxfp4_torch.

The peer runs only on a Hopper GPU with ../shared/peers/triton_kernels-v3.6.0 on PYTHONPATH;
elsewhere those tests skip with ``unavailable()``'s reason. The routing it builds is checked
wherever triton_kernels imports (its metadata kernels run under Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench import moe_peer_triton_kernels as peer
from pdserve.kernels.moe_reference import SwiGLU, moe_mxfp4_torch
from tests.kernels.kernel_cases import (
    GPT_OSS_ACT,
    REAL_MOE_SHAPES,
    random_moe,
    random_routing,
    rel_err,
)

REASON = peer.unavailable()
needs_peer = pytest.mark.skipif(REASON is not None, reason=f"triton_kernels peer: {REASON}")


def test_unavailable_without_a_gpu_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = peer.unavailable()
    assert reason and ("importable" in reason or "CUDA" in reason or "import" in reason)


def test_interleave_puts_each_gate_row_before_its_up_row():
    t = torch.arange(2 * 6 * 3).reshape(2, 6, 3)  # E 2, 2I 6 (gate rows 0-2, up rows 3-5)
    got = peer._interleave(t)
    assert got[:, 0::2].equal(t[:, :3]) and got[:, 1::2].equal(t[:, 3:])
    assert peer._interleave(torch.arange(8.0).reshape(1, 8)).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]


@pytest.mark.parametrize("m, e, k", [(1, 4, 1), (37, 8, 3), (50, 3, 2)])
def test_routing_sorts_slots_by_expert_and_drops_invalid_ids(m, e, k):
    pytest.importorskip("triton_kernels.matmul_ogs", reason="triton_kernels is not importable")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids, tw = random_routing(m, e, k, device=device, seed=m, invalid=True)
    routing, gather, scatter = peer._routing(ids, tw, e)
    flat, s = ids.reshape(-1).cpu(), m * k
    valid = [x for x in range(s) if 0 <= flat[x] < e]
    hist = [sum(1 for x in valid if flat[x] == j) for j in range(e)]
    assert routing.expt_hist.tolist() == hist and routing.n_expts_act == k
    combine = gather.src_indx.tolist()  # sorted position -> slot
    assert combine == sorted(valid, key=lambda x: (int(flat[x]), x)) + [-1] * (s - len(valid))
    assert scatter.dst_indx.tolist() == combine
    dispatch = scatter.src_indx.tolist()  # slot -> sorted position, -1 where the id is invalid
    assert dispatch == gather.dst_indx.tolist()
    assert [dispatch[x] for x in valid] == [combine.index(x) for x in valid]
    assert all(dispatch[x] == -1 for x in range(s) if x not in valid)
    n = len(valid)
    assert routing.gate_scal[:n].tolist() == tw.reshape(-1)[combine[:n]].float().tolist()
    assert routing.expt_data.slice_offs.tolist() == [sum(hist[:j]) for j in range(e + 1)]


@needs_peer
@pytest.mark.parametrize(
    "m, e, k, h, i, act, bias",
    [
        (1, 4, 1, 256, 128, SwiGLU(), False),  # top-1: the scatter writes the output itself
        (37, 8, 3, 256, 128, GPT_OSS_ACT, True),
        (200, 16, 4, 512, 192, SwiGLU(), True),  # I = 192: GEMM2's K not a multiple of 128
        (64, 8, 2, 320, 256, GPT_OSS_ACT, False),  # H = 320: GEMM1's K not a multiple of 128
    ],
)
def test_matches_reference(m, e, k, h, i, act, bias):
    w = random_moe(e, h, i, bias=bias, device="cuda", seed=m)
    ids, tw = random_routing(m, e, k, device="cuda", seed=m, invalid=True)
    x = torch.randn(m, h, device="cuda").bfloat16()
    out = peer.moe_triton_kernels(x, peer.prepare(w), ids, tw, act)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert rel_err(out, moe_mxfp4_torch(x, w, ids, tw, act)) < 2e-2


@needs_peer
def test_all_ids_invalid_gives_zeros():
    w = random_moe(4, 256, 128, device="cuda", seed=3)
    ids = torch.full((5, 2), -1, device="cuda")
    ids[1, 0] = 4
    x, tw = torch.randn(5, 256, device="cuda").bfloat16(), torch.ones(5, 2, device="cuda")
    out = peer.moe_triton_kernels(x, peer.prepare(w), ids, tw, SwiGLU())
    assert out.eq(0).all()


@needs_peer
@pytest.mark.gpu
@pytest.mark.parametrize("shape", REAL_MOE_SHAPES, ids=lambda s: s.name)
def test_real_shapes(shape):
    w = random_moe(shape.experts, shape.hidden, shape.inter, bias=shape.bias, device="cuda")
    ids, tw = random_routing(129, shape.experts, shape.top_k, device="cuda", seed=1, invalid=True)
    x = torch.randn(129, shape.hidden, device="cuda").bfloat16()
    out = peer.moe_triton_kernels(x, peer.prepare(w), ids, tw, shape.act)
    assert rel_err(out, moe_mxfp4_torch(x, w, ids, tw, shape.act)) < 2e-2
