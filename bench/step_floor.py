"""The least a step can take on the hardware it runs on, measured in the same run: the floor
``bench.decode_step`` prints each step against.

Decode: the bytes a step must read over the copy bandwidth (a device-to-device copy of 1 GiB on
a GPU, 256 MiB on CPU; bytes read + written, as ``bench.kernels`` counts them):
- weights: every tensor the model reads but the routed experts, the embedding table (a step
  reads B of its rows) and the rope table: attention projections (1 byte per FP8 weight where
  they run FP8), norms, routers, dense MLPs, shared experts, the LM head;
- routed experts: the distinct experts the step's routing picks in each MoE layer, at the bytes
  of one expert (MXFP4 codes and scales); the routing is recomputed from each MoE layer's input
  during one eager step, untimed;
- KV: every request's context, all layers.
Prefill: the FLOPs of a prompt (2 per weight touched per token: the weights above, the top-k
routed and the shared experts, the LM head for the last token only; the causal attention's QK
and PV products, MLA unabsorbed) over
a bf16 matmul of 8192^3 (a GPU) or 1024^3 (CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.model.moe import MoEBlock
from pdserve.kernels import grouped_topk


@dataclass(frozen=True)
class StepBytes:
    weights: int
    experts: int  # of the distinct experts the step's routing hit
    kv: int
    experts_hit: tuple[int, ...]  # per MoE layer

    @property
    def total(self) -> int:
        return self.weights + self.experts + self.kv


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor a step reads whole (see the module's docstring), each once."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for name, t in named:
        if name.startswith("model.embed_tokens.") or ".mlp.experts." in name:
            continue
        if "rotary" in name or name.endswith("._have"):
            continue
        add(t)
    for m in model.modules():  # weights a kernel holds in its own form (FP8 layers)
        if not isinstance(m, MoEBlock):
            for t in _tensors(getattr(m, "prepared", None)):
                add(t)
    return total


def expert_bytes(block: MoEBlock) -> int:
    """Bytes of one routed expert of ``block``: its MXFP4 codes and scales."""
    w = block.experts
    per_layer = sum(t.numel() * t.element_size() for t in (w.w13, w.s13, w.w2, w.s2))
    return per_layer // block.cfg.n_routed_experts


def step_bytes(engine) -> StepBytes:
    """Run one decode step of ``engine``'s running batch eagerly, recording the experts each MoE
    layer's routing picks; returns what that step must read. In-process engines only."""
    runner = engine.runner
    model = runner.model
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    hit: list[int] = []

    def record(block: MoEBlock, args) -> None:
        cfg, x = block.cfg, args[0]
        dt = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dt), block.gate.weight.to(dt))
        _, ids = grouped_topk(
            logits, cfg.num_experts_per_tok, correction_bias=block.gate.e_score_correction_bias,
            n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )  # fmt: skip
        hit.append(int(torch.unique(ids).numel()))

    context = sum(r.num_computed_tokens for r in engine.scheduler.running)
    handles = [b.register_forward_pre_hook(record) for b in blocks]
    graphs, runner.graphs = runner.graphs, None  # hooks run in eager steps only
    try:
        engine.step()
    finally:
        runner.graphs = graphs
        for h in handles:
            h.remove()
    kv = context * engine.model_config.kv_bytes_per_token(runner.dtype)
    experts = sum(n * expert_bytes(b) for n, b in zip(hit, blocks))
    return StepBytes(weight_bytes(model), experts, kv, tuple(hit))


def prefill_flops(cfg: ModelConfig, model: torch.nn.Module, tokens: int) -> float:
    """FLOPs of one prompt of ``tokens`` tokens (see the module's docstring)."""
    seen: set[int] = set()
    params = 0

    def add(t: torch.Tensor) -> None:
        nonlocal params
        if t.dim() == 2 and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            params += t.numel()

    for name, t in model.named_parameters(remove_duplicate=False):
        skip = name.startswith("model.embed_tokens.") or ".mlp.experts." in name
        if not skip and "scale" not in name.rsplit(".", 1)[-1]:  # matrices, not block scales
            add(t)
    for m in model.modules():  # an FP8 layer's weight in its kernel's form
        prepared = getattr(m, "prepared", None) if not isinstance(m, MoEBlock) else None
        if isinstance(prepared, torch.Tensor):
            add(prepared)
        elif isinstance(prepared, tuple):
            add(prepared[0])
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    params += moe_layers * cfg.num_experts_per_tok * per_expert
    head = cfg.vocab_size * cfg.hidden_size  # the LM head scores the last token alone
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return 2.0 * tokens * (params - head) + 2.0 * head + 2.0 * attn * tokens * (tokens + 1) / 2


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy (bytes read + written), median of several."""
    n = (1 << 29) if device.type == "cuda" else (1 << 27)  # bf16 elements: 1 GiB / 256 MiB
    a = torch.ones(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / _median_s(lambda: b.copy_(a), device) / 1e9


def matmul_tflops(device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 1024
    x = torch.randn(n, n, device=device).bfloat16()
    y = torch.randn(n, n, device=device).bfloat16()
    return 2 * n**3 / _median_s(lambda: x @ y, device) / 1e12


def _median_s(fn, device: torch.device, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
