"""Replicated linears of one input run as one matmul.

DeepSeek-V3's attention projects each token's hidden state twice before anything else: to the
query latent (``q_a_proj``, 1536 outputs at V3's dims) and to the KV latent with its rope key
(``kv_a_proj_with_mqa``, 576). Both are narrow, replicated over tensor-parallel ranks and read
the same input, so stacked they are one GEMM of 2112 outputs: one read of the input, one launch
(and in FP8, one quantization of the activations) instead of two. The checkpoint keeps its two
names; this module takes each part's tensors into its rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.cluster.model.layers import Loadable, _copy, _empty, _prepare_fp8
from pdserve.kernels import KernelSet
from pdserve.kernels.linear_reference import linear_torch


class StackedLinear(Loadable):
    """``parts`` (name, out features) stacked in order into one weight [sum of outs, in];
    ``forward`` returns [T, sum of outs] for the caller to split. Given ``fp8`` (see
    ``Linear``) and every part but the last a whole number of row blocks, the stored FP8
    weights and their block scales stack as they are and run the kernels' ``linear_fp8``
    (``fp8_parts`` tells the loader); otherwise the parts are taken dequantized."""

    def __init__(
        self,
        in_features: int,
        parts: tuple[tuple[str, int], ...],
        *,
        dtype: torch.dtype,
        bias: bool = False,
        fp8: tuple[tuple[int, int], KernelSet] | None = None,
        linear: Callable = linear_torch,
    ) -> None:
        super().__init__()
        self.dtype, self.linear = dtype, linear
        self.rows: dict[str, tuple[int, int]] = {}  # part -> (first row, rows)
        at = 0
        for name, n in parts:
            self.rows[name] = (at, n)
            at += n
        self.fp8 = fp8 is not None and all(n % fp8[0][0] == 0 for _, n in parts[:-1])
        self.kernels, self.prepared = (fp8[1] if self.fp8 else None), None
        if self.fp8:
            self.block = fp8[0]
            bo, bi = self.block
            self.weight = _empty(at, in_features, dtype=torch.float8_e4m3fn)
            self.weight_scale_inv = _empty(-(-at // bo), -(-in_features // bi), dtype=torch.float32)
        else:
            self.weight = _empty(at, in_features, dtype=dtype)
        self.bias = _empty(at, dtype=dtype) if bias else None
        kinds = ("weight",) + (("weight_scale_inv",) if self.fp8 else ())
        kinds += ("bias",) if bias else ()
        self.expected = tuple(f"{name}.{kind}" for name, _ in parts for kind in kinds)

    def fp8_parts(self) -> tuple[str, ...]:
        """The parts whose stored FP8 weight and scales this module takes as they are."""
        return tuple(self.rows) if self.fp8 else ()

    def post_load(self) -> None:
        if self.fp8:
            w, scale = self.weight, self.weight_scale_inv
            self.prepared = _prepare_fp8(self.kernels, w, scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, sum of outs]
        if self.fp8:
            y = self.kernels.linear_fp8(x, self.prepared)
            return y if self.bias is None else y + self.bias
        return self.linear(x, self.weight, self.bias)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.expected:
            raise ValueError(f"unexpected stacked linear tensor {name!r}")
        part, kind = name.split(".", 1)
        first, n = self.rows[part]
        if kind == "weight_scale_inv":  # the part's block rows: earlier parts are whole blocks
            first, n = first // self.block[0], -(-n // self.block[0])
        _copy(getattr(self, kind).data[first : first + n], tensor, name)
        self.mark_loaded(name)
