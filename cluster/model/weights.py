"""Load a Hugging Face safetensors checkpoint (one file or many shards) into a model."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdserve.cluster.model.layers import Loadable

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


def _ignored(name: str, num_layers: int) -> bool:
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= num_layers:
        return True  # multi-token-prediction layers past the decoder stack
    return name.endswith("rotary_emb.inv_freq")


def load_weights(model: nn.Module, path: str | Path, num_layers: int) -> int:
    """Route every tensor to the deepest module whose path prefixes its name; then check that
    nothing is missing and let the model finish (tie embeddings, prepare MoE kernels).
    Returns the number of tensors loaded."""
    modules = {name: m for name, m in model.named_modules() if hasattr(m, "load_weight")}
    count = 0
    for name, tensor in iter_checkpoint(path):
        if _ignored(name, num_layers):
            continue
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            target = modules.get(".".join(parts[:cut]))
            if target is not None:
                target.load_weight(".".join(parts[cut:]), tensor)
                break
        else:
            raise ValueError(f"checkpoint tensor {name!r} matches no module of the model")
        count += 1
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
