"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent cache.

Every token's normalized latent c_kv and rotated rope key k_pe are written to the cache as one
row of width kv_lora_rank + rope_dim. Decode absorbs the key up-projection into the query
(q_lat = W_UK^T q_nope) and runs MQA over cache rows, then applies W_UV to the latent output.
Prefill gathers each sequence's cached rows, up-projects them to per-head keys and values, and
runs causal attention. Heads are split over tensor-parallel ranks; the latent is replicated.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.model.attention_metadata import AttentionMetadata
from pdserve.cluster.model.layers import Linear, RMSNorm
from pdserve.cluster.model.rope import RotaryEmbedding
from pdserve.cluster.model.side_stream import beside
from pdserve.cluster.model.stacked_linear import StackedLinear
from pdserve.cluster.parallel import TensorParallel
from pdserve.kernels import KernelSet

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm with the default eps


class MLAAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rope: RotaryEmbedding,
        kernels: KernelSet,
        dtype: torch.dtype,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.cfg, self.rope, self.kernels = cfg, rope, kernels
        self.heads = tp.split(cfg.num_attention_heads, "num_attention_heads")
        self.nope, self.rope_dim, self.v_dim = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        self.rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        h, qk = cfg.hidden_size, cfg.qk_head_dim
        n = cfg.num_attention_heads
        kw = dict(dtype=dtype, tp=tp, linear=kernels.linear)
        # FP8 checkpoints: the projections keep their FP8 weights; kv_b_proj is dequantized,
        # as absorbed decode reads its weight as W_UK and W_UV
        fp8 = dict(kw, fp8=(cfg.fp8_block, kernels) if cfg.fp8_block else None)
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(h, n * qk, mode="column", **fp8)
            self.kv_a_proj_with_mqa = Linear(
                h, self.rank + self.rope_dim, bias=cfg.attention_bias, **fp8
            )
        else:  # q_a_proj and kv_a_proj_with_mqa: replicated, one input, one matmul
            kv_a = self.rank + self.rope_dim
            parts = (("q_a_proj", cfg.q_lora_rank), ("kv_a_proj_with_mqa", kv_a))
            self.qkv_a = StackedLinear(
                h, parts, dtype=dtype, bias=cfg.attention_bias, fp8=fp8.get("fp8"),
                linear=kernels.linear,
            )  # fmt: skip
            self.q_a_layernorm = RMSNorm(
                cfg.q_lora_rank, LATENT_NORM_EPS, dtype, kernel=kernels.rms_norm
            )
            self.q_b_proj = Linear(cfg.q_lora_rank, n * qk, mode="column", **fp8)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS, dtype, kernel=kernels.rms_norm)
        self.kv_b_proj = Linear(self.rank, n * (self.nope + self.v_dim), mode="column", **kw)
        self.o_proj = Linear(n * self.v_dim, h, mode="row", bias=cfg.attention_bias, **fp8)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """The checkpoint's q_a_proj and kv_a_proj_with_mqa tensors, which no module of that
        name holds here: into their rows of ``qkv_a``."""
        if not hasattr(self, "qkv_a") or name.split(".", 1)[0] not in self.qkv_a.rows:
            raise ValueError(f"unexpected attention tensor {name!r}")
        self.qkv_a.load_weight(name, tensor)

    def fp8_names(self) -> tuple[str, ...]:
        """The projections whose stored FP8 weight and scales ``qkv_a`` takes as they are."""
        return self.qkv_a.fp8_parts() if hasattr(self, "qkv_a") else ()

    def post_load(self) -> None:
        """Without a query latent (DeepSeek-V2-Lite), kv_a_proj_with_mqa and q_proj read the
        same input: their dense weights stacked in one matrix (this rank's query rows under
        the whole latent's), each layer's parameter then a view of its rows (no second copy),
        so one GEMM projects both. FP8 weights or biases keep two. The model is built on its
        device: a later ``.to()`` would move the views and the stack apart."""
        if self.cfg.q_lora_rank is not None:
            return
        projs = (self.kv_a_proj_with_mqa, self.q_proj)
        if any(p.takes_fp8 or p.bias is not None for p in projs):
            return
        fused = torch.cat([p.weight.data for p in projs])  # [r + rope + Hl * qk, hidden]
        for p, view in zip(projs, fused.split([p.weight.shape[0] for p in projs])):
            p.weight.data = view
        self.register_buffer("kv_a_q_weight", fused, persistent=False)

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, r] and W_UV [H, v, r]: views of kv_b_proj's weight, no copies."""
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        kv_cache: torch.Tensor,  # [num_blocks, block_size, r + rope]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], a partial sum under tensor parallelism
        t = x.shape[0]
        if hasattr(self, "kv_a_q_weight"):  # views of one [T, r + rope + Hl * qk] product
            ckv, q = self.kernels.linear(x, self.kv_a_q_weight).split(
                (self.rank + self.rope_dim, self.q_proj.weight.shape[0]), 1
            )
        elif self.cfg.q_lora_rank is None:  # two GEMMs of one input, side by side in a graph
            ckv, q = beside(lambda: self.kv_a_proj_with_mqa(x), lambda: self.q_proj(x), like=x)
        else:  # views of one [T, q_lora + r + rope] product
            q_lat, ckv = self.qkv_a(x).split((self.cfg.q_lora_rank, self.rank + self.rope_dim), 1)
            q = self.q_b_proj(self.q_a_layernorm(q_lat))
        q = q.view(t, self.heads, self.nope + self.rope_dim)
        if meta.num_decode_tokens == t:  # a decode step
            out = self._decode(positions, q, ckv, kv_cache, meta)
        else:
            out = self._mixed(positions, q, ckv, kv_cache, meta)
        return self.o_proj(out.view(t, self.heads * self.v_dim))

    def _write(self, positions, q_pe, ckv, kv_cache, meta, out=None) -> torch.Tensor:
        """q's rope part rotated (into ``out`` when given); each token's cache row set to
        (norm(latent), rotated k_pe). [T, H, rope]."""
        norm, rope = self.kv_a_layernorm, self.rope
        cache_rows = kv_cache.view(-1, self.rank + self.rope_dim)
        return self.kernels.mla_kv_write(
            positions, q_pe, ckv, norm.weight, norm.eps, rope.cos, rope.sin, rope.interleave,
            cache_rows, meta.slot_mapping, out=out,
        )  # fmt: skip

    def _decode(self, positions, q, ckv, kv_cache, meta) -> torch.Tensor:  # [T, H, v]
        """A decode step: the query's latent part (W_UK^T q_nope) and its rotated rope part are
        written straight into one [T, H, r + rope] buffer, the first beside the cache write in
        a graph."""
        r, nope = self.rank, self.nope
        q_full = q.new_empty(q.shape[0], self.heads, r + self.rope_dim)
        beside(
            lambda: self._write(positions, q[..., nope:], ckv, kv_cache, meta, q_full[..., r:]),
            lambda: self._absorb(q[..., :nope], q_full[..., :r]),
            like=q,
        )
        return self._attend(q_full, kv_cache, meta)

    def _mixed(self, positions, q, ckv, kv_cache, meta) -> torch.Tensor:  # [T, H, v]
        """A step with prefill tokens: its first ``num_decode_tokens`` decode, the rest prefill."""
        q_pe = self._write(positions, q[..., self.nope :], ckv, kv_cache, meta)  # [T, H, rope]
        t, nd, r = q.shape[0], meta.num_decode_tokens, self.rank
        out = q.new_empty(t, self.heads, self.v_dim)
        if nd:
            q_full = q.new_empty(nd, self.heads, r + self.rope_dim)
            self._absorb(q[:nd, :, : self.nope], q_full[..., :r])
            q_full[..., r:] = q_pe[:nd]
            out[:nd] = self._attend(q_full, kv_cache, meta)
        cache_rows = kv_cache.view(-1, r + self.rope_dim)
        out[nd:] = self._prefill(q[nd:, :, : self.nope], q_pe[nd:], cache_rows, meta)
        return out

    def _absorb(self, q_nope: torch.Tensor, into: torch.Tensor) -> None:
        """into [Td, H, r] (a strided view) = W_UK^T q_nope [Td, H, nope], per head."""
        w_uk = self.absorbed()[0]  # [H, nope, r]
        torch.bmm(q_nope.transpose(0, 1), w_uk, out=into.transpose(0, 1))  # [H, Td, r]

    def _attend(self, q_full, kv_cache, meta) -> torch.Tensor:  # [Td, H, r + rope] -> [Td, H, v]
        """MQA of the absorbed queries over the cache rows; W_UV writes straight into the
        output."""
        o_lat = self.kernels.mla_decode(
            q_full, kv_cache, meta.decode_block_table, meta.decode_seq_lens, self.scale, self.rank
        )  # [Td, H, r]
        out = q_full.new_empty(q_full.shape[0], self.heads, self.v_dim)
        w_uv = self.absorbed()[1]  # [H, v, r]
        torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return out

    def _prefill(self, q_nope, q_pe, cache_rows, meta) -> torch.Tensor:
        ctx = cache_rows[meta.prefill_ctx_slots]  # [Tk, r + rope]
        kv = self.kv_b_proj(ctx[:, : self.rank]).view(-1, self.heads, self.nope + self.v_dim)
        k_pe = ctx[:, None, self.rank :].expand(-1, self.heads, -1)  # [Tk, H, rope]
        k = torch.cat((kv[..., : self.nope], k_pe), dim=-1)  # [Tk, H, qk]
        v = kv[..., self.nope :].contiguous()  # [Tk, H, v]
        q = torch.cat((q_nope, q_pe), dim=-1)  # [Tp, H, qk]
        return self.kernels.mla_prefill(
            q,
            k,
            v,
            meta.prefill_cu_seqlens_q,
            meta.prefill_cu_seqlens_k,
            meta.prefill_max_q,
            meta.prefill_max_k,
            self.scale,
        )
