"""The paged KV layout both sides of a transfer must share, its fingerprint, and the block
copies in and out of it.

A cache is [slots, blocks, block_size, width], contiguous (a slot per layer, or per full and
sliding layer pair: ``kv_groups``; "layers" below are slots). A prompt's blocks are copied as whole
rows of the [layers * blocks, block_size * width] view (73 KB each in DeepSeek-V2-Lite's layout)
by ``copy_rows``: the Triton kernel on GPU (both directions at copy speed; PyTorch's
``index_copy_`` scatters such rows at a third of it, and indexing the block dimension of the 4-D
cache is slower still: ``bench.kv_copy``), PyTorch elsewhere.
"""

from __future__ import annotations

import msgspec
import torch

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.errors import KVLayoutMismatch
from pdserve.cluster.kv_groups import KVGroups
from pdserve.kernels import row_copy_reference


class KVFingerprint(msgspec.Struct, frozen=True):
    """What makes a block copy between two replicas meaningful. Compared when a prefill and a
    decode replica first meet; any difference is a deployment error, never a silent corruption."""

    model: str  # architecture + dims, e.g. "DeepseekV3ForCausalLM/h7168/l61/v129280"
    # (GPT-OSS's windows and head counts are in the weights digest, a digest of config.json)
    weights: str  # a digest of the checkpoint's config (same shapes, same weights directory)
    dtype: str  # cache dtype, e.g. "bfloat16"
    block_size: int
    num_layers: int
    num_slots: int  # the cache's layer slots: a full and a sliding layer share one (kv_groups)
    window: int  # sliding layers' window (0: none); their blocks travel after the full ones
    row_width: int  # kv_lora_rank + rope dim (MLA); 2 * KV heads * head dim (GQA)
    # no tensor-parallel size: MLA's cache holds the latent, and GQA's all KV heads, which every
    # rank of a TP group keeps whole, so a prefill group of any size can fill a decode group of
    # any size

    def check(self, other: KVFingerprint) -> None:
        if self != other:
            diffs = [
                f"{f}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
                for f in self.__struct_fields__
                if getattr(self, f) != getattr(other, f)
            ]
            raise KVLayoutMismatch(f"prefill and decode KV layouts differ ({'; '.join(diffs)})")


def fingerprint(
    cfg: ModelConfig, weights_digest: str, dtype: torch.dtype, block_size: int
) -> KVFingerprint:
    groups = KVGroups.of(cfg)
    return KVFingerprint(
        model=f"{cfg.architecture}/h{cfg.hidden_size}/l{cfg.num_hidden_layers}/v{cfg.vocab_size}",
        weights=weights_digest,
        dtype=str(dtype).removeprefix("torch."),
        block_size=block_size,
        num_layers=cfg.num_hidden_layers,
        num_slots=groups.num_slots,
        window=groups.window,
        row_width=cfg.kv_cache_dim,
    )


def device_index(block_ids: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Block ids [n] int64 on ``device``. From a list on GPU: a pinned copy, queued on the
    current stream without waiting for it (a plain copy would wait for the steps queued
    before)."""
    if isinstance(block_ids, torch.Tensor):
        return block_ids.to(device, non_blocking=True)
    idx = torch.tensor(block_ids, dtype=torch.int64)
    if device.type == "cuda":
        idx = idx.pin_memory()
    return idx.to(device, non_blocking=True)


def block_rows(
    cache: torch.Tensor, block_ids: list[int] | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """[layers, n] row ids of blocks ``block_ids`` [n] in the [layers * blocks, block_size *
    width] view of ``cache``, on ``device`` (the cache's by default): layer l's block b is row
    l * blocks + b. Made once per transfer (the index copy and three small kernels); a layer
    range is a slice of it."""
    layers, blocks = cache.shape[:2]
    device = cache.device if device is None else device
    index = device_index(block_ids, device)  # [n]
    base = torch.arange(layers, device=device).unsqueeze(1) * blocks  # [layers, 1]
    return base + index.unsqueeze(0)


def gather_blocks(
    cache: torch.Tensor, rows: torch.Tensor, layers: slice, out: torch.Tensor | None = None
) -> torch.Tensor:
    """[len(layers), n, block_size, width]: a copy of the blocks whose ``block_rows`` are
    ``rows`` [L, n], in ``layers`` of ``cache`` [L, blocks, block_size, width] (into ``out``
    when given), queued on the current stream."""
    num_layers, blocks, bs, width = cache.shape
    part = rows[layers]  # [count, n]
    if out is None:
        out = torch.empty(*part.shape, bs, width, dtype=cache.dtype, device=cache.device)
    assert out.is_contiguous() and out.shape == (*part.shape, bs, width), out.shape
    flat = cache.view(num_layers * blocks, bs * width)
    _copy_rows(cache)(flat, out.view(-1, bs * width), src_rows=part.reshape(-1))
    return out


def host_rows(cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """``block_rows`` made on the host: [layers, n] int64, pinned when ``cache`` is on a GPU.
    Made ahead of a transfer, it reaches the device in one copy on the stream that scatters,
    not in the four small steps ``block_rows`` takes there."""
    rows = block_rows(cache, block_ids, torch.device("cpu"))
    return rows.pin_memory() if cache.is_cuda else rows


def scatter_blocks(
    cache: torch.Tensor, rows: torch.Tensor, kv: torch.Tensor, layers: slice
) -> None:
    """Write ``kv`` [len(layers), n, block_size, width] into the blocks whose ``block_rows``
    are ``rows`` [L, n] (or ``host_rows``), in ``layers`` of ``cache``, queued on the current
    stream."""
    num_layers, blocks, bs, width = cache.shape
    flat = cache.view(num_layers * blocks, bs * width)
    src = kv.reshape(-1, bs * width)
    if not src.is_contiguous():
        src = src.contiguous()
    dst = rows[layers].reshape(-1)  # [len(layers) * n]
    if dst.device != cache.device:  # host rows: one copy, not waiting for the stream's work
        dst = dst.to(cache.device, non_blocking=True)
    _copy_rows(cache)(src, flat, dst_rows=dst)


def warm_up(cache: torch.Tensor) -> None:
    """Run both block copies on one block of ``cache`` (it is left as it was): on GPU the first
    use of a Triton kernel in a process loads (or compiles) it, which should happen at
    start-up, not in a transfer's critical path, on the engine thread. Twice: from the first
    layer and from the second, as a layer group's row ids start 16-byte aligned or not (Triton
    makes a kernel for each)."""
    rows = block_rows(cache, [0])  # [layers, 1]
    for layers in (slice(None), slice(1, None))[: cache.shape[0]]:
        part = gather_blocks(cache, rows, layers)
        scatter_blocks(cache, rows, part, layers)


def _copy_rows(cache: torch.Tensor):
    """``copy_rows`` for the cache's device: Triton on GPU, PyTorch elsewhere."""
    if cache.is_cuda:
        from pdserve.kernels import row_copy_triton  # Triton only where it runs

        return row_copy_triton.copy_rows
    return row_copy_reference.copy_rows
