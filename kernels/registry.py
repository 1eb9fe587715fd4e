"""Kernel registry: per op, the backends and what each needs; selection per worker at start-up.

Ops and their contracts (see ``moe_reference`` and ``mla_reference``):

- ``moe_small`` / ``moe_large``: MXFP4 MoE for few tokens (decode) and many tokens (prefill). A
  worker holds one of each and switches at a crossover M, so one layer call never pays for the
  wrong shape.
- ``mla_decode``: paged, absorbed MLA decode.
- ``mla_prefill``: causal variable-length attention, chunked over a cached prefix.
- ``gqa_decode``: paged grouped-query decode with attention sinks and a sliding window
  (GPT-OSS; ``gqa_reference``).
- ``gqa_prefill``: its causal variable-length prefill.
- ``rms_norm``: RMSNorm, optionally after the residual add (``rms_norm_reference``).
- ``rope``: the rotary embedding of queries and keys (``rope_reference``).
- ``silu_mul``: the dense MLP's gated activation (``silu_mul_reference``).
- ``mla_kv_write``: MLA's query and key rotations with the latent's norm and its cache write
  (``mla_kv_write_reference``).
- ``grouped_topk``: DeepSeek-V3's group-limited top-k routing (``routing``).
- ``topk_softmax``: GPT-OSS's routing, a softmax over each token's top-k logits (``routing``).
- ``linear``: a dense linear, optionally with the gated activation of a [gate; up] weight
  (``linear_reference``); the Triton backend takes a decode step's few rows.
- ``linear_fp8``: a linear whose weight is FP8 with 128x128 block scales (DeepSeek's release
  format): dequantized once at load (``torch``), or an FP8 GEMM with activations quantized per
  token in groups of 128 (``triton``; ``scaled_mm``: cuBLAS's block-scaled GEMM on sm_90 from a
  crossover M).

A backend states the device kind, compute capabilities and shared memory it needs, and an
``unavailable()`` probe (a missing package, say). ``select`` takes the best one that fits the
worker's device and role, or the one named by an override, and records why each other one lost;
the worker logs that and ``pdserve status`` shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.kernels.device import DeviceInfo

OPS = (
    "moe_small",
    "moe_large",
    "mla_decode",
    "mla_prefill",
    "linear",
    "linear_fp8",
    "gqa_decode",
    "gqa_prefill",
    "rms_norm",
    "rope",
    "silu_mul",
    "mla_kv_write",
    "grouped_topk",
    "topk_softmax",
)
ROLES = ("prefill", "decode", "colocated")


def _always() -> str | None:
    return None


def _identity(weights: Any) -> Any:
    return weights


@dataclass(frozen=True)
class Backend:
    """One implementation of one op."""

    op: str  # one of OPS
    name: str  # unique within the op, used in overrides: "torch", "triton", "flashinfer_cutlass"
    load: Callable[[], Callable]  # imports lazily and returns the op's function
    device_kind: str  # "cpu", "cuda" or "any"
    priority: int = 0  # the highest-priority backend that fits wins
    min_sm: int = 0  # lowest compute capability (major * 10 + minor)
    max_sm: int | None = None  # highest, when an arch-specific instruction set is used
    min_smem: int = 0  # shared memory per block its largest config needs, bytes
    roles: tuple[str, ...] = ROLES  # roles it is chosen for by default
    dtypes: tuple[str, ...] | None = None  # activation dtypes it computes in; None: any
    unavailable: Callable[[], str | None] = _always  # why it cannot run here, or None
    # weight preprocessing: MoE experts, or (weight, scale, dtype) of an FP8 linear
    prepare: Callable[[], Callable[[Any], Any]] = lambda: _identity
    # launches depend on shapes alone, with no host sync: it may run inside a CUDA graph
    graph_safe: bool = False
    # MoE: the layout of the MXFP4 codes it reads: "plain" (as stored), "interleaved"
    # (``mxfp4.interleave_mxfp4``, which the worker then applies at load) or "either"
    mxfp4_codes: str = "plain"

    def reject_reason(
        self, device: DeviceInfo, role: str | None, dtype: str | None = None, probe: bool = True
    ) -> str | None:
        """Why this backend does not fit (device, role, dtype), or None; role None skips the role
        check (an override may pick a backend outside its default roles), dtype None the dtype's,
        ``probe=False`` the ``unavailable`` probe."""
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return f"computes in {'/'.join(self.dtypes)}, not {dtype}"
        if self.device_kind != "any" and self.device_kind != device.kind:
            return f"needs a {self.device_kind} device, worker has {device.kind}"
        if device.kind == "cuda":
            if device.sm < self.min_sm:
                return f"needs sm_{self.min_sm}+, device is sm_{device.sm}"
            if self.max_sm is not None and device.sm > self.max_sm:
                return f"built for sm_{self.max_sm} and below, device is sm_{device.sm}"
            if device.smem_per_block < self.min_smem:
                return (
                    f"needs {self.min_smem // 1024} KiB shared memory per block, "
                    f"device has {device.smem_per_block // 1024} KiB"
                )
        if role is not None and role not in self.roles:
            return f"not used for the {role} role"
        return self.unavailable() if probe else None


@dataclass(frozen=True)
class Choice:
    """The backend picked for one op, and why the others were not."""

    op: str
    backend: Backend
    reason: str
    rejected: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        lost = "; ".join(f"{n}: {why}" for n, why in self.rejected)
        lost = f"; passed over {lost}" if lost else ""
        return f"{self.op}={self.backend.name} ({self.reason}{lost})"


@dataclass
class Registry:
    """All backends of all ops. The module-level ``REGISTRY`` is the one workers use."""

    backends: dict[str, list[Backend]] = field(default_factory=lambda: {op: [] for op in OPS})

    def register(self, backend: Backend) -> None:
        if backend.op not in self.backends:
            raise ValueError(f"unknown op {backend.op!r}; ops are {OPS}")
        if any(b.name == backend.name for b in self.backends[backend.op]):
            raise ValueError(f"backend {backend.name!r} is already registered for {backend.op}")
        self.backends[backend.op].append(backend)

    def names(self, op: str) -> list[str]:
        return [b.name for b in self.backends[op]]

    def select(
        self,
        op: str,
        device: DeviceInfo,
        role: str,
        override: str | None = None,
        dtype: str | None = None,
        probe: bool = True,
        codes: str | None = None,
    ) -> Choice:
        """The best backend of ``op`` that fits; ``probe=False`` for an op the model never runs:
        its backends' probes (a trial GEMM on the GPU, say) are skipped; ``codes``: a MoE op's
        backend must read that layout of MXFP4 codes (the other MoE op's)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
        candidates = sorted(self.backends[op], key=lambda b: -b.priority)
        if override is not None:
            named = [b for b in candidates if b.name == override]
            if not named:
                raise ValueError(
                    f"kernel override {op}={override!r} names no backend; "
                    f"choose from {self.names(op)}"
                )
            # an override may pick a backend outside its default roles, never one that cannot run
            why = named[0].reject_reason(device, None, dtype)
            if why is not None:
                raise ValueError(f"kernel override {op}={override!r} cannot run here: {why}")
            return Choice(op, named[0], "override")
        rejected: list[tuple[str, str]] = []
        fit = f"best fit for {role} on {device.describe()}"
        if not probe:
            fit = f"unused by the model, not probed; {fit}"
        for b in candidates:
            why = b.reject_reason(device, role, dtype, probe)
            if why is None and codes is not None and b.mxfp4_codes not in (codes, "either"):
                why = f"reads {b.mxfp4_codes} MXFP4 codes, the other MoE backend {codes} ones"
            if why is None:
                return Choice(op, b, fit, tuple(rejected))
            rejected.append((b.name, why))
        raise ValueError(f"no {op} backend runs on {device.describe()} for {role}: {rejected}")


REGISTRY = Registry()
