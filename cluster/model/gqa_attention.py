"""Grouped-query attention with learned sinks and optional sliding window (GPT-OSS), over a
paged K/V cache.

Each token's cache row holds, per KV head, its rotated key then its value: [KVH, 2, D]. Query
heads are split over tensor-parallel ranks; the KV heads are not: every rank projects and
caches all of them, so any rank's cache is the whole cache (as MLA's latent is) and the KV
transports and unequal TP groups need nothing per family. A rank's attention reads the
contiguous column range of its own query heads' KV heads (``kv_cols``). Sinks add one logit per
head to the softmax's denominator; a sliding layer's query sees the last ``window`` tokens, and
reads and writes its own block tables (``AttentionMetadata.window``, ``kv_groups``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.model.attention_metadata import AttentionMetadata
from pdserve.cluster.model.layers import Linear, Loadable, _copy, _empty
from pdserve.cluster.model.rope import RotaryEmbedding
from pdserve.cluster.parallel import TensorParallel
from pdserve.kernels import KernelSet


class GQAAttention(Loadable):
    expected = ("sinks",)  # the projections are modules of their own

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        *,
        rope: RotaryEmbedding,
        kernels: KernelSet,
        dtype: torch.dtype,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.rope, self.kernels, self.tp = rope, kernels, tp
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.heads = tp.split(heads, "num_attention_heads")  # this rank's query heads
        self.kv_heads, self.head_dim = kv_heads, d
        self.window, self.scale = cfg.window(layer), cfg.softmax_scale
        group = heads // kv_heads  # query heads per KV head
        if self.heads % group and group % self.heads:
            raise ValueError(
                f"{self.heads} query heads per rank split KV groups of {group} unevenly"
            )
        first = tp.rank * self.heads // group  # this rank's first KV head
        self.kv_cols = slice(first * 2 * d, (first + max(1, self.heads // group)) * 2 * d)
        bias, h = cfg.attention_bias, cfg.hidden_size
        kw = dict(bias=bias, dtype=dtype, tp=tp, linear=kernels.linear)
        self.q_proj = Linear(h, heads * d, mode="column", **kw)
        self.k_proj = Linear(h, kv_heads * d, **kw)
        self.v_proj = Linear(h, kv_heads * d, **kw)
        self.o_proj = Linear(heads * d, h, mode="row", **kw)
        self.sinks = _empty(self.heads, dtype=torch.float32)  # this rank's heads' logits

    def post_load(self) -> None:
        """q, k and v projected by one GEMM: their weights (and biases) stacked in one matrix,
        each layer's own parameter then a view of its rows (no second copy). The model is
        built on its device: a later ``.to()`` would move the views and the stack apart."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        rows = [p.weight.shape[0] for p in projs]
        for name in ("weight", "bias"):
            parts = [getattr(p, name) for p in projs]
            if parts[0] is None:
                self.qkv_bias = None
                continue
            fused = torch.cat([t.data for t in parts])  # [(Hl + 2 KVH) * D, ...]
            for t, view in zip(parts, fused.split(rows)):
                t.data = view
            self.register_buffer(f"qkv_{name}", fused, persistent=False)
        self.qkv_rows = rows

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name != "sinks":
            raise ValueError(f"unexpected attention tensor {name!r}")
        r, n = self.tp.rank, self.heads
        _copy(self.sinks.data, tensor[r * n : (r + 1) * n], name)
        self.mark_loaded(name)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        kv_cache: torch.Tensor,  # [num_blocks, block_size, KVH * 2 * D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], a partial sum under tensor parallelism
        t, d = x.shape[0], self.head_dim
        if self.window:  # the sliding layers' tables: their own, since slots are shared
            assert meta.window is not None, "a sliding layer needs the sliding tables' metadata"
            meta = meta.window
        assert hasattr(self, "qkv_rows"), "post_load stacks q/k/v once the weights are loaded"
        # cuBLAS: op linear ran gpt-oss-20b's qkv 6-7% slower (BENCHMARKS.md, "Dense
        # projections of a decode step"); its o_proj takes the op
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # [T, (Hl + 2 KVH) * D]
        q, k, v = qkv.split(self.qkv_rows, dim=-1)
        q = self.rope(positions, q.view(t, self.heads, d))  # [T, Hl, D]
        k = self.rope(positions, k.view(t, self.kv_heads, d))  # [T, KVH, D]
        v = v.view(t, self.kv_heads, d)
        cache_rows = kv_cache.view(-1, kv_cache.shape[-1])  # [slots, KVH * 2 * D]
        cache_rows.index_copy_(0, meta.slot_mapping, torch.stack((k, v), dim=2).view(t, -1))
        mine = kv_cache[..., self.kv_cols]  # [N, bs, KVl * 2 * D], a view: this rank's heads

        out = torch.empty_like(q)  # [T, Hl, D]
        nd = meta.num_decode_tokens
        if nd:
            out[:nd] = self.kernels.gqa_decode(
                q[:nd],
                mine,
                meta.decode_block_table,
                meta.decode_seq_lens,
                self.sinks,
                self.scale,
                self.window,
            )
        if nd < t:
            ctx = cache_rows[:, self.kv_cols][meta.prefill_ctx_slots]  # [Tk, KVl * 2 * D]
            ctx = ctx.view(ctx.shape[0], -1, 2, d)  # [Tk, KVl, 2, D]
            out[nd:] = self.kernels.gqa_prefill(
                q[nd:],
                ctx[:, :, 0],
                ctx[:, :, 1],
                meta.prefill_cu_seqlens_q,
                meta.prefill_cu_seqlens_k,
                meta.prefill_max_q,
                meta.prefill_max_k,
                self.scale,
                self.sinks,
                self.window,
            )
        return self.o_proj(out.view(t, self.heads * d))
