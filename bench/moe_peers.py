"""Other projects' MoE kernels timed beside ours in ``bench.kernels``, where they can run here.

- ``flashinfer_cutlass``: FlashInfer's SM90 CUTLASS W4A16 MoE through the project's adapter
  (``kernels/moe_flashinfer.py``), where its ``fused_moe_90`` module is installed (``pdserve
  build-kernels``) on an sm_90 GPU, for bf16 activations. Weights are prepared once per case
  and FlashInfer's autotuner runs once per M before timing.

Each peer is checked against our kernel's output on the same inputs first (relative error at
most ``TOLERANCE``); a peer that disagrees is reported as such, not timed. OpenAI's
triton_kernels (``../shared/peers``), vLLM's Hopper MXFP4 MoE, is not wired here: its figures
come from a separate run on the same GPU (``BENCHMARKS.md`` names it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.kernels.moe_reference import MoeWeights, SwiGLU

TOLERANCE = 2e-2


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def flashinfer_reason() -> str | None:
    """Why FlashInfer's MoE cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"built for sm_90a, this is {torch.cuda.get_device_name()}"
    from pdserve.kernels.moe_flashinfer import unavailable

    return unavailable()


class Peers:
    """The peers that can run in this process, and each one's callable per case."""

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}
        reason = flashinfer_reason()
        self.names = [] if reason else ["flashinfer_cutlass"]
        if reason:
            self.skipped["flashinfer_cutlass"] = reason
        self._prepared: tuple[MoeWeights, object] | None = None  # (weights, their prepared copy)

    def calls(
        self,
        x: torch.Tensor,
        w: MoeWeights,
        ids: torch.Tensor,
        tw: torch.Tensor,
        act: SwiGLU,
        ours: torch.Tensor,
    ) -> dict[str, Callable[[], torch.Tensor] | str]:
        """Per peer: a call ready to time, or why it is not timed (it disagrees with ``ours``,
        our kernel's output on these inputs, or cannot take them)."""
        out: dict[str, Callable[[], torch.Tensor] | str] = {}
        if "flashinfer_cutlass" in self.names:
            out["flashinfer_cutlass"] = self._flashinfer(x, w, ids, tw, act, ours)
        return out

    def _flashinfer(self, x, w, ids, tw, act, ours) -> Callable[[], torch.Tensor] | str:
        from flashinfer.autotuner import autotune

        from pdserve.kernels.moe_flashinfer import moe_flashinfer, prepare

        if x.dtype != torch.bfloat16:
            return f"takes bf16 activations, not {x.dtype}"
        if self._prepared is None or self._prepared[0] is not w:
            self._prepared = None  # free the previous case's copy first
            self._prepared = (w, prepare(w))
        fw = self._prepared[1]

        def call() -> torch.Tensor:
            return moe_flashinfer(x, fw, ids, tw, act)

        with autotune(True):  # profiles its tactics for this M
            call()
        torch.cuda.synchronize()
        err = _rel_err(call(), ours)
        return call if err <= TOLERANCE else f"disagrees with ours (relative error {err:.2e})"
