"""Pure ops, tensors in and tensors out. Imports nothing of the project.

Every op has a PyTorch implementation (the CPU path and the test oracle) registered here; GPU
backends register themselves beside it and the registry picks per worker.
"""

from kernels.device import DeviceInfo
from kernels.kernel_set import KernelSet, PreparedMoe
from kernels.moe_reference import MoeWeights, SwiGLU, moe_mxfp4_torch
from kernels.mla_reference import mla_decode_torch, mla_prefill_torch
from kernels.registry import REGISTRY, Backend, Choice, Registry
from kernels.routing import grouped_topk

REGISTRY.register(Backend("moe_small", "torch", lambda: moe_mxfp4_torch, "any", priority=0))
REGISTRY.register(Backend("moe_large", "torch", lambda: moe_mxfp4_torch, "any", priority=0))
REGISTRY.register(Backend("mla_decode", "torch", lambda: mla_decode_torch, "any", priority=0))
REGISTRY.register(Backend("mla_prefill", "torch", lambda: mla_prefill_torch, "any", priority=0))

__all__ = [
    "REGISTRY",
    "Backend",
    "Choice",
    "DeviceInfo",
    "KernelSet",
    "MoeWeights",
    "PreparedMoe",
    "Registry",
    "SwiGLU",
    "grouped_topk",
    "mla_decode_torch",
    "mla_prefill_torch",
    "moe_mxfp4_torch",
]
