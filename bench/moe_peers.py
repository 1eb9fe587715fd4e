"""Other projects' MoE kernels timed beside ours in ``bench.kernels``, where they can run here.

- ``flashinfer_cutlass``: FlashInfer's SM90 CUTLASS W4A16 MoE through the project's adapter
  (``kernels/moe_flashinfer.py``), where its ``fused_moe_90`` module is installed (``pdserve
  build-kernels``) on an sm_90 GPU, for bf16 activations. Weights are prepared once per case
  and FlashInfer's autotuner runs once per M before timing.

- ``triton_kernels``: OpenAI's MXFP4 MoE (``matmul_ogs``, what vLLM runs on Hopper) through
  ``bench/moe_peer_triton_kernels.py``, where it is on ``PYTHONPATH``
  (``../shared/peers/triton_kernels-v3.6.0``) on an sm_90 GPU.

Each peer is checked against our kernel's output on the same inputs first (relative error at
most ``TOLERANCE``); a peer that disagrees is reported as such, not timed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.kernels.moe_reference import MoeWeights, SwiGLU

TOLERANCE = 2e-2


def _checked(call: Callable[[], torch.Tensor], ours: torch.Tensor) -> Callable | str:
    """``call`` where its output is within ``TOLERANCE`` of ``ours`` (relative), else why not."""
    got, ref = call().float(), ours.float()
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    return call if err <= TOLERANCE else f"disagrees with ours (relative error {err:.2e})"


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
        from pdserve.bench import moe_peer_triton_kernels as tk

        self.names = []
        for name, reason in (
            ("flashinfer_cutlass", flashinfer_reason()),
            ("triton_kernels", tk.unavailable()),
        ):
            if reason:
                self.skipped[name] = reason
            else:
                self.names.append(name)
        self._prepared: dict[str, tuple[MoeWeights, object]] = {}  # name: (weights, prepared)

    def _prepare(self, name: str, w: MoeWeights, prepare: Callable) -> object:
        """``prepare(w)`` once per weights (the previous case's copy freed first)."""
        held = self._prepared.pop(name, None)
        if held is not None and held[0] is w:
            self._prepared[name] = held
        else:
            del held
            self._prepared[name] = (w, prepare(w))
        return self._prepared[name][1]

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
        if "triton_kernels" in self.names:
            out["triton_kernels"] = self._triton_kernels(x, w, ids, tw, act, ours)
        return out

    def _triton_kernels(self, x, w, ids, tw, act, ours) -> Callable[[], torch.Tensor] | str:
        from pdserve.bench import moe_peer_triton_kernels as tk

        prepared = self._prepare("triton_kernels", w, tk.prepare)

        def call() -> torch.Tensor:
            return tk.moe_triton_kernels(x, prepared, ids, tw, act)

        return _checked(call, ours)

    def _flashinfer(self, x, w, ids, tw, act, ours) -> Callable[[], torch.Tensor] | str:
        from flashinfer.autotuner import autotune

        from pdserve.kernels.moe_flashinfer import moe_flashinfer, prepare

        if x.dtype != torch.bfloat16:
            return f"takes bf16 activations, not {x.dtype}"
        fw = self._prepare("flashinfer_cutlass", w, prepare)

        def call() -> torch.Tensor:
            return moe_flashinfer(x, fw, ids, tw, act)

        with autotune(True):  # profiles its tactics for this M
            call()
        torch.cuda.synchronize()
        return _checked(call, ours)
