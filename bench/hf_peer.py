"""Hugging Face transformers' own generation on our checkpoint: the decode-throughput peer.

    python -m pdserve.bench.hf_peer --model /data/dsv2-lite --batches 1,8,32,64 \
        --ours bench/results/decode-step-NVIDIA_H200.json

Builds transformers' ``DeepseekV3ForCausalLM`` in bf16 on the GPU from the same directory our
engine serves, MXFP4 experts dequantized to bf16 (exactly: MXFP4 values are bf16 values), and
times ``generate`` (greedy, static batch: transformers has no continuous batching for this
model) with its fastest expert implementation that runs. Decode throughput at batch B is
B * (N - 1) / (T(N) - T(1)): N new tokens against one, so prefill cancels out. With ``--ours``
(bench.decode_step's JSON, same batches and context) it prints our throughput as a ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pdserve.bench.result_file import write_result
from pdserve.kernels.mxfp4 import dequantize_mxfp4


def _dequantized(raw: dict[str, torch.Tensor], prefix: str, name: str) -> torch.Tensor:
    blocks = raw.pop(f"{prefix}.experts.{name}_blocks")  # [E, rows, K/32, 16]
    scales = raw.pop(f"{prefix}.experts.{name}_scales")  # [E, rows, K/32]
    return dequantize_mxfp4(blocks.flatten(-2), scales, torch.bfloat16)  # [E, rows, K]


def _stacked(raw: dict[str, torch.Tensor], prefix: str, name: str) -> torch.Tensor:
    n = sum(1 for k in raw if k.startswith(prefix) and k.endswith(f".{name}.weight"))
    return torch.stack([raw.pop(f"{prefix}.experts.{j}.{name}.weight") for j in range(n)])


def _state_dict(path: Path, device: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under transformers' names: per-layer experts fused as
    ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and ``experts.down_proj``."""
    out: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt", device=device) as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                (raw if ".experts." in k else out)[k] = st.get_tensor(k)
    for prefix in sorted({k.split(".experts.")[0] for k in raw}):
        if f"{prefix}.experts.gate_up_proj_blocks" in raw:  # pre-quantized, GPT-OSS layout
            w13 = _dequantized(raw, prefix, "gate_up_proj")  # rows interleave gate, up
            gate_up = torch.cat((w13[:, 0::2], w13[:, 1::2]), 1)
            down = _dequantized(raw, prefix, "down_proj")
        else:  # per-expert tensors
            gate_up = torch.cat(
                (_stacked(raw, prefix, "gate_proj"), _stacked(raw, prefix, "up_proj")), 1
            )
            down = _stacked(raw, prefix, "down_proj")
        out[f"{prefix}.experts.gate_up_proj"] = gate_up
        out[f"{prefix}.experts.down_proj"] = down
    assert not raw, sorted(raw)[:4]
    return out


def load(path: Path, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> tuple[Any, str]:
    """transformers' model of the checkpoint and the expert implementation it runs with."""
    from transformers import AutoConfig, DeepseekV3ForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # our MXFP4 layout; transformers gets dequantized experts
    state = {
        k: v.to(dtype) if v.is_floating_point() and "correction_bias" not in k else v
        for k, v in _state_dict(path, device).items()
    }
    for impl in ("grouped_mm", "batched_mm", "eager"):
        try:
            with torch.device(device):
                model = DeepseekV3ForCausalLM._from_config(
                    config, dtype=dtype, experts_implementation=impl
                )
        except (TypeError, ValueError):
            continue
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "rotary" not in k]
        assert not missing and not unexpected, (missing[:5], unexpected[:5])
        model.eval()
        try:
            model.generate(torch.ones(2, 8, dtype=torch.long, device=device), max_new_tokens=2)
        except (RuntimeError, NotImplementedError):
            del model
            continue
        return model, impl
    raise RuntimeError("no expert implementation of transformers runs this model")


def time_generate(model, batch: int, context: int, new: int, vocab: int) -> float:
    g = torch.Generator(device="cuda").manual_seed(batch)
    ids = torch.randint(4, vocab, (batch, context), device="cuda", generator=g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    assert out.shape == (batch, context + new), out.shape
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--ours", default=None, help="bench.decode_step JSON to compare with")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model, impl = load(Path(args.model))
    vocab = model.config.vocab_size
    time_generate(model, 1, args.context, 3, vocab)  # warm-up
    ours = {}
    if args.ours and Path(args.ours).is_file():
        mine = json.loads(Path(args.ours).read_text())
        ours = {r["batch"]: r["tokens_per_s"] for r in mine.get("graphs_auto", [])}
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        one = time_generate(model, b, args.context, 1, vocab)
        full = time_generate(model, b, args.context, args.new_tokens, vocab)
        tps = b * (args.new_tokens - 1) / (full - one)
        rows.append({"batch": b, "tokens_per_s": tps, "ours_tokens_per_s": ours.get(b)})
    gpu = torch.cuda.get_device_name()
    print(f"\ntransformers {impl} experts vs ours, decode tokens/s ({gpu}, context {args.context})")
    print(f"{'batch':>6} {'transformers':>13} {'ours':>10} {'ours / hf':>10}")
    for r in rows:
        o = r["ours_tokens_per_s"]
        ratio = f"{o / r['tokens_per_s']:.2f}x" if o else "-"
        print(f"{r['batch']:>6} {r['tokens_per_s']:>13.1f} {o or 0:>10.1f} {ratio:>10}")
    import transformers

    result = {"model": args.model, "gpu": gpu, "transformers": transformers.__version__,
              "experts_implementation": impl, "context": args.context,
              "new_tokens": args.new_tokens, "rows": rows, "date": time.strftime("%Y-%m-%d"),
              "host": platform.node()}  # fmt: skip
    write_result(result, "hf-peer", gpu, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
