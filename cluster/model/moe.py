"""DeepSeek-V3 MoE block: sigmoid router with group-limited top-k, MXFP4 routed experts, shared
experts. Under tensor parallelism every expert's intermediate dim is split over ranks, so each
rank returns a partial sum and the decoder layer all-reduces once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.model.layers import DenseMLP, Loadable, _copy, _empty
from pdserve.cluster.model.side_stream import beside
from pdserve.cluster.parallel import TensorParallel
from pdserve.kernels import KernelSet, MoeWeights, PreparedMoe, SwiGLU
from pdserve.kernels.moe_reference import scales_fit_one_mul
from pdserve.kernels.mxfp4 import (
    BLOCK,
    interleave_mxfp4,
    pack_fp4,
    quantize_mxfp4,
    unpack_fp4,
)
from pdserve.kernels.routing import FUSED_MAX_TOKENS

_PROJ = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}

# one token's router scores from the float32 GEMV where the weight is larger than this (see
# ``Router.scores``; BENCHMARKS.md, "A layer's branches side by side")
ONE_TOKEN_MATMUL_BYTES = 1 << 20
# a router weight of at most this size has its scores computed in routing's own launch, for up
# to ``routing.FUSED_MAX_TOKENS`` tokens (``grouped_topk``'s ``router_weight``;
# ``Router.fused_weight``)
FUSED_ROUTER_BYTES = 1 << 20


class Router(Loadable):
    """Scores in float32, as transformers does; the correction bias only steers selection.

    ``weight`` is kept in the scores' dtype (float32 at least) so a step does not cast it
    again: its values are the model dtype's, as transformers casts them per call. On a GPU a
    16-bit weight is also kept as loaded (``weight16``; the model is built on its device and
    never moved) for ``scores``' one matmul."""

    expected = ("weight",)
    weight16: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype)
        # absent from checkpoints without aux-loss-free balancing: zeros then
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name == "weight":
            _copy(self.weight.data, tensor, name)
        elif name == "e_score_correction_bias":
            _copy(self.e_score_correction_bias, tensor, name)
        else:
            raise ValueError(f"unexpected router tensor {name!r}")
        self.mark_loaded(name)

    def post_load(self) -> None:
        w = self.weight.data
        if w.is_cuda and w.element_size() == 2:
            self.weight16 = w
        self.weight.data = w.to(torch.promote_types(w.dtype, torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, E] float32 at least
        """x @ W^T in float32. On a GPU, 16-bit x and W go to one matmul with float32 output
        and no cast of x: the products are exact in float32 and the sums float32's, though the
        tensor cores' accumulation is not float32 rounding at every add, so scores differ from
        the float32 GEMV's at float32's error level (a near-tie may route another way). Not for
        one token and a weight over ``ONE_TOKEN_MATMUL_BYTES``: there the float32 GEMV made
        the shorter decode steps."""
        if self._one_matmul(x):
            return torch.mm(x, self.weight16.t(), out_dtype=torch.float32)
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dt), self.weight.to(dt))

    def fused_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The 16-bit weight for ``grouped_topk`` to take the scores of ``x`` in its own
        launch: on a GPU, for x of its dtype, up to ``FUSED_MAX_TOKENS`` tokens and a weight
        of at most ``FUSED_ROUTER_BYTES``; else None (``scores`` first)."""
        w = self.weight16
        if w is None or x.dtype != w.dtype or x.shape[0] > FUSED_MAX_TOKENS:
            return None
        return w if w.numel() * w.element_size() <= FUSED_ROUTER_BYTES else None

    def _one_matmul(self, x: torch.Tensor) -> bool:
        w = self.weight16  # set on a GPU only, where x is too
        if w is None or x.dtype != w.dtype:
            return False
        return x.shape[0] > 1 or w.numel() * w.element_size() <= ONE_TOKEN_MATMUL_BYTES


class MXFP4Experts(Loadable):
    """Routed experts of one layer, this rank's intermediate shard, stored as MXFP4.

    A shard that does not start and end on 32-element blocks (GPT-OSS's 2880 over 4 ranks:
    720) is held in the whole blocks around it (``lo`` to ``lo + inter``): the elements
    outside it, other ranks', are zeros (their gate/up rows give zero activations, their down
    columns add nothing), and every value keeps its checkpoint block and scale.

    GPT-OSS's (``cfg.is_gqa``) have biases and its fused tensors' layouts: transformers'
    ``gate_up_proj`` [E, H, 2I] with gate/up columns interleaved and ``down_proj`` [E, I, H];
    DeepSeek's fused ones are [E, 2I, H] (gate half first) and [E, H, I]."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        e, h, full = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.tp, self.gpt_oss = tp, cfg.is_gqa
        own = tp.split(full, "moe_intermediate_size")
        if h % BLOCK or full % BLOCK:
            raise ValueError(
                f"MXFP4 experts need hidden ({h}) and expert intermediate ({full}) sizes that "
                f"are multiples of {BLOCK}"
            )
        start, end = tp.rank * own, (tp.rank + 1) * own
        self.lo = start // BLOCK * BLOCK
        self.inter = i = -(-end // BLOCK) * BLOCK - self.lo  # held: whole blocks
        local = torch.arange(i, device="cpu") + self.lo
        foreign = ((local < start) | (local >= end)).nonzero().squeeze(1)
        self.foreign = foreign if foreign.numel() else None  # local ids of others' elements
        u8 = dict(dtype=torch.uint8)
        self.register_buffer("w13", torch.empty(e, 2 * i, h // 2, **u8))  # gate rows, then up
        self.register_buffer("s13", torch.empty(e, 2 * i, h // BLOCK, **u8))
        self.register_buffer("w2", torch.empty(e, h, i // 2, **u8))
        self.register_buffer("s2", torch.empty(e, h, i // BLOCK, **u8))
        self.register_buffer("_have", torch.zeros(e, 3, dtype=torch.bool), persistent=False)
        # GPT-OSS: down's bias is added once, by rank 0; the others hold zeros
        self.register_buffer("b13", torch.empty(e, 2 * i, dtype=dtype) if self.gpt_oss else None)
        self.register_buffer("b2", torch.zeros(e, h, dtype=dtype) if self.gpt_oss else None)
        if self.gpt_oss:
            self.expected = ("gate_up_proj_bias", "down_proj_bias")

    interleaved = False  # codes and scales in the fragment layout (``interleave_codes``)
    small_scales = False  # every scale byte <= 128, found when re-laid out (MoeWeights')

    def weights(self) -> MoeWeights:
        return MoeWeights(
            self.w13,
            self.s13,
            self.w2,
            self.s2,
            self.b13,
            self.b2,
            interleaved=self.interleaved,
            small_scales=self.small_scales,
        )

    def prepare(self, kernels: KernelSet) -> PreparedMoe:
        """The loaded experts in the layouts of ``kernels``' MoE backends: codes and scales
        re-laid out in place first where they read the fragment layout and the shapes fit it
        (the Triton kernels read plain codes too)."""
        if kernels.moe_codes == "interleaved" and self.weights().interleavable():
            self.interleave_codes()
        return kernels.prepare_moe(self.weights())

    def interleave_codes(self) -> None:
        """Re-lay the loaded codes and scales out in place in the fragment layout
        (``mxfp4.interleave_mxfp4``), for MoE backends that read it; once only."""
        if self.interleaved:
            return
        if not self.weights().interleavable():  # checked first: never half re-laid out
            raise ValueError(
                f"experts of {tuple(self.w13.shape)} / {tuple(self.w2.shape)} codes do not fit "
                "the fragment layout's 16 x 64 grid"
            )
        interleave_mxfp4(self.w13, self.s13)
        interleave_mxfp4(self.w2, self.s2)
        self.interleaved = True
        self.small_scales = scales_fit_one_mul(self.s13, self.s2)

    def missing_weights(self) -> list[str]:
        missing = (~self._have).nonzero().tolist()
        names = [f"{e}.{list(_PROJ)[p]}.weight" for e, p in missing[:8]]
        for proj in ("gate_up_proj", "down_proj"):  # the released layout: codes and scales
            pair = {f"{proj}_blocks", f"{proj}_scales"}
            if len(pair & self._loaded) == 1:
                names += sorted(pair - self._loaded)
        return names + super().missing_weights()

    def _mine(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The held range of intermediate dim ``dim`` of ``t``, others' elements zeroed."""
        part = t.narrow(dim, self.lo, self.inter)
        if self.foreign is None:
            return part
        return part.index_fill(dim, self.foreign.to(part.device), 0)

    def _down(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A float down projection [H, I] as this rank's MXFP4 (codes [H, inter / 2], scales):
        the held blocks quantized whole, as at TP=1 (a block's scale is that of all its
        elements), then others' codes zeroed."""
        codes, scales = quantize_mxfp4(w.narrow(1, self.lo, self.inter))
        if self.foreign is not None:
            codes = pack_fp4(unpack_fp4(codes).index_fill(1, self.foreign.to(w.device), 0))
        return codes, scales

    def _gate_up(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """[..., 2 * inter, ...] of this rank's gate rows then up rows, from whole [..., I, ...]
        halves whose intermediate dim is 1."""
        return torch.cat((self._mine(gate, 1), self._mine(up, 1)), dim=1)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        i = self.inter
        if name.endswith(("_blocks", "_scales")):
            self.mark_loaded(name)
        parts = name.split(".")
        if len(parts) == 3 and parts[0].isdigit() and parts[1] in _PROJ and parts[2] == "weight":
            e, proj = int(parts[0]), _PROJ[parts[1]]  # per-expert tensors, as on the hub
            if proj == 2:  # down [H, I]
                self.w2[e], self.s2[e] = self._down(tensor)
            else:  # gate / up [I, H]
                dst = slice(proj * i, (proj + 1) * i)
                self.w13[e, dst], self.s13[e, dst] = quantize_mxfp4(self._mine(tensor, 0))
            self._have[e, proj] = True
        elif self.gpt_oss and name in ("gate_up_proj", "down_proj", "gate_up_proj_bias"):
            self._load_gpt_oss(name, tensor)
        elif self.gpt_oss and name == "down_proj_bias":  # [E, H]
            if self.tp.rank == 0:
                _copy(self.b2, tensor, name)
            self.mark_loaded(name)
        elif name == "gate_up_proj":  # transformers >= 5 fused: [E, 2I, H], gate half first
            full = tensor.shape[1] // 2
            gate_up = self._gate_up(tensor[:, :full], tensor[:, full:])  # [E, 2i, H]
            for e in range(tensor.shape[0]):
                self.w13[e], self.s13[e] = quantize_mxfp4(gate_up[e])
            self._have[:, :2] = True
        elif name == "down_proj":  # [E, H, I]
            for e in range(tensor.shape[0]):
                self.w2[e], self.s2[e] = self._down(tensor[e])
            self._have[:, 2] = True
        elif name in ("gate_up_proj_blocks", "gate_up_proj_scales"):
            # GPT-OSS layout: rows interleaved (2j gate j, 2j+1 up j); blocks [E, 2I, K/32, 16]
            t = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
            gate_up = self._gate_up(t[:, 0::2], t[:, 1::2])  # zero codes: zero values
            _copy(self.w13 if name.endswith("blocks") else self.s13, gate_up, name)
            self._have[:, :2] = True
        elif name == "down_proj_blocks":  # [E, H, I/32, 16]: two codes a byte
            held = tensor.reshape(*tensor.shape[:2], -1).narrow(2, self.lo // 2, i // 2)
            if self.foreign is not None:  # others' codes zeroed
                codes = unpack_fp4(held).index_fill(2, self.foreign.to(held.device), 0)
                held = pack_fp4(codes)  # [E, H, i / 2]
            _copy(self.w2, held, name)
            self._have[:, 2] = True
        elif name == "down_proj_scales":  # [E, H, I/32]: the held range is whole blocks
            _copy(self.s2, tensor.narrow(2, self.lo // BLOCK, i // BLOCK), name)
        else:
            raise ValueError(f"unexpected expert tensor {name!r}")

    def _load_gpt_oss(self, name: str, tensor: torch.Tensor) -> None:
        """transformers' GPT-OSS tensors: columns of gate_up interleaved (2j gate j, 2j+1 up
        j), weights stored [in, out]."""
        if name == "gate_up_proj_bias":  # [E, 2I]
            _copy(self.b13, self._gate_up(tensor[:, 0::2], tensor[:, 1::2]), name)
            self.mark_loaded(name)
            return
        if name == "gate_up_proj":  # [E, H, 2I] -> [E, 2i, H]
            t = tensor.transpose(1, 2)
            gate_up = self._gate_up(t[:, 0::2], t[:, 1::2])
            for e in range(tensor.shape[0]):
                self.w13[e], self.s13[e] = quantize_mxfp4(gate_up[e])
        else:  # down_proj [E, I, H]
            for e in range(tensor.shape[0]):
                self.w2[e], self.s2[e] = self._down(tensor[e].T)  # [H, I]
        self._have[:, [0, 1] if name == "gate_up_proj" else [2]] = True


class MoEBlock(nn.Module):
    def __init__(
        self, cfg: ModelConfig, *, kernels: KernelSet, dtype: torch.dtype, tp: TensorParallel
    ) -> None:
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        self.act = SwiGLU()
        self.gate = Router(cfg, dtype)
        self.experts = MXFP4Experts(cfg, tp, dtype)
        self.shared_experts = (
            DenseMLP(
                cfg.hidden_size,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
                dtype=dtype,
                tp=tp,
                fp8=(cfg.fp8_block, kernels) if cfg.fp8_block else None,
                act=kernels.silu_mul,
                linear=kernels.linear,
            )
            if cfg.n_shared_experts
            else None
        )
        self.prepared = None  # the experts in each MoE backend's layout, set by post_load

    def post_load(self) -> None:
        self.prepared = self.experts.prepare(self.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H] partial sum
        if self.shared_experts is None:
            return self.routed(x)
        # the shared experts beside the router and the routed experts, in a captured graph
        shared, y = beside(lambda: self.shared_experts(x), lambda: self.routed(x), like=x)
        return y + shared

    def routed(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        topk_weights, topk_ids = self.route(x)
        return self.kernels.moe(x, self.prepared, topk_ids, topk_weights, self.act)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts: (weights [T, K] float32, ids [T, K])."""
        cfg = self.cfg
        w = self.gate.fused_weight(x)
        return self.kernels.grouped_topk(
            x if w is not None else self.gate.scores(x),  # [T, H] with the weight, or [T, E]
            cfg.num_experts_per_tok,
            router_weight=w,
            correction_bias=self.gate.e_score_correction_bias,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
