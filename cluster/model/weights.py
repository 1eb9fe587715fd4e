"""Load a Hugging Face safetensors checkpoint (one file or many shards) into a model; FP8
block-scaled linears (DeepSeek's release format) are dequantized on the way."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdserve.cluster.model.layers import Loadable
from pdserve.kernels.fp8_blocks import dequantize_fp8_blocks
from pdserve.kernels.mxfp4 import BLOCK, dequantize_mxfp4, quantize_mxfp4

log = logging.getLogger(__name__)
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors files in model directory {str(path)!r}")
    return files


def iter_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class ExpertConversion:
    """The error of storing FP8 routed experts as MXFP4, measured on the first ``limit``
    expert weights the checkpoint holds (the rest convert the same way)."""

    def __init__(self, limit: int = 96) -> None:
        self.limit, self.tensors = limit, 0
        self.err_sq = self.ref_sq = self.max_abs = 0.0

    def measure(self, w: torch.Tensor) -> None:  # [out, in], dequantized float32
        if self.tensors >= self.limit or w.shape[-1] % BLOCK:
            return
        diff = dequantize_mxfp4(*quantize_mxfp4(w)) - w
        self.err_sq += float(diff.double().pow(2).sum())
        self.ref_sq += float(w.double().pow(2).sum())
        self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.tensors += 1

    @property
    def relative_rms(self) -> float:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0


def fp8_dequantized(
    tensors: Iterator[tuple[str, torch.Tensor]],
    block: tuple[int, int],
    conversion: ExpertConversion | None = None,
    keep: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each float8 ``X.weight`` paired with its ``X.weight_scale_inv`` (in either order, in any
    shard), as one float32 ``X.weight``, or as the pair itself where module ``X`` is in
    ``keep`` (it runs FP8); other tensors pass through. Routed experts' weights are measured by
    ``conversion`` on the way. An unpaired one is an error at the end."""
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}

    def pair(name: str, w: torch.Tensor, scale: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name.removesuffix(".weight") in keep:
            return [(name, w), (name + "_scale_inv", scale)]
        try:
            value = dequantize_fp8_blocks(w, scale, block)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
        if conversion is not None and ".mlp.experts." in name:
            conversion.measure(value)
        return [(name, value)]

    for name, t in tensors:
        if name.endswith(".weight_scale_inv"):
            base = name.removesuffix("_scale_inv")
            if base in weights:
                yield from pair(base, weights.pop(base), t)
            else:
                scales[base] = t
        elif t.dtype in FLOAT8 and t.dtype != torch.float8_e4m3fn:
            yield name, t  # refused by the caller, naming its dtype
        elif t.dtype == torch.float8_e4m3fn:
            if name in scales:
                yield from pair(name, t, scales.pop(name))
            else:
                weights[name] = t
        else:
            yield name, t
    if weights or scales:
        raise ValueError(
            f"checkpoint has {len(weights)} float8 weights without a weight_scale_inv "
            f"({sorted(weights)[:3]}) and {len(scales)} scales without a weight "
            f"({sorted(scales)[:3]})"
        )


def _fp8_modules(model: nn.Module) -> Iterator[str]:
    """Paths of the projections that take their stored FP8 weight and scales as they are."""
    for path, m in model.named_modules():
        if getattr(m, "takes_fp8", False):
            yield path
        for name in getattr(m, "fp8_names", lambda: ())():
            yield f"{path}.{name}"


def _ignored(name: str, num_layers: int) -> bool:
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= num_layers:
        return True  # multi-token-prediction layers past the decoder stack
    return name.endswith("rotary_emb.inv_freq")


def load_weights(
    model: nn.Module,
    path: str | Path,
    num_layers: int,
    fp8_block: tuple[int, int] | None = None,
    random_seed: int | None = None,
    device: torch.device | None = None,
) -> int:
    """Route every tensor to the deepest module whose path prefixes its name; then check that
    nothing is missing and let the model finish (tie embeddings, prepare MoE kernels).
    ``fp8_block``: the checkpoint's linears are FP8 with scales per block of this shape; they
    are dequantized on the way (routed experts then become MXFP4 like any others, the error of
    that conversion logged once). ``random_seed``: no checkpoint is read; the tensors are drawn
    on ``device`` (``checkpoint_maker.random_tensors``). Returns the number of tensors loaded."""
    modules = {name: m for name, m in model.named_modules() if hasattr(m, "load_weight")}
    count = 0
    if random_seed is None:
        tensors = iter_checkpoint(path)
    else:
        from pdserve.cluster.checkpoint_maker import random_tensors

        cfg = json.loads((Path(path) / "config.json").read_text())
        tensors = random_tensors(cfg, random_seed, device or torch.device("cpu"))
    conversion = ExpertConversion() if fp8_block is not None else None
    keep = frozenset(_fp8_modules(model))
    tensors = ((n, t) for n, t in tensors if not _ignored(n, num_layers))  # before dequantizing
    if fp8_block is not None:
        tensors = fp8_dequantized(tensors, fp8_block, conversion, keep)
    for name, tensor in tensors:
        if tensor.dtype in FLOAT8 and name.removesuffix(".weight") not in keep:
            if fp8_block is not None:  # the pairing passes on only E4M3 weights and scales
                raise ValueError(
                    f"checkpoint tensor {name!r} is {tensor.dtype}; only float8_e4m3fn"
                )
            raise ValueError(
                f"checkpoint tensor {name!r} is {tensor.dtype}, but config.json names no fp8 "
                "quantization_config (quant_method fp8, weight_block_size [128, 128])"
            )
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            target = modules.get(".".join(parts[:cut]))
            if target is not None:
                target.load_weight(".".join(parts[cut:]), tensor)
                break
        else:
            raise ValueError(f"checkpoint tensor {name!r} matches no module of the model")
        count += 1
    if conversion is not None and conversion.tensors:
        log.info(
            "FP8 routed experts stored as MXFP4: relative RMS error %.3g, largest %.3g, over "
            "the first %d expert weights",
            conversion.relative_rms,
            conversion.max_abs,
            conversion.tensors,
        )
    model.post_load()
    missing = [
        f"{prefix}.{n}"
        for prefix, m in model.named_modules()
        if isinstance(m, Loadable)
        for n in m.missing_weights()
    ]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {len(missing)}+ tensors: {missing[:5]}")
    return count
