"""PyTorch GQA attention with sinks and sliding windows: the CPU path and the kernels' oracle.

Decode (paged)::

    out = gqa_decode(q, kv_cache, block_table, seq_lens, sinks, scale, window)

    q            [B, H, D]        this rank's query heads
    kv_cache     [N, bs, KVH*2*D] one layer's paged cache, or a column range of it (a view whose
                                  rows are longer than its width): per KV head, its key (D
                                  values) then its value (D); query head h reads KV head
                                  h // (H // KVH)
    block_table  [B, max_blocks]  int32 block ids; entries past a sequence's length are ignored
    seq_lens     [B]              int32 context length of each sequence (the new token included)
    sinks        [H] or None      one logit per head, added to the softmax's denominator only
    window       int              0: every earlier token; W: the last W tokens (itself included)
    out          [B, H, D]        q's dtype

Prefill (causal, variable length)::

    out = gqa_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                      sinks, window)

    q [Tq, H, D]   k, v [Tk, KVH, D]   cu_seqlens_* [S + 1] int32
    Sequence s owns queries cu_q[s]:cu_q[s+1] and keys cu_k[s]:cu_k[s+1]; its queries are the
    last q_len positions of its keys, so query i at position p = k_len - q_len + i sees keys j
    with j <= p (and p - j < window when window > 0).

With sinks, out = sum_j e^(s_j - m) v_j / (sum_j e^(s_j - m) + e^(sink - m)): transformers'
GPT-OSS attention (the sink logit joins the softmax and is dropped).
"""

from __future__ import annotations

import torch


def _attend(
    q: torch.Tensor,  # [n, H, D] accumulation dtype
    k: torch.Tensor,  # [m, H, D]
    v: torch.Tensor,  # [m, H, D]
    qpos: torch.Tensor,  # [n] positions of the queries among the keys
    sinks: torch.Tensor | None,
    scale: float,
    window: int,
) -> torch.Tensor:  # [n, H, D]
    scores = torch.einsum("nhd,mhd->hnm", q, k) * scale  # [H, n, m]
    kpos = torch.arange(k.shape[0], device=q.device)[None, :]
    hidden = kpos > qpos[:, None]
    if window:
        hidden |= kpos <= qpos[:, None] - window
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype)[:, None, None].expand(-1, scores.shape[1], 1)  # [H, n, 1]
        scores = torch.cat((scores, sink), dim=-1)
    p = torch.softmax(scores, dim=-1)[..., : k.shape[0]]
    return torch.einsum("hnm,mhd->nhd", p, v)


def _expand(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """[m, KVH, D] -> [m, H, D]: each query head's KV head."""
    kvh = kv.shape[1]
    assert heads % kvh == 0, (heads, kvh)
    return kv.repeat_interleave(heads // kvh, dim=1)


def gqa_decode_torch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor | None,
    scale: float,
    window: int,
) -> torch.Tensor:
    b, h, d = q.shape
    bs = kv_cache.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:  # a padding row: nothing to attend to
            out[i] = 0
            continue
        blocks = block_table[i, : -(-n // bs)].long()
        rows = kv_cache[blocks].reshape(-1, kv_cache.shape[-1])[:n].to(acc)  # [n, KVH*2*D]
        kv = rows.view(n, -1, 2, d)  # [n, KVH, 2, D]
        k, v = _expand(kv[:, :, 0], h), _expand(kv[:, :, 1], h)
        qpos = torch.tensor([n - 1], device=q.device)
        out[i] = _attend(q[i : i + 1].to(acc), k, v, qpos, sinks, scale, window)[0].to(q.dtype)
    return out


def gqa_prefill_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    sinks: torch.Tensor | None,
    window: int,
) -> torch.Tensor:
    h = q.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        qs = q[cq[s] : cq[s + 1]].to(acc)  # [n, H, D]
        ks = _expand(k[ck[s] : ck[s + 1]].to(acc), h)  # [m, H, D]
        vs = _expand(v[ck[s] : ck[s + 1]].to(acc), h)
        n, m = qs.shape[0], ks.shape[0]
        qpos = torch.arange(n, device=q.device) + (m - n)
        out[cq[s] : cq[s + 1]] = _attend(qs, ks, vs, qpos, sinks, scale, window).to(q.dtype)
    return out
