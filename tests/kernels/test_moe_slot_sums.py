"""The sums per slot after the MoE GEMMs, against PyTorch compositions of the same roundings
(interpreter on CPU, compiled on CUDA): slots of invalid ids add nothing, whatever they hold."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels.moe_reference import SwiGLU
from pdserve.kernels.moe_slot_sums import swiglu_splits, topk_sum
from tests.kernels.kernel_cases import GPT_OSS_ACT, rel_err

IDS = [[0, -1, 2], [3, 1, 7], [5, 5, 4]]  # E = 6: -1 and 7 invalid; a repeated expert


def _valid(ids: torch.Tensor, e: int) -> torch.Tensor:
    return (ids >= 0) & (ids < e)


def test_topk_sum_of_split_partials(device):
    m, k, h, e, splits = 3, 3, 40, 6, 3
    ids = torch.tensor(IDS, device=device)
    ys = torch.randn(splits, m * k, h, device=device)
    ys[:, 1] = float("nan")  # an invalid slot's rows are never written: garbage
    tw = torch.rand(m * k, device=device)
    tw[1] = float("inf")
    b2 = torch.randn(e, h, device=device).bfloat16()
    out = torch.empty(m, h, dtype=torch.bfloat16, device=device)
    topk_sum(ys, ids, e, out, tw=tw, b2=b2)
    flat = ids.reshape(-1)
    per_slot = ys.sum(0) + b2[flat.clamp(0, e - 1)].float()  # [S, H]
    per_slot = per_slot.bfloat16().float() * tw[:, None]
    per_slot = torch.where(_valid(flat, e)[:, None], per_slot, 0.0)
    ref = per_slot.view(m, k, h).sum(1)
    # the interpreter's bf16 conversions are not the GPU's rounding: the MoE tests' bf16 bound
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-2


def test_topk_sum_of_finished_slots(device):
    m, k, h, e = 3, 3, 24, 6
    ids = torch.tensor(IDS, device=device)
    ys = torch.randn(m * k, h, device=device)
    ys[1] = float("nan")
    out = torch.empty(m, h, device=device)
    topk_sum(ys, ids, e, out)
    ref = torch.where(_valid(ids.reshape(-1), e)[:, None], ys, 0.0).view(m, k, h).sum(1)
    assert torch.allclose(out, ref)


def test_swiglu_of_split_gate_up_sums(device):
    s, inter, e, splits = 9, 48, 6, 2
    ids = torch.tensor(IDS, device=device).reshape(-1)
    part = torch.randn(splits, s, 2 * inter, device=device)
    b13 = torch.randn(e, 2 * inter, device=device).bfloat16()
    for act in (SwiGLU(), GPT_OSS_ACT):
        h = torch.full((s, inter), -7.0, dtype=torch.bfloat16, device=device)
        swiglu_splits(part, ids, e, b13, act, h)
        gu = (part.sum(0) + b13[ids.clamp(0, e - 1)].float()).bfloat16().float()
        gate, up = gu[:, :inter], gu[:, inter:]
        if act.limit is not None:
            gate, up = gate.clamp(max=act.limit), up.clamp(-act.limit, act.limit)
        ref = gate * F.sigmoid(act.alpha * gate) * (up + act.beta)
        ok = _valid(ids, e)
        assert rel_err(h[ok], ref[ok]) < 2e-2
        assert (h[~ok] == -7.0).all()  # invalid slots' rows left alone
