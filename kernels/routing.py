"""MoE routing (PyTorch): DeepSeek-V3's group-limited top-k over sigmoid scores; GPT-OSS's
softmax over each token's top-k logits."""

from __future__ import annotations

import torch

# the most tokens whose router scores a grouped_topk backend may take in its own launch (the
# Triton kernel's arrival counts); callers pass ``router_weight`` for at most this many
FUSED_MAX_TOKENS = 64


def router_scores(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """x [M, H] @ router_weight [E, H]^T in float32 at least (as transformers computes them)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return x.to(dt) @ router_weight.to(dt).t()


def grouped_topk(
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
    """router_logits [M, E] -> (weights [M, K] float32 (float64 for float64), ids [M, K] int64).

    Scores are ``sigmoid(logits)``; the correction bias is added for *selection only*. Experts
    are split into ``n_group`` groups, each group ranked by the sum of its two best biased
    scores, and only experts of the best ``topk_group`` groups compete for the top-k. Weights
    are the unbiased scores, optionally normalized to sum to one, times the scaling factor.

    Given ``router_weight`` [E, H], the first argument is the hidden states [M, H] and the
    logits their products with it, in float32 at least (as transformers computes them).
    """
    if router_weight is not None:
        router_logits = router_scores(router_logits, router_weight)
    m, e = router_logits.shape
    if e % n_group:
        raise ValueError(f"{e} experts do not split into n_group={n_group} groups")
    # float32 at least, as transformers computes it; float64 stays float64
    dt = torch.promote_types(router_logits.dtype, torch.float32)
    scores = router_logits.to(dt).sigmoid()  # [M, E]
    choice = scores if correction_bias is None else scores + correction_bias.to(dt)
    if n_group > 1 and topk_group < n_group:
        per_group = e // n_group
        group_scores = choice.view(m, n_group, per_group).topk(min(2, per_group), dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]  # [M, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)  # [M, G]
        expert_mask = group_mask.unsqueeze(-1).expand(m, n_group, per_group).reshape(m, e)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False)[1]  # [M, K]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [M, E] -> (weights [M, K] float32, ids [M, K] int64): each token's top-k
    logits, largest first, and their softmax in float32, as transformers' GPT-OSS router
    computes them."""
    top, ids = torch.topk(router_logits, top_k, dim=-1)  # [M, K]
    return torch.softmax(top.float(), dim=-1), ids
