"""PyTorch MLA attention: the CPU path and the oracle for the Triton kernels.

Decode (absorbed, MQA over the latent)::

    out = mla_decode(q, kv_cache, block_table, seq_lens, scale, v_dim)

    q            [B, H, D]        D = kv_lora_rank + rope dim (576 for DeepSeek-V3): the query
                                  in the latent space (q_nope @ W_UK), then the rotated rope part
    kv_cache     [N, bs, D]       one layer's paged cache: normalized latent, then rotated rope key
    block_table  [B, max_blocks]  int32 block ids; entries past a sequence's length are ignored
    seq_lens     [B]              int32 context length of each sequence (the new token included)
    out          [B, H, v_dim]    q's dtype; V is the first v_dim columns of each cache row

Prefill (up-projected, causal, variable length)::

    out = mla_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)

    q  [Tq, H, Dqk]   k [Tk, H, Dqk]   v [Tk, H, Dv]   cu_seqlens_* [S + 1] int32
    Sequence s owns queries cu_q[s]:cu_q[s+1] and keys cu_k[s]:cu_k[s+1]; its queries are the last
    q_len positions of its keys (a chunk after a cached prefix), so query i sees keys
    0 .. k_len - q_len + i.
"""

from __future__ import annotations

import torch


def mla_decode_torch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    v_dim: int,
) -> torch.Tensor:
    b, h, d = q.shape
    block_size = kv_cache.shape[1]
    out = torch.empty(b, h, v_dim, dtype=q.dtype, device=q.device)
    acc = torch.promote_types(q.dtype, torch.float32)
    for i, n in enumerate(seq_lens.tolist()):
        nblocks = -(-n // block_size)
        kv = kv_cache[block_table[i, :nblocks].long()].reshape(-1, d)[:n].to(acc)  # [n, D]
        s = (q[i].to(acc) @ kv.T) * scale  # [H, n]
        p = torch.softmax(s, dim=-1)
        out[i] = (p @ kv[:, :v_dim]).to(q.dtype)
    return out


def mla_prefill_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> torch.Tensor:
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    acc = torch.promote_types(q.dtype, torch.float32)
    for s in range(len(cq) - 1):
        qs, ks = q[cq[s] : cq[s + 1]], k[ck[s] : ck[s + 1]]  # [n, H, D], [m, H, D]
        vs = v[ck[s] : ck[s + 1]]
        n, m = qs.shape[0], ks.shape[0]
        scores = torch.einsum("nhd,mhd->hnm", qs.to(acc), ks.to(acc)) * scale  # [H, n, m]
        qpos = torch.arange(n, device=q.device)[:, None] + (m - n)
        kpos = torch.arange(m, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out[cq[s] : cq[s + 1]] = torch.einsum("hnm,mhd->nhd", p, vs.to(acc)).to(q.dtype)
    return out
