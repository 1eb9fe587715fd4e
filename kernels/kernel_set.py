"""The kernels one worker uses, resolved once at start-up from its device, role and overrides."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kernels.device import DeviceInfo
from pdserve.kernels.moe_reference import MoeWeights, SwiGLU
from pdserve.kernels.registry import OPS, REGISTRY, Choice, Registry
from pdserve.kernels.triton_configs import MOE_CROSSOVER_M

# Tokens per MoE call at and above which the large-M backend runs. Replaced per GPU by the
# crossover that bench.kernels measures (triton_configs.MOE_CROSSOVER_M, keyed by GPU name);
# the value only matters when the two backends differ.
DEFAULT_MOE_CROSSOVER_M = 64
MOE_OPS = ("moe_small", "moe_large")


@dataclass(frozen=True)
class PreparedMoe:
    """One layer's experts in the layout each of the worker's two MoE backends wants."""

    small: Any
    large: Any


@dataclass(frozen=True)
class KernelSet:
    """Callables for every op, plus the choices that produced them (for logs and status)."""

    choices: tuple[Choice, ...]
    moe_small_fn: Callable
    moe_large_fn: Callable
    prepare_small: Callable[[MoeWeights], Any]
    prepare_large: Callable[[MoeWeights], Any]
    mla_decode: Callable
    mla_prefill: Callable
    gqa_decode: Callable
    gqa_prefill: Callable
    # (x [T, K], weight [N, K], bias, silu_mul=None) -> [T, N]; given silu_mul (the kernel
    # above), silu(gate) * up [T, N / 2]
    linear: Callable
    linear_fp8: Callable  # (x [T, K], prepared) -> [T, N]
    prepare_linear_fp8: Callable[[tuple], Any]  # (fp8 weight, block scales, dtype) -> prepared
    rms_norm: Callable  # (x, weight, eps, round_once, residual) -> norm, or (norm, x + residual)
    rope: Callable  # (positions, x, cos, sin, interleave) -> rotated x
    silu_mul: Callable  # (h [T, 2I]: gate, then up) -> silu(gate) * up [T, I]
    # (positions, q_pe, ckv, norm weight, eps, cos, sin, interleave, cache rows, slots) -> q_pe
    # rotated; the normalized latent and rotated key written to the cache rows
    mla_kv_write: Callable
    grouped_topk: Callable  # (logits, top_k, **routing) or (x, top_k, router_weight=W, ...)
    topk_softmax: Callable  # (logits, top_k) -> (weights, ids)
    moe_crossover_m: int = DEFAULT_MOE_CROSSOVER_M

    @staticmethod
    def resolve(
        device: DeviceInfo,
        role: str,
        overrides: Mapping[str, str] | None = None,
        registry: Registry = REGISTRY,
        moe_crossover_m: int | None = None,
        dtype: str | None = None,
        unused: Collection[str] = (),
    ) -> KernelSet:
        """``dtype`` is the model's activation dtype ("bfloat16", ...), None to ignore it;
        ``unused``: ops the model never runs, picked without their backends' probes."""
        overrides = dict(overrides or {})
        assert set(unused) <= set(OPS), unused
        unknown = set(overrides) - set(OPS)
        if unknown:
            raise ValueError(f"kernel overrides name unknown ops {sorted(unknown)}; ops are {OPS}")
        choices = {
            op: registry.select(op, device, role, overrides.get(op), dtype, op not in unused)
            for op in OPS
        }
        if moe_crossover_m is None:
            moe_crossover_m = MOE_CROSSOVER_M.get(device.name, DEFAULT_MOE_CROSSOVER_M)
        small, large = choices["moe_small"].backend, choices["moe_large"].backend
        if {small.mxfp4_codes, large.mxfp4_codes} == {"plain", "interleaved"}:
            # one layout per model: the op not named by an override follows the one that is
            free = [op for op in MOE_OPS if op not in overrides]
            if not free:
                raise ValueError(
                    f"moe_small={small.name} reads {small.mxfp4_codes} MXFP4 codes and "
                    f"moe_large={large.name} {large.mxfp4_codes} ones: pick MoE backends that "
                    "read the same layout (triton reads either)"
                )
            if len(free) == 2:  # neither named: the one asking for the fragment layout yields
                free = [op for op in MOE_OPS if choices[op].backend.mxfp4_codes == "interleaved"]
            op = free[0]
            other = choices["moe_large" if op == "moe_small" else "moe_small"].backend
            choices[op] = registry.select(
                op, device, role, None, dtype, op not in unused, codes=other.mxfp4_codes
            )
            small, large = choices["moe_small"].backend, choices["moe_large"].backend
        return KernelSet(
            choices=tuple(choices[op] for op in OPS),
            moe_small_fn=small.load(),
            moe_large_fn=large.load(),
            prepare_small=small.prepare(),
            prepare_large=large.prepare(),
            mla_decode=choices["mla_decode"].backend.load(),
            mla_prefill=choices["mla_prefill"].backend.load(),
            gqa_decode=choices["gqa_decode"].backend.load(),
            gqa_prefill=choices["gqa_prefill"].backend.load(),
            linear=choices["linear"].backend.load(),
            linear_fp8=choices["linear_fp8"].backend.load(),
            prepare_linear_fp8=choices["linear_fp8"].backend.prepare(),
            rms_norm=choices["rms_norm"].backend.load(),
            rope=choices["rope"].backend.load(),
            silu_mul=choices["silu_mul"].backend.load(),
            mla_kv_write=choices["mla_kv_write"].backend.load(),
            grouped_topk=choices["grouped_topk"].backend.load(),
            topk_softmax=choices["topk_softmax"].backend.load(),
            moe_crossover_m=moe_crossover_m,
        )

    @property
    def moe_codes(self) -> str:
        """The layout of the experts' MXFP4 codes both MoE backends read: "interleaved" where
        one asks for it (the model interleaves them at load, ``MXFP4Experts.prepare``), else
        "plain"."""
        codes = {c.backend.mxfp4_codes for c in self.choices if c.op in MOE_OPS}
        return "interleaved" if "interleaved" in codes else "plain"

    def not_graph_safe(self, ops: tuple[str, ...]) -> dict[str, str]:
        """The backends among ``ops`` that cannot run inside a CUDA graph, by op."""
        return {
            c.op: c.backend.name for c in self.choices if c.op in ops and not c.backend.graph_safe
        }

    def names(self) -> dict[str, str]:
        """op -> the backend that runs it: the choice, or where the chosen MLA decode hands
        the model's shapes to another kernel, that one (``runs``)."""
        names = {c.op: c.backend.name for c in self.choices}
        names["mla_decode"] = getattr(self.mla_decode, "runs", names["mla_decode"])
        return names

    def describe(self) -> list[str]:
        lines = [c.describe() for c in self.choices]
        lines.append(f"moe crossover: large-M backend from {self.moe_crossover_m} tokens")
        return lines

    def prepare_moe(self, weights: MoeWeights) -> PreparedMoe:
        small = self.prepare_small(weights)
        same = self.prepare_large is self.prepare_small
        return PreparedMoe(small=small, large=small if same else self.prepare_large(weights))

    def moe(
        self,
        x: torch.Tensor,
        prepared: PreparedMoe,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        act: SwiGLU,
    ) -> torch.Tensor:
        if x.shape[0] >= self.moe_crossover_m:
            return self.moe_large_fn(x, prepared.large, topk_ids, topk_weights, act)
        return self.moe_small_fn(x, prepared.small, topk_ids, topk_weights, act)
