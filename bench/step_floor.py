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
- KV: every request's context, all layers (a sliding-window layer's window at most).
Prefill: the FLOPs of a prompt (2 per weight touched per token: the weights above, the top-k
routed and the shared experts, the LM head for the last token only; the causal attention's QK
and PV products, MLA unabsorbed, within sliding windows) over
a bf16 matmul of 8192^3 (a GPU) or 1024^3 (CPU).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.model.gpt_oss import GptOssMoE
from pdserve.cluster.model.moe import MoEBlock

MOE_BLOCKS = (MoEBlock, GptOssMoE)  # both have ``route`` and MXFP4 ``experts``


@dataclass(frozen=True)
class StepBytes:
    weights: int
    experts: int  # of the distinct experts the step's routing hit
    kv: int
    experts_hit: tuple[int, ...]  # per MoE layer

    @property
    def total(self) -> int:
        return self.weights + self.experts + self.kv


def _read_whole(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor a step reads whole (see the module's docstring), each
    once: parameters and buffers, and the weights kernels hold in their own form (FP8 layers'
    ``prepared``, named ``<module>.prepared.weight`` and ``.scale``)."""
    seen: set[int] = set()
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for path, m in model.named_modules():
        prepared = None if isinstance(m, MOE_BLOCKS) else getattr(m, "prepared", None)
        if isinstance(prepared, torch.Tensor):
            named.append((f"{path}.prepared.weight", prepared))
        elif isinstance(prepared, tuple):
            parts = ("weight", *["scale"] * (len(prepared) - 1))
            named += [(f"{path}.prepared.{p}", t) for p, t in zip(parts, prepared)]
    for name, t in named:
        if name.startswith("model.embed_tokens.") or ".mlp.experts." in name:
            continue
        if "rotary" in name or name.endswith("._have") or not t.numel():
            continue
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            yield name, t


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor a step reads whole (see the module's docstring), each once."""
    return sum(t.numel() * t.element_size() for _, t in _read_whole(model))


def expert_bytes(block: MoEBlock | GptOssMoE) -> int:
    """Bytes of one routed expert of ``block``: its MXFP4 codes and scales (and biases)."""
    return block.experts.weights().expert_nbytes()


def kv_bytes(cfg: ModelConfig, contexts: list[int], dtype: torch.dtype) -> int:
    """KV bytes attention reads for requests of ``contexts`` tokens: every layer's whole
    context, a sliding layer's window at most."""
    row = cfg.kv_cache_dim * torch.finfo(dtype).bits // 8
    windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
    return row * sum(min(c, w) if w else c for c in contexts for w in windows)


def step_bytes(engine) -> StepBytes:
    """Run one decode step of ``engine``'s running batch eagerly, recording the experts each MoE
    layer's routing picks; returns what that step must read. In-process engines only."""
    runner = engine.runner
    model = runner.model
    blocks = [m for m in model.modules() if isinstance(m, MOE_BLOCKS)]
    hit: list[int] = []

    def record(block: MoEBlock | GptOssMoE, args) -> None:
        _, ids = block.route(args[0])  # the layer's own routing, again
        hit.append(int(torch.unique(ids).numel()))

    contexts = [r.num_computed_tokens for r in engine.scheduler.running]
    handles = [b.register_forward_pre_hook(record) for b in blocks]
    graphs, runner.graphs = runner.graphs, None  # hooks run in eager steps only
    try:
        engine.step()
    finally:
        runner.graphs = graphs
        for h in handles:
            h.remove()
    kv = kv_bytes(engine.model_config, contexts, runner.dtype)
    experts = sum(n * expert_bytes(b) for n, b in zip(hit, blocks))
    return StepBytes(weight_bytes(model), experts, kv, tuple(hit))


def prefill_flops(cfg: ModelConfig, model: torch.nn.Module, tokens: int) -> float:
    """FLOPs of one prompt of ``tokens`` tokens (see the module's docstring)."""
    params = sum(  # matrices, not their block scales; norms and biases are a rounding error
        t.numel()
        for name, t in _read_whole(model)
        if t.dim() == 2 and "scale" not in name.rsplit(".", 1)[-1]
    )
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    params += moe_layers * cfg.num_experts_per_tok * per_expert
    head = cfg.vocab_size * cfg.hidden_size  # the LM head scores the last token alone
    per_pair = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)  # a (q, k) pair's
    pairs = 0  # (query, key) pairs over all layers: causal, within a sliding layer's window
    for i in range(cfg.num_hidden_layers):
        w = cfg.window(i) or tokens
        pairs += sum(min(p + 1, w) for p in range(tokens))
    return 2.0 * tokens * (params - head) + 2.0 * head + 2.0 * per_pair * pairs


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
