"""Tensor-parallel building blocks. Each takes its checkpoint tensors whole and keeps its shard.

Loading protocol: a module with ``load_weight(name, tensor)`` receives every checkpoint tensor
whose name starts with the module's path (``name`` is the rest, e.g. ``"weight"``), and
``missing_weights()`` lists what it still lacks, so a partial checkpoint is an error, not garbage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.cluster.parallel import TensorParallel
from pdserve.kernels import KernelSet
from pdserve.kernels.linear_reference import linear_torch
from pdserve.kernels.rms_norm_reference import rms_norm_torch
from pdserve.kernels.silu_mul_reference import silu_mul_torch


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"{what}: checkpoint shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(src.to(dtype=dst.dtype))


def _prepare_fp8(
    kernels: KernelSet, weight: nn.Parameter, scale: nn.Parameter, dtype: torch.dtype
) -> object:
    """An FP8 weight in its ``linear_fp8`` kernel's form; a kernel that dequantized it leaves
    the FP8 copy empty (the memory goes)."""
    prepared = kernels.prepare_linear_fp8((weight.data, scale.data, dtype))
    if isinstance(prepared, torch.Tensor):
        weight.data = weight.data.new_empty(0)
    return prepared


class Loadable(nn.Module):
    """Tracks which of ``expected`` names have been loaded."""

    expected: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._loaded: set[str] = set()

    def mark_loaded(self, name: str) -> None:
        self._loaded.add(name)

    def missing_weights(self) -> list[str]:
        return [n for n in self.expected if n not in self._loaded]


class RMSNorm(Loadable):
    """RMSNorm computed in float32, as transformers' DeepseekV3RMSNorm does (the normalized
    value rounded to the model dtype, then scaled), or with ``round_once`` as GptOssRMSNorm
    does (scaled in float32, rounded once); through the worker's ``rms_norm`` kernel
    (``kernels/rms_norm_reference.py`` is the contract and the CPU path)."""

    expected = ("weight",)

    def __init__(
        self,
        dim: int,
        eps: float,
        dtype: torch.dtype,
        round_once: bool = False,
        kernel: Callable = rms_norm_torch,
    ) -> None:
        super().__init__()
        self.eps, self.round_once, self.kernel = eps, round_once, kernel
        self.weight = _empty(dim, dtype=dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> norm(x); with ``residual``: (norm(x + residual), x + residual), the add
        and the norm in one kernel."""
        return self.kernel(x, self.weight, self.eps, self.round_once, residual)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name != "weight":
            raise ValueError(f"unexpected norm tensor {name!r}")
        _copy(self.weight.data, tensor, name)
        self.mark_loaded(name)


class Linear(Loadable):
    """y = x W^T (+ b), W sharded by output rows ("column"), input columns ("row") or not at all.

    A row-parallel layer returns this rank's partial sum; the caller all-reduces (once per block,
    after adding the other partial sums it owns).

    Given ``fp8`` (the checkpoint's FP8 block shape, and the worker's kernels) the layer takes
    its weight as stored, float8 with ``weight_scale_inv`` block scales (``takes_fp8``), and
    runs the kernels' ``linear_fp8`` (an FP8 GEMM, or the weight dequantized once at load);
    unless this rank's shard would split a scale block, when it takes the weight dequantized.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: torch.dtype,
        tp: TensorParallel,
        mode: str = "replicated",
        bias: bool = False,
        fp8: tuple[tuple[int, int], KernelSet] | None = None,
        linear: Callable = linear_torch,
    ) -> None:
        super().__init__()
        if mode not in ("replicated", "column", "row"):
            raise ValueError(f"unknown linear mode {mode!r}")
        self.mode, self.tp, self.dtype = mode, tp, dtype
        self.linear = linear  # the worker's kernel for a dense weight
        out_l = tp.split(out_features, "output features") if mode == "column" else out_features
        in_l = tp.split(in_features, "input features") if mode == "row" else in_features
        # a shard must start and end on scale blocks: rows (column mode) or columns (row mode)
        split = {"column": (out_l, 0), "row": (in_l, 1)}.get(mode)
        whole = (
            split is None or tp.size == 1 or (fp8 is not None and split[0] % fp8[0][split[1]] == 0)
        )
        self.takes_fp8 = fp8 is not None and whole
        self.kernels, self.prepared = (fp8[1] if fp8 else None), None
        if self.takes_fp8:
            (bo, bi), f8 = fp8[0], dict(dtype=torch.float8_e4m3fn)
            self.block = (bo, bi)
            self.weight = _empty(out_l, in_l, **f8)
            self.weight_scale_inv = _empty(-(-out_l // bo), -(-in_l // bi), dtype=torch.float32)
        else:
            self.weight = _empty(out_l, in_l, dtype=dtype)
        self.bias = _empty(out_l, dtype=dtype) if bias else None
        self.expected = ("weight",) + (("weight_scale_inv",) if self.takes_fp8 else ())
        self.expected += ("bias",) if bias else ()

    def post_load(self) -> None:
        """An FP8 layer's weight in its kernel's form (FP8 kept, or dequantized)."""
        if self.takes_fp8:
            self.prepared = _prepare_fp8(
                self.kernels, self.weight, self.weight_scale_inv, self.dtype
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a row-parallel bias is added by rank 0 only, so the all-reduce counts it once
        bias = self.bias if self.mode != "row" or self.tp.rank == 0 else None
        if self.takes_fp8:
            y = self.kernels.linear_fp8(x, self.prepared)
            return y if bias is None else y + bias
        return self.linear(x, self.weight, bias)

    def shard(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's slice of a whole checkpoint tensor; of the block scales, the blocks of
        its slice (which starts and ends on block edges: ``takes_fp8``)."""
        if self.mode == "replicated" or self.tp.size == 1 or (self.mode, name) == ("row", "bias"):
            return tensor
        r, dim = self.tp.rank, 0 if self.mode == "column" else 1
        n = self.weight.shape[dim]
        if name == "weight_scale_inv":
            n //= self.block[dim]
        return tensor.narrow(dim, r * n, n)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.expected:
            raise ValueError(f"unexpected linear tensor {name!r}")
        _copy(getattr(self, name).data, self.shard(tensor, name), name)
        self.mark_loaded(name)


class DenseMLP(Loadable):
    """down(silu(gate(x)) * up(x)), gate and up in one column-parallel matmul. Returns a partial
    sum under tensor parallelism. Given ``fp8`` (see ``Linear``) and this rank's intermediate
    shard in whole blocks, gate and up keep their FP8 weights, stacked with their block scales
    (``fp8_names`` tells the loader), and down_proj is an FP8 ``Linear``."""

    expected = ("gate_proj.weight", "up_proj.weight")  # down_proj is a Linear of its own

    def __init__(
        self,
        hidden: int,
        inter: int,
        *,
        dtype: torch.dtype,
        tp: TensorParallel,
        fp8: tuple[tuple[int, int], KernelSet] | None = None,
        act: Callable = silu_mul_torch,
        linear: Callable = linear_torch,
    ) -> None:
        super().__init__()
        self.inter, self.tp, self.dtype = tp.split(inter, "MLP intermediate size"), tp, dtype
        self.act, self.linear = act, linear  # the worker's silu_mul and linear kernels
        self.down_proj = Linear(
            inter, hidden, dtype=dtype, tp=tp, mode="row", fp8=fp8, linear=linear
        )
        self.fp8 = fp8 is not None and self.inter % fp8[0][0] == 0
        self.prepared = None
        if self.fp8:
            self.block, self.kernels = fp8
            bo, bi = self.block
            self.gate_up_weight = _empty(2 * self.inter, hidden, dtype=torch.float8_e4m3fn)
            self.gate_up_scale = _empty(2 * self.inter // bo, -(-hidden // bi), dtype=torch.float32)
            self.expected = self.expected + (
                "gate_proj.weight_scale_inv",
                "up_proj.weight_scale_inv",
            )
        else:
            self.gate_up_weight = _empty(2 * self.inter, hidden, dtype=dtype)  # [gate; up] shards

    def fp8_names(self) -> tuple[str, ...]:
        """The projections whose stored FP8 weight and scales this module takes as they are."""
        return ("gate_proj", "up_proj") if self.fp8 else ()

    def post_load(self) -> None:
        if self.fp8:
            w, scale = self.gate_up_weight, self.gate_up_scale
            self.prepared = _prepare_fp8(self.kernels, w, scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            h = self.act(self.kernels.linear_fp8(x, self.prepared))  # [T, 2I] -> [T, I]
        else:  # the activation in the linear kernel's epilogue where it has one
            h = self.linear(x, self.gate_up_weight, silu_mul=self.act)  # [T, I]
        return self.down_proj(h)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.expected:
            raise ValueError(f"unexpected MLP tensor {name!r}")
        r, n = self.tp.rank, self.inter
        half = 0 if name.startswith("gate") else 1
        if name.endswith("weight_scale_inv"):  # block rows of this rank's shard
            n //= self.block[0]
            dst = self.gate_up_scale.data[half * n : (half + 1) * n]
        else:
            dst = self.gate_up_weight.data[half * n : (half + 1) * n]
        _copy(dst, tensor[r * n : (r + 1) * n], name)
        self.mark_loaded(name)


class VocabEmbedding(Loadable):
    """Token embedding with the vocabulary split over ranks (padded to split evenly)."""

    expected = ("weight",)

    def __init__(self, vocab: int, hidden: int, *, dtype: torch.dtype, tp: TensorParallel) -> None:
        super().__init__()
        self.vocab, self.tp = vocab, tp
        self.per_rank = -(-vocab // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = _empty(self.per_rank, hidden, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name != "weight":
            raise ValueError(f"unexpected embedding tensor {name!r}")
        rows = tensor[self.start : self.start + self.per_rank]
        self.weight.data.zero_()
        _copy(self.weight.data[: rows.shape[0]], rows, name)
        self.mark_loaded(name)


class LMHead(VocabEmbedding):
    """Logits over the whole vocabulary: each rank scores its slice, then an all-gather."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = F.linear(hidden, self.weight)  # [N, V / tp]
        return self.tp.all_gather_last(logits)[:, : self.vocab]
