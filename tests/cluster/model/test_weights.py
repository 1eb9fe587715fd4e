"""Expert checkpoints in every supported layout load to the same MXFP4 bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
from pdserve.cluster.model.moe import MXFP4Experts
from pdserve.kernels.mxfp4 import quantize_mxfp4

_EXPERT = "mlp.experts."


def _rewrite(src: str, dst: Path, convert) -> str:
    """Copy a checkpoint, passing each layer's per-expert tensors through ``convert``."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    (dst / "model.safetensors.index.json").unlink()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for name, t in tensors.items():
        if _EXPERT in name and name.split(_EXPERT)[1].split(".")[0].isdigit():
            prefix, rest = name.split(_EXPERT)
            j, proj, _ = rest.split(".")
            experts.setdefault(prefix + _EXPERT, {})[(int(j), proj)] = t
        else:
            out[name] = t
    for prefix, per in experts.items():
        out.update({prefix + k: v for k, v in convert(per).items()})
    save_file(out, str(dst / "model.safetensors"))
    return str(dst)


def _stack(per, proj):
    n = 1 + max(j for j, _ in per)
    return torch.stack([per[(j, proj)] for j in range(n)])  # [E, rows, K]


def _gpt_oss(per):
    gate, up = _stack(per, "gate_proj"), _stack(per, "up_proj")
    gate_up = torch.stack((gate, up), dim=2).flatten(1, 2)  # rows interleaved: gate j, up j
    w13, s13 = quantize_mxfp4(gate_up)
    w2, s2 = quantize_mxfp4(_stack(per, "down_proj"))
    e, rows, h2 = w13.shape
    return {
        "gate_up_proj_blocks": w13.view(e, rows, h2 // 16, 16),
        "gate_up_proj_scales": s13,
        "down_proj_blocks": w2.view(w2.shape[0], w2.shape[1], -1, 16),
        "down_proj_scales": s2,
    }


def _fused(per):
    return {
        "gate_up_proj": torch.cat((_stack(per, "gate_proj"), _stack(per, "up_proj")), dim=1),
        "down_proj": _stack(per, "down_proj"),
    }


def _engine(path: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, dtype="float32", cache=CacheConfig(block_size=16)))


def _experts(engine: LLMEngine) -> list[torch.Tensor]:
    mods = [m for m in engine.runner.model.modules() if isinstance(m, MXFP4Experts)]
    return [t for m in mods for t in (m.w13, m.s13, m.w2, m.s2)]


@pytest.mark.parametrize(
    "layout", [_gpt_oss, _fused], ids=["gpt-oss-prequantized", "transformers5-fused"]
)
def test_expert_layouts_load_to_identical_mxfp4(tiny_model, tmp_path, layout):
    base = _engine(tiny_model)
    other_path = _rewrite(tiny_model, tmp_path / "ckpt", layout)
    if layout is _gpt_oss:
        cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "mxfp4"}
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    other = _engine(other_path)
    for a, b in zip(_experts(base), _experts(other), strict=True):
        assert torch.equal(a, b)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert (
        base.generate(["weights"], sp)[0].token_ids == other.generate(["weights"], sp)[0].token_ids
    )


def test_representable_experts_survive_quantize_at_load_bit_for_bit(tiny_model):
    engine = _engine(tiny_model)
    tensors = {}
    for f in Path(tiny_model).glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    from pdserve.kernels.mxfp4 import dequantize_mxfp4

    mod = next(m for m in engine.runner.model.modules() if isinstance(m, MXFP4Experts))
    layer = next(n for n in tensors if ".experts.0.gate_proj" in n).split(".mlp")[0]
    gate = tensors[f"{layer}.mlp.experts.3.gate_proj.weight"].float()
    down = tensors[f"{layer}.mlp.experts.3.down_proj.weight"].float()
    w13, s13, w2, s2 = (t[3].cpu() for t in (mod.w13, mod.s13, mod.w2, mod.s2))
    assert torch.equal(dequantize_mxfp4(w13[: mod.inter], s13[: mod.inter]), gate)
    assert torch.equal(dequantize_mxfp4(w2, s2), down)


def test_missing_and_unknown_tensors_are_named(tiny_model, tmp_path):
    def drop_one(per):
        per = dict(per)
        del per[(5, "up_proj")]
        return {f"{j}.{p}.weight": t for (j, p), t in per.items()}

    path = _rewrite(tiny_model, tmp_path / "missing", drop_one)
    with pytest.raises(ValueError, match=r"lacks .*5\.up_proj\.weight"):
        _engine(path)

    def extra(per):
        out = {f"{j}.{p}.weight": t for (j, p), t in per.items()}
        out["0.bogus_proj.weight"] = per[(0, "up_proj")].clone()
        return out

    path = _rewrite(tiny_model, tmp_path / "extra", extra)
    with pytest.raises(ValueError, match="bogus_proj"):
        _engine(path)


def test_fp8_weights_pair_with_their_scales_in_any_order():
    from pdserve.cluster.model.weights import fp8_dequantized
    from pdserve.kernels.fp8_blocks import quantize_fp8_blocks

    a, b = torch.randn(130, 40), torch.randn(8, 200)
    (qa, sa), (qb, sb) = quantize_fp8_blocks(a), quantize_fp8_blocks(b)
    stream = [
        ("x.a.weight_scale_inv", sa),  # a scale before its weight (another shard)
        ("x.b.weight", qb),
        ("x.norm.weight", torch.ones(3)),  # passes through
        ("x.a.weight", qa),
        ("x.b.weight_scale_inv", sb),
    ]
    out = dict(fp8_dequantized(iter(stream), (128, 128)))
    assert list(out) == ["x.norm.weight", "x.a.weight", "x.b.weight"]
    assert out["x.a.weight"].dtype == torch.float32
    assert torch.allclose(out["x.a.weight"], a, rtol=1 / 16, atol=1e-2)
    with pytest.raises(
        ValueError, match=r"1 float8 weights without a weight_scale_inv \(\['y'\]\)"
    ):
        list(fp8_dequantized(iter([("y", qa)]), (128, 128)))
    e5m2 = torch.zeros(2, 2, dtype=torch.float8_e5m2)  # passed on, for the loader to refuse
    assert list(fp8_dequantized(iter([("z.weight", e5m2)]), (128, 128))) == [("z.weight", e5m2)]
    with pytest.raises(ValueError, match=r"'x.a.weight': FP8 block scales of shape \(1, 2\)"):
        list(fp8_dequantized(iter([("x.a.weight", qa), ("x.a.weight_scale_inv", sb)]), (128, 128)))


def test_fp8_checkpoint_logs_its_expert_conversion_and_needs_its_config(
    fp8_model, tmp_path, caplog
):
    with caplog.at_level("INFO", logger="pdserve.cluster.model.weights"):
        _engine(fp8_model)
    # make-model's FP8 experts hold MXFP4 values: exact (2 MoE layers x 8 experts x 3)
    assert "relative RMS error 0, largest 0, over the first 48 expert weights" in caplog.text
    bare = tmp_path / "no-config"
    shutil.copytree(fp8_model, bare)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["quantization_config"]
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="float8_e4m3fn, but config.json names no fp8"):
        _engine(str(bare))
