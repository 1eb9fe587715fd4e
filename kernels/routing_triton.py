"""MoE routing in one Triton launch per op, backend ``triton``: DeepSeek-V3's group-limited
top-k (op ``grouped_topk``) and GPT-OSS's softmax over each token's top-k logits (op
``topk_softmax``, contract ``routing.topk_softmax``).

``grouped_topk``'s contract is ``routing.grouped_topk``: sigmoid scores, the correction bias
for selection only, groups ranked by their two best biased scores, the best ``topk_group``
groups' experts competing, weights the unbiased scores, normalized and scaled. PyTorch spends
about 18 kernels on it per MoE layer, ``topk_softmax`` 3-4 (a sort among them); each is one
program per token here. Given the router weight, ``grouped_topk`` also computes the logits in
the same launch (a decode step's few tokens, a small router): programs per token and block of
hidden columns, the token's last to arrive (an atomic count) summing their partial logits and
selecting, so the router's GEMV and the selection are one kernel.

Selection is by repeated arg-max over the row held in registers (K and the group count are
small); ties go to the lower expert id (``torch.topk`` leaves their order unspecified, so
exactly tied scores may pick other experts than torch's). Scores and softmax weights are
computed as torch computes them on CUDA (accurate exp, IEEE division); sums run in another
order than torch's: equal to a float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pdserve.kernels.dependent_launch import launch_args, pdl_start
from pdserve.kernels.routing import FUSED_MAX_TOKENS, router_scores, topk_softmax


@triton.jit
def _grouped_topk_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, E, stride_l, scale,
    TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, CUDA_MATH: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_start(PDL)  # see kernels.dependent_launch
    m = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + m * stride_l + e, mask=e < E, other=0.0).to(tl.float32)
    _select(x, m, bias_ptr, w_ptr, ids_ptr, E, scale, TOP_K, N_GROUP, TOPK_GROUP, HAS_BIAS, NORM,
            BLOCK_E, BLOCK_K, BLOCK_G, CUDA_MATH)  # fmt: skip


@triton.jit
def _select(
    x, m, bias_ptr, w_ptr, ids_ptr, E, scale,
    TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, CUDA_MATH: tl.constexpr,
):  # fmt: skip
    """Token m's experts and weights from its logits x [BLOCK_E] float32 (padding lanes any)."""
    e = tl.arange(0, BLOCK_E)
    valid = e < E
    if CUDA_MATH:  # as torch's sigmoid computes it (expf, an IEEE division): tl.sigmoid's
        # approximate exp2 and division would move scores by ulps and flip near-tied experts
        scores = tl.div_rn(tl.full([BLOCK_E], 1.0, tl.float32), 1.0 + libdevice.exp(-x))
    else:  # the interpreter's numpy maths is exact already
        scores = tl.sigmoid(x)  # [BE]
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if N_GROUP > 1 and TOPK_GROUP < N_GROUP:
        per = E // N_GROUP
        group = e // per  # [BE]; padding lanes land past the last group
        g = tl.arange(0, BLOCK_G)  # padding groups hold no expert: -inf, never kept
        # a group's score: the sum of its two best biased scores (its one best if it has one)
        best = tl.max(tl.where(group[None, :] == g[:, None], choice[None, :], float("-inf")), 1)
        first = tl.argmax(
            tl.where(group[None, :] == g[:, None], choice[None, :], float("-inf")), 1
        )  # [G]
        rest = tl.where(
            (group[None, :] == g[:, None]) & (e[None, :] != first[:, None]),
            choice[None, :],
            float("-inf"),
        )
        second = tl.max(rest, 1)
        gscore = tl.where(second > float("-inf"), best + second, best)  # [G]
        keep = g < 0  # [BG], all false
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.argmax(tl.where(keep, float("-inf"), gscore), 0)
            keep = keep | (g == pick)
        kept = tl.max(tl.where(group[None, :] == g[:, None], keep[:, None].to(tl.int32), 0), 0)
        choice = tl.where(kept > 0, choice, float("-inf"))
    k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    w = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pick = tl.argmax(choice, 0)
        ids = tl.where(k == j, pick.to(tl.int64), ids)
        w = tl.where(k == j, tl.sum(tl.where(e == pick, scores, 0.0), 0), w)
        choice = tl.where(e == pick, float("-inf"), choice)
    if NORM:
        total = tl.zeros_like(w) + (tl.sum(w, 0) + 1e-20)
        w = tl.div_rn(w, total) if CUDA_MATH else w / total
    tl.store(w_ptr + m * TOP_K + k, w * scale, mask=k < TOP_K)
    tl.store(ids_ptr + m * TOP_K + k, ids, mask=k < TOP_K)


@triton.jit
def _router_topk_kernel(
    x_ptr, rw_ptr, part_ptr, count_ptr, bias_ptr, w_ptr, ids_ptr, E, H, S, stride_x, stride_rw,
    scale,
    TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, CUDA_MATH: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (m, s): token m's logits over hidden columns [s * BLOCK_H, +BLOCK_H), for every
    expert, into its row of the partials [M, S, BLOCK_E]; the token's last program to arrive
    sums its S rows in order (the same sums whichever is last), sets its counter back to 0 and
    selects."""
    pdl_start(PDL)  # see kernels.dependent_launch
    m = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    h = s * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    x = tl.load(x_ptr + m * stride_x + h, mask=hm, other=0.0).to(tl.float32)  # [BH]
    wmask = (e < E)[:, None] & hm[None, :]
    w = tl.load(rw_ptr + e[:, None] * stride_rw + h[None, :], mask=wmask, other=0.0)  # [BE, BH]
    part = tl.sum(w.to(tl.float32) * x[None, :], 1)  # products exact in float32
    tl.store(part_ptr + (m * S + s) * BLOCK_E + e, part)
    tl.debug_barrier()  # every thread's partial stored before the one thread's release
    arrived = tl.atomic_add(count_ptr + m, 1, sem="acq_rel")
    if arrived == S - 1:
        logits = tl.zeros([BLOCK_E], dtype=tl.float32)
        for first in range(0, S, BLOCK_S):
            j = first + tl.arange(0, BLOCK_S)
            rows = part_ptr + (m * S + j[:, None]) * BLOCK_E + e[None, :]
            logits += tl.sum(tl.load(rows, mask=(j < S)[:, None], other=0.0, volatile=True), 0)
        tl.store(count_ptr + m, 0)
        _select(logits, m, bias_ptr, w_ptr, ids_ptr, E, scale, TOP_K, N_GROUP, TOPK_GROUP,
                HAS_BIAS, NORM, BLOCK_E, BLOCK_K, BLOCK_G, CUDA_MATH)  # fmt: skip


ROUTER_TILE = 8192  # router weight elements one program of that launch reads
_counters: dict[torch.device, torch.Tensor] = {}


def _counters_of(device: torch.device) -> torch.Tensor | None:
    """[FUSED_MAX_TOKENS] int32 arrival counts of the device's fused launches: zeros, and each
    launch's last program per token sets its count back to 0, so launches must not overlap
    (an engine's steps and graph replays run on one stream). Made on the first call outside
    a CUDA graph capture and kept for good (graphs hold their address); None before that, as a
    capture would record the zero fill without running it."""
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[device] = torch.zeros(FUSED_MAX_TOKENS, dtype=torch.int32, device=device)
    return _counters[device]


def grouped_topk_triton(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    router_weight: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [M, E] float32 -> (weights [M, K] float32, ids [M, K] int64). Given
    ``router_weight`` [E, H], the first argument is the hidden states [M, H] instead, and the
    logits their products with it: for up to ``FUSED_MAX_TOKENS`` tokens in the same launch
    (the weight read by column blocks over many programs, float32 products and sums), else
    by ``routing.router_scores`` first."""
    if router_weight is not None:
        x = router_logits
        counters = _counters_of(x.device)
        if x.shape[0] > FUSED_MAX_TOKENS or not x.is_contiguous() or counters is None:
            router_logits = router_scores(x, router_weight)
        else:
            return _router_topk(x, router_weight, counters, top_k, correction_bias, n_group,
                                topk_group, norm_topk_prob, routed_scaling_factor)  # fmt: skip
    m, e = router_logits.shape
    if e % n_group:
        raise ValueError(f"{e} experts do not split into n_group={n_group} groups")
    assert router_logits.dtype == torch.float32 and router_logits.stride(-1) == 1
    weights = torch.empty((m, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((m, top_k), dtype=torch.int64, device=router_logits.device)
    if m:
        bias = correction_bias if correction_bias is not None else router_logits
        _grouped_topk_kernel[(m,)](
            router_logits, bias, weights, ids, e, router_logits.stride(0),
            float(routed_scaling_factor),
            TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group,
            HAS_BIAS=correction_bias is not None, NORM=norm_topk_prob,
            BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
            BLOCK_G=triton.next_power_of_2(n_group), CUDA_MATH=router_logits.is_cuda, num_warps=4,
            **launch_args(router_logits.device),
        )  # fmt: skip
    return weights, ids


def _router_topk(x, router_weight, counters, top_k, bias, n_group, topk_group, norm, scale):
    """x [M, H] and the router weight [E, H] -> (weights [M, K], ids [M, K]) in one launch."""
    (m, h), e = x.shape, router_weight.shape[0]
    if e % n_group:
        raise ValueError(f"{e} experts do not split into n_group={n_group} groups")
    assert router_weight.shape[1] == h and router_weight.stride(-1) == 1
    weights = torch.empty((m, top_k), dtype=torch.float32, device=x.device)
    ids = torch.empty((m, top_k), dtype=torch.int64, device=x.device)
    if not m:
        return weights, ids
    block_e = triton.next_power_of_2(e)
    block_h = max(16, min(triton.next_power_of_2(h), ROUTER_TILE // block_e))
    s = triton.cdiv(h, block_h)
    partials = torch.empty((m, s, block_e), dtype=torch.float32, device=x.device)
    _router_topk_kernel[(m, s)](
        x, router_weight, partials, counters, bias if bias is not None else x,
        weights, ids, e, h, s, x.stride(0), router_weight.stride(0), float(scale),
        TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, HAS_BIAS=bias is not None,
        NORM=norm, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_G=triton.next_power_of_2(n_group), CUDA_MATH=x.is_cuda, BLOCK_H=block_h,
        BLOCK_S=max(1, min(triton.next_power_of_2(s), 4096 // block_e)), num_warps=4,
        **launch_args(x.device),
    )  # fmt: skip
    return weights, ids


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, w_ptr, ids_ptr, E, stride_l,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, CUDA_MATH: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Token m: its TOP_K largest logits by repeated arg-max (ties to the lower expert id),
    largest first, and their softmax in float32. Past its finite logits a token takes the
    lowest experts not yet taken, so its ids stay distinct."""
    pdl_start(PDL)  # see kernels.dependent_launch
    m = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + m * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    free = (e < E).to(tl.int32)  # experts not yet taken
    k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    top = tl.full([BLOCK_K], float("-inf"), tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(x, 0)
        pick = tl.where(best > float("-inf"), tl.argmax(x, 0), tl.argmax(free, 0))
        ids = tl.where(k == j, pick.to(tl.int64), ids)
        top = tl.where(k == j, best, top)
        x = tl.where(e == pick, float("-inf"), x)
        free = tl.where(e == pick, 0, free)
    top = top - tl.max(top, 0)  # the first is the largest: 0 there, padding lanes -inf
    if CUDA_MATH:  # torch's float32 softmax: expf, an IEEE division
        p = libdevice.exp(top)
        w = tl.div_rn(p, tl.zeros_like(p) + tl.sum(p, 0))
    else:  # the interpreter's numpy maths
        p = tl.exp(top)
        w = p / tl.sum(p, 0)
    tl.store(w_ptr + m * TOP_K + k, w, mask=k < TOP_K)
    tl.store(ids_ptr + m * TOP_K + k, ids, mask=k < TOP_K)


def topk_softmax_triton(
    router_logits: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [M, E] (float32 or 16-bit) -> (weights [M, K] float32, ids [M, K] int64);
    same contract as ``routing.topk_softmax``. float64 logits take that PyTorch version: their
    ranking would not survive float32."""
    m, e = router_logits.shape
    if not 0 < top_k <= e:
        raise ValueError(f"top_k {top_k} must be in [1, {e}] experts")
    if router_logits.dtype == torch.float64:
        return topk_softmax(router_logits, top_k)
    assert router_logits.stride(-1) == 1
    weights = torch.empty((m, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((m, top_k), dtype=torch.int64, device=router_logits.device)
    if m:
        _topk_softmax_kernel[(m,)](
            router_logits, weights, ids, e, router_logits.stride(0), TOP_K=top_k,
            BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
            CUDA_MATH=router_logits.is_cuda, num_warps=1, **launch_args(router_logits.device),
        )  # fmt: skip
    return weights, ids
