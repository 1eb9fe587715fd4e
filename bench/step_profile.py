"""Where a step's GPU time goes: ``torch.profiler`` over a few engine steps, every kernel's
time summed by the labelled range it ran in on the GPU timeline (the MLA attention layers, the
MoE layers, tensor-parallel all-reduces, the rest), the MLA decode kernel alone, the kernels
that took the most, and one layer's kernels in launch order. Used by ``bench.decode_step
--profile``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pdserve.bench.step_floor import MOE_BLOCKS
from pdserve.cluster import LLMEngine
from pdserve.cluster.model.attention import MLAAttention
from pdserve.cluster.model.gqa_attention import GQAAttention


@contextlib.contextmanager
def _labelled(model: torch.nn.Module):
    """Wrap attention and MoE modules, and all-reduces, in profiler ranges."""
    handles, ranges = [], {}

    def pre(name):
        def hook(mod, _):
            r = torch.profiler.record_function(name)
            r.__enter__()
            ranges[id(mod)] = r

        return hook

    def post(mod, _, out):
        ranges.pop(id(mod)).__exit__(None, None, None)

    for m in model.modules():
        name = "pd::attention" if isinstance(m, (MLAAttention, GQAAttention)) else None
        name = "pd::moe" if isinstance(m, MOE_BLOCKS) else name
        if name:
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post)]
    import torch.distributed as dist

    real = dist.all_reduce

    def all_reduce(*a, **kw):
        with torch.profiler.record_function("pd::all_reduce"):
            return real(*a, **kw)

    dist.all_reduce = all_reduce
    try:
        yield
    finally:
        dist.all_reduce = real
        for h in handles:
            h.remove()


def split_kernel_time(
    spans: list[tuple[float, float, str]], kernels: list[tuple[float, float, str]]
) -> dict[str, float]:
    """Sum kernel durations by the innermost labelled span (start, end, part) on the GPU
    timeline that holds each kernel's start; kernels outside every span go to "rest". Time
    decides, not the launching op: Triton launches belong to no aten op."""
    parts: dict[str, float] = {"rest": 0.0}
    spans = sorted(spans, key=lambda s: s[1] - s[0])  # innermost (shortest) first
    for k_start, k_end, _ in kernels:
        part = next((name for s, e, name in spans if s <= k_start < e), "rest")
        parts[part] = parts.get(part, 0.0) + (k_end - k_start)
    return parts


def one_layer(
    spans: list[tuple[float, float, str]], kernels: list[tuple[float, float, str]]
) -> list[tuple[str, float]]:
    """The kernels (name, us) of one layer in start order: those starting in the middle
    attention span of the trace and in the first MoE span after it."""
    attn = sorted(s for s in spans if s[2] == "attention")
    if not attn:
        return []
    a = attn[len(attn) // 2]
    moe = [s for s in sorted(spans) if s[2] == "moe" and s[0] >= a[1]][:1]
    inside = [k for k in sorted(kernels) if any(s <= k[0] < e for s, e, _ in [a, *moe])]
    return [(name[:60], round(end - start, 1)) for start, end, name in inside]


def profile(engine: LLMEngine, steps: int = 5) -> dict[str, Any]:
    """GPU time per step (ms) of ``steps`` steps of ``engine``'s running batch, by part."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with (
        _labelled(engine.runner.model),
        torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof,
    ):
        for _ in range(steps):
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    # device events: kernels and copies, and the ranges' spans on the GPU timeline (us)
    dev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end, e.name[4:]) for e in dev
             if e.name.startswith("pd::")]  # fmt: skip
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in dev
               if not e.name.startswith("pd::")]  # fmt: skip
    parts = split_kernel_time(spans, kernels)
    out = {k: parts.get(k, 0.0) / steps / 1e3 for k in ("attention", "moe", "all_reduce", "rest")}
    by_name: dict[str, float] = {}
    for start, end, name in kernels:
        by_name[name[:80]] = by_name.get(name[:80], 0.0) + end - start
    out["gpu_total"] = sum(by_name.values()) / steps / 1e3
    out["attention_decode_kernel"] = sum(t for n, t in by_name.items() if "_decode_kernel" in n
                                   or "_combine_kernel" in n) / steps / 1e3  # fmt: skip
    counts = split_kernel_time(spans, [(s, s + 1, n) for s, _, n in kernels])  # one per kernel
    out["kernels_by_part"] = {k: round(v / steps, 1) for k, v in counts.items()}
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    out["top_kernels"] = {name: t / steps / 1e3 for name, t in top}
    out["one_layer_us"] = one_layer(spans, kernels)
    return {"kernels": len(kernels) // steps, **out}
