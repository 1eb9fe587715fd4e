"""Write a random-weight Hugging Face checkpoint of the DeepSeek-V3 architecture, or of
GPT-OSS's (``gpt_oss_tensors``: the released names and layouts, a harmony tokenizer).

Tensor names are the hub's (per-expert ``mlp.experts.{i}.{gate,up,down}_proj.weight``), so
transformers loads the directory too. Routed experts hold MXFP4-representable values, so
quantizing them at load is lossless; with ``mxfp4=True`` they are stored pre-quantized in the
GPT-OSS layout instead (``gate_up_proj_blocks`` with interleaved gate/up rows, ``*_scales``),
which is the only way the large presets fit on a disk. With ``fp8=True`` every projection
(attention, dense MLPs, shared and routed experts) is stored as DeepSeek publishes its models:
float8 E4M3 with a float32 ``weight_scale_inv`` per 128x128 block; norms, the router, the
embeddings and the LM head stay in ``dtype``. Shards are written as they fill, each on a
writer thread while the next is drawn, so memory holds two shards.

Scales are chosen so the random model is well conditioned: every projection keeps activations
near unit scale, and the logits spread by a few units, so greedy choices are not near-ties.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pdserve.cluster.gpt_oss_tensors import gpt_oss_tensors
from pdserve.cluster.presets import GPT_OSS_PRESETS, preset_config
from pdserve.cluster.random_draw import mxfp4 as draw_mxfp4
from pdserve.cluster.random_draw import normal
from pdserve.cluster.tokenizer_trainer import train_tokenizer
from pdserve.kernels.fp8_blocks import quantize_fp8_blocks
from pdserve.kernels.mxfp4 import dequantize_mxfp4, random_mxfp4

SHARD_BYTES = 2 << 30
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _tensors(
    cfg: dict[str, Any], g: torch.Generator, dtype: torch.dtype, mxfp4: bool, fp8: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    if cfg["architectures"][0] == "GptOssForCausalLM":
        yield from gpt_oss_tensors(cfg, g, dtype, mxfp4)
        return
    for name, t in _plain_tensors(cfg, g, dtype, mxfp4):
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]  # q_a_proj, gate, lm_head...
        if not fp8 or not name.endswith(".weight") or "_proj" not in module:  # norms, router,
            # embeddings and the LM head stay unquantized
            yield name, t
            continue
        # routed experts' values are MXFP4's: power-of-two block scales keep them exact
        codes, scale = quantize_fp8_blocks(t, power_of_two=".mlp.experts." in name)
        yield name, codes
        yield name + "_scale_inv", scale


def _plain_tensors(
    cfg: dict[str, Any], g: torch.Generator, dtype: torch.dtype, mxfp4: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    r, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]

    def lin(out: int, inp: int, gain: float = 1.0) -> torch.Tensor:
        return normal((out, inp), gain / math.sqrt(inp), g, dtype)

    def ones(n: int) -> torch.Tensor:
        return (1.0 + normal((n,), 0.1, g, torch.float32)).to(dtype)

    yield "model.embed_tokens.weight", normal((cfg["vocab_size"], h), 1.0, g, dtype)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", ones(h)
        yield p + "post_attention_layernorm.weight", ones(h)
        a = p + "self_attn."
        if cfg["q_lora_rank"] is None:
            yield a + "q_proj.weight", lin(heads * qk, h)
        else:
            yield a + "q_a_proj.weight", lin(cfg["q_lora_rank"], h)
            yield a + "q_a_layernorm.weight", ones(cfg["q_lora_rank"])
            yield a + "q_b_proj.weight", lin(heads * qk, cfg["q_lora_rank"])
        yield a + "kv_a_proj_with_mqa.weight", lin(r + rope, h)
        yield a + "kv_a_layernorm.weight", ones(r)
        yield a + "kv_b_proj.weight", lin(heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), r)
        yield a + "o_proj.weight", lin(h, heads * cfg["v_head_dim"], 0.5)
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            yield m + "gate_proj.weight", lin(inter, h)
            yield m + "up_proj.weight", lin(inter, h)
            yield m + "down_proj.weight", lin(h, inter, 0.5)
            continue
        e, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        yield m + "gate.weight", lin(e, h, 2.0)
        yield m + "gate.e_score_correction_bias", normal((e,), 0.05, g, torch.float32)
        if cfg["n_shared_experts"]:
            shared = inter * cfg["n_shared_experts"]
            yield m + "shared_experts.gate_proj.weight", lin(shared, h)
            yield m + "shared_experts.up_proj.weight", lin(shared, h)
            yield m + "shared_experts.down_proj.weight", lin(h, shared, 0.5)
        if mxfp4:
            # GPT-OSS layout: gate/up rows interleaved, blocks [E, rows, K/32, 16]
            w13, s13 = draw_mxfp4((e, 2 * inter, h), 1 / math.sqrt(h), g)
            w2, s2 = draw_mxfp4((e, h, inter), 0.5 / math.sqrt(inter), g)
            yield m + "experts.gate_up_proj_blocks", w13.view(e, 2 * inter, h // 32, 16)
            yield m + "experts.gate_up_proj_scales", s13
            yield m + "experts.down_proj_blocks", w2.view(e, h, inter // 32, 16)
            yield m + "experts.down_proj_scales", s2
            continue
        for j in range(e):
            x = m + f"experts.{j}."
            for name, shape, std in (
                ("gate_proj", (inter, h), 1 / math.sqrt(h)),
                ("up_proj", (inter, h), 1 / math.sqrt(h)),
                ("down_proj", (h, inter), 0.5 / math.sqrt(inter)),
            ):
                q, s = random_mxfp4(shape, std, g)
                yield x + name + ".weight", dequantize_mxfp4(q, s, dtype)
    yield "model.norm.weight", ones(h)
    yield "lm_head.weight", lin(cfg["vocab_size"], h, 3.0)


def random_tensors(
    cfg: dict[str, Any], seed: int, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``make_model(..., mxfp4=True, seed=seed)`` writes for config ``cfg``, drawn
    on ``device`` instead of read from a disk (``EngineConfig.random_weights_seed``): the same
    values on CPU; on a GPU its own generator's, the same on every GPU of one model (the
    kernels' grid, and so the draw, depends on the SM count), as each rank draws every tensor
    whole in the same order. An fp8 config gets its projections as
    ``fp8=True`` stores them, its routed experts still as MXFP4 codes."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES.get(str(cfg.get("torch_dtype")), torch.bfloat16)
    fp8 = (cfg.get("quantization_config") or {}).get("quant_method") == "fp8"
    yield from _tensors(cfg, g, dtype, mxfp4=True, fp8=fp8)


def make_model(
    out: str | Path,
    preset: str = "tiny",
    *,
    mxfp4: bool = False,
    fp8: bool = False,
    dtype: str = "bfloat16",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    weights: bool = True,
) -> Path:
    """Write config, tokenizer and random weights into ``out``; returns the directory.
    ``weights=False`` writes config and tokenizer alone, for engines that draw the weights at
    load (``random_tensors``), as the mxfp4 checkpoint of this seed would hold them."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported checkpoint dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if mxfp4 and fp8:
        raise ValueError("choose one of mxfp4 (experts pre-quantized) and fp8 (every linear)")
    gpt_oss = preset in GPT_OSS_PRESETS
    if gpt_oss and fp8:
        raise ValueError(f"preset {preset!r} has no fp8 format; GPT-OSS ships mxfp4 experts")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = preset_config(preset, overrides)
    n_tok = train_tokenizer(
        out,
        vocab_size=1024 if preset.endswith("tiny") else 4096,
        max_length=cfg["max_position_embeddings"],
        style="harmony" if gpt_oss else "deepseek",
    )
    if gpt_oss:  # the tokenizer's ids: GPT-OSS stops at <|return|> and <|call|>
        cfg.update(harmony_ids(out))
    if cfg["vocab_size"] is None:
        cfg["vocab_size"] = n_tok
    if cfg["vocab_size"] < n_tok:
        raise ValueError(f"vocab_size {cfg['vocab_size']} is smaller than the tokenizer's {n_tok}")
    cfg["torch_dtype"] = dtype
    if mxfp4 or not (weights or fp8):
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
        if gpt_oss:  # as the released checkpoints name them
            cfg["quantization_config"]["modules_to_not_convert"] = [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ]
    if fp8:  # DeepSeek-V3's own, word for word
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg["eos_token_id"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if not weights:
        return out

    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    # a full shard is written on a thread of its own while the next one is drawn (at most one
    # shard waits for the disk, so memory holds two)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        writing: Future | None = None

        def flush() -> None:
            nonlocal shard, size, writing
            name = f"model-{len(files) + 1:05d}.safetensors"
            if writing is not None:
                writing.result()  # raises what the write raised
            writing = writer.submit(save_file, shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

        for name, tensor in _tensors(cfg, g, DTYPES[dtype], mxfp4, fp8):
            nbytes = tensor.numel() * tensor.element_size()
            if size and size + nbytes > SHARD_BYTES:
                flush()
            shard[name] = tensor.contiguous()
            size += nbytes
        flush()
        writing.result()
    total = sum((out / f).stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def harmony_ids(tokenizer_dir: Path) -> dict[str, Any]:
    """config.json's token ids of a harmony tokenizer: GPT-OSS generation ends at <|return|>
    (the final answer), <|call|> (a tool call) or <|endoftext|>, as its generation_config."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    return {
        "bos_token_id": ids["<|startoftext|>"],
        "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
