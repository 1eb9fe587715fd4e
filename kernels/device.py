"""What a worker's device can do, as the kernel registry needs to know it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class DeviceInfo:
    """A device's kind and limits; tests fake these to check selection for GPUs they lack."""

    kind: str  # "cpu" or "cuda"
    name: str = "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0)
    smem_per_block: int = 0  # opt-in shared memory per thread block, bytes
    num_sms: int = 0

    @property
    def sm(self) -> int:
        """Compute capability as one integer (90 for Hopper, 120 for RTX Blackwell); 0 on CPU."""
        return 0 if self.capability is None else self.capability[0] * 10 + self.capability[1]

    def describe(self) -> str:
        if self.kind == "cpu":
            return "cpu"
        smem = self.smem_per_block // 1024
        return f"{self.name} (sm_{self.sm}, {smem} KiB smem/block, {self.num_sms} SMs)"

    @staticmethod
    def cpu() -> DeviceInfo:
        return DeviceInfo(kind="cpu")

    @staticmethod
    def detect(device: torch.device | str | None = None) -> DeviceInfo:
        device = torch.device(device) if device is not None else None
        if device is not None and device.type == "cpu" or not torch.cuda.is_available():
            return DeviceInfo.cpu()
        props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
        return DeviceInfo(
            kind="cuda",
            name=props.name,
            capability=(props.major, props.minor),
            smem_per_block=smem,
            num_sms=props.multi_processor_count,
        )


@lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device, as launchers size their grids by them; 4 elsewhere (the
    interpreter), so that CPU tests take the paths a GPU's few-program launches take."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@lru_cache(maxsize=16)
def pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch (sm_90 on): a
    kernel may start while the one before it drains, and waits (``gdc_wait``) before reading
    anything. Never on the CPU (the interpreter has no grid dependency control)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


# Known GPUs, for tests and for reasoning about configs that must fit other parts.
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 227 * 1024, 132)
H200 = DeviceInfo("cuda", "NVIDIA H200", (9, 0), 227 * 1024, 132)
B200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0), 227 * 1024, 148)
RTX_PRO_6000 = DeviceInfo("cuda", "NVIDIA RTX PRO 6000 Blackwell", (12, 0), 99 * 1024, 188)


@lru_cache(maxsize=16)
def smem_per_sm(device: torch.device) -> int:
    """Shared memory of one SM in bytes (228 KiB on an H100 or H200), 0 where unknown: the
    interpreter, or a torch that does not report it."""
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_multiprocessor", 0)
