"""The kernels a worker runs, picked once at start-up for its device, role, dtype and model.

``KernelSet.resolve`` probes each op's backends on this worker's GPU (a trial product against
the reference, say); ops the model never runs are picked without probes. The choice is logged
a line per op, and on CUDA the compile watch starts: a Triton compile after start-up is logged
as a stall (``kernels/compile_watch``).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from pdserve.cluster.config import EngineConfig, ModelConfig
from pdserve.kernels import DeviceInfo, KernelSet
from pdserve.kernels.compile_watch import WATCH

log = logging.getLogger(__name__)


def unused_ops(cfg: ModelConfig) -> tuple[str, ...]:
    """The ops a model never runs: the other attention family's, the FP8 linear without FP8
    weights. Their backends are picked without probes (a trial GEMM, say)."""
    mla = ("mla_decode", "mla_prefill", "mla_kv_write", "silu_mul")  # GPT-OSS: no dense MLP
    # MLA rotates inside mla_kv_write
    family = mla if cfg.is_gqa else ("gqa_decode", "gqa_prefill", "rope")
    return family + (() if cfg.fp8_block else ("linear_fp8",))


def choose_kernels(
    config: EngineConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> tuple[KernelSet, DeviceInfo]:
    """The worker's kernels and the device they were picked for."""
    if device.type == "cuda":
        WATCH.install()  # Triton compiles after start-up are logged (``ModelRunner.allocate_kv``)
    info = DeviceInfo.detect(device)
    gpu = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    with gpu:  # backends' probes run on this worker's GPU
        kernels = KernelSet.resolve(
            info,
            config.role,
            config.kernel_overrides,
            dtype=str(dtype).removeprefix("torch."),
            unused=unused_ops(model_config),
        )
    for line in kernels.describe():
        log.info("kernel %s", line)
    return kernels, info
