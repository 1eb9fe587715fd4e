"""Random tensors of a GPT-OSS checkpoint, under the released checkpoint's names and layouts
(``checkpoint_maker`` writes them; ``random_tensors`` draws them at load).

Experts in the released MXFP4 layout (``mxfp4``): ``gate_up_proj_blocks`` [E, 2I, H/32, 16]
uint8 (two E2M1 codes a byte, low nibble first; rows interleaved: 2j gate j, 2j+1 up j),
``gate_up_proj_scales`` [E, 2I, H/32] (E8M0), ``down_proj_blocks`` [E, H, I/32, 16] and
``down_proj_scales``, with ``gate_up_proj_bias`` [E, 2I] and ``down_proj_bias`` [E, H].
Otherwise as transformers stores them: ``gate_up_proj`` [E, H, 2I] (columns interleaved) and
``down_proj`` [E, I, H], holding values MXFP4 represents exactly. Scales as the DeepSeek
maker's: activations near unit scale, logits spread by a few units.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from pdserve.cluster.random_draw import mxfp4 as draw_mxfp4
from pdserve.cluster.random_draw import normal
from pdserve.kernels.mxfp4 import dequantize_mxfp4


def gpt_oss_tensors(
    cfg: dict[str, Any], g: torch.Generator, dtype: torch.dtype, mxfp4: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, d = cfg["num_key_value_heads"], cfg["head_dim"]
    e, inter = cfg["num_local_experts"], cfg["intermediate_size"]

    def lin(out: int, inp: int, gain: float = 1.0) -> torch.Tensor:
        return normal((out, inp), gain / math.sqrt(inp), g, dtype)

    def small(*shape: int, std: float = 0.1) -> torch.Tensor:
        return normal(shape, std, g, dtype)

    yield "model.embed_tokens.weight", normal((cfg["vocab_size"], h), 1.0, g, dtype)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (1 + small(h).float()).to(dtype)
        yield p + "post_attention_layernorm.weight", (1 + small(h).float()).to(dtype)
        a = p + "self_attn."
        for name, out, inp, gain in (
            ("q_proj", heads * d, h, 1.0),
            ("k_proj", kv * d, h, 1.0),
            ("v_proj", kv * d, h, 1.0),
            ("o_proj", h, heads * d, 0.5),
        ):
            yield a + name + ".weight", lin(out, inp, gain)
            yield a + name + ".bias", small(out)
        yield a + "sinks", small(heads, std=1.0)
        m = p + "mlp."
        yield m + "router.weight", lin(e, h, 2.0)
        yield m + "router.bias", small(e, std=0.3)
        x = m + "experts."
        w13, s13 = draw_mxfp4((e, 2 * inter, h), 1 / math.sqrt(h), g)  # [E, 2I, H/2] codes
        w2, s2 = draw_mxfp4((e, h, inter), 0.5 / math.sqrt(inter), g)  # [E, H, I/2]
        if mxfp4:
            yield x + "gate_up_proj_blocks", w13.view(e, 2 * inter, h // 32, 16)
            yield x + "gate_up_proj_scales", s13
            yield x + "down_proj_blocks", w2.view(e, h, inter // 32, 16)
            yield x + "down_proj_scales", s2
        else:  # transformers' layout: [in, out]
            yield x + "gate_up_proj", dequantize_mxfp4(w13, s13, dtype).transpose(1, 2)
            yield x + "down_proj", dequantize_mxfp4(w2, s2, dtype).transpose(1, 2)
        yield x + "gate_up_proj_bias", small(e, 2 * inter)
        yield x + "down_proj_bias", small(e, h)
    yield "model.norm.weight", (1 + small(h).float()).to(dtype)
    yield "lm_head.weight", lin(cfg["vocab_size"], h, 3.0)
