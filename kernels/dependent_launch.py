"""Programmatic dependent launch for the decode path's Triton kernels (``device.pdl``: sm_90
on). A kernel launched with ``launch_args(device)`` may start while the kernel before it on
the stream drains. Its first statement is ``pdl_start(PDL)``: wait until that kernel has
finished and its writes are visible (``gdc_wait``), then let the next such kernel launch
(``gdc_launch_dependents``). Kernels launched without it (cuBLAS, torch) wait for the one
before them as always.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pdserve.kernels.device import pdl


def launch_args(device: torch.device) -> dict[str, bool]:
    """The launch keywords of a kernel that calls ``pdl_start``: its ``PDL`` and ``launch_pdl``."""
    on = pdl(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A kernel's first statement: with PDL, wait for the kernel before, then release the next."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
