"""Shared fixtures: tiny random checkpoints made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite starts and stops Ray many times in one process. One CI run died with SIGSEGV right
# after a driver's ray.shutdown() whose log shows Ray's metric-export threads still running past
# the core worker's destruction (Ray has had such crashes: ray-project/ray#36885). pdserve's own
# metrics do not use Ray's; the tests turn Ray's collection off, for the drivers and the
# workers they start.
os.environ.setdefault("RAY_enable_metrics_collection", "0")

# Without CUDA, Triton kernels run under the interpreter on CPU tensors. TRITON_INTERPRET is read
# when @triton.jit decorates a function, so it is set here, before any test imports a kernel.
HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.runtime.interpreter as _interpreter

    # numpy >= 2.4 refuses int() of a size-1 array, which the Triton 3.6 interpreter does for
    # run-time loop bounds (triton-lang/triton#9171); apply the upstream one-line fix
    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patched(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _patched


@pytest.fixture
def tests_importable(tmp_path, monkeypatch):
    """Put ``tests`` on sys.path (for processes this test spawns, which import their target by
    its module's name) through a folder that holds only a link to it: the repository root
    itself would expose the rooms' folders under their own names."""
    root = tmp_path / "tests-root"
    root.mkdir()
    (root / "tests").symlink_to(Path(__file__).resolve().parent)
    monkeypatch.syspath_prepend(str(root))


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if HAS_CUDA else 0
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


FP8_OVERRIDES = {"hidden_size": 160, "q_lora_rank": 128}  # q_a: whole row blocks, stacked FP8

YARN_OVERRIDES = {
    "q_lora_rank": None,
    "max_position_embeddings": 4096,
    "rope_scaling": {
        "type": "yarn",
        "factor": 8,
        "original_max_position_embeddings": 512,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
    },
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The ``tiny`` preset: q_lora_rank set, plain rope, bf16 weights."""
    from pdserve.cluster.checkpoint_maker import make_model

    return str(make_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0))


@pytest.fixture(scope="session")
def fp8_model(tmp_path_factory) -> str:
    """``tiny`` in DeepSeek's release format: every projection float8 E4M3 with 128x128 block
    scales (hidden 160: partial blocks at every edge but q_a_proj's 128 rows, which stack with
    kv_a_proj_with_mqa's 80 in FP8), written by ``make-model --fp8``."""
    from pdserve.cluster.checkpoint_maker import make_model

    path = tmp_path_factory.mktemp("fp8")
    return str(make_model(path, "tiny", fp8=True, dtype="float32", seed=5, overrides=FP8_OVERRIDES))


@pytest.fixture(scope="session")
def fp8_model_dequantized(fp8_model, tmp_path_factory) -> str:
    """``fp8_model`` dequantized to float32 by this fixture's own arithmetic (one Kronecker
    product per weight, not the loader's code), without its quantization_config: what
    transformers loads as the reference."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("fp8-dequantized")
    src = Path(fp8_model)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors[name + "_scale_inv"]
            full = torch.kron(scale, torch.ones(128, 128))[: t.shape[0], : t.shape[1]]
            t = t.float() * full
        out[name] = t.contiguous()
    save_file(out, str(dst / "model.safetensors"))
    return str(dst)


@pytest.fixture(scope="session")
def yarn_model(tmp_path_factory) -> str:
    """``tiny`` with q_lora_rank null and YaRN (mscale != mscale_all_dim), float32 weights."""
    from pdserve.cluster.checkpoint_maker import make_model

    path = tmp_path_factory.mktemp("yarn")
    return str(make_model(path, "tiny", dtype="float32", seed=3, overrides=YARN_OVERRIDES))


GPT_OSS_WINDOW = 6  # tokens a sliding layer sees: prompts run both shorter and longer


def write_hf_gpt_oss(out: Path, seed: int = 0) -> str:
    """A small GPT-OSS checkpoint written by transformers (``save_pretrained``) in float32:
    sliding layers of ``GPT_OSS_WINDOW`` tokens, random sinks and biases, experts whose values
    MXFP4 represents exactly (the engine stores them as MXFP4), scaled so greedy choices are
    not near-ties; the project's trained tokenizer beside it."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from pdserve.cluster.tokenizer_trainer import train_tokenizer
    from pdserve.kernels.mxfp4 import dequantize_mxfp4, random_mxfp4

    vocab = train_tokenizer(out, vocab_size=512)
    cfg = GptOssConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, head_dim=16,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=GPT_OSS_WINDOW,
        max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 32},  # YaRN within the prompts
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    model = GptOssForCausalLM(cfg).eval()

    def mx(shape: tuple[int, int], std: float) -> torch.Tensor:
        return dequantize_mxfp4(*random_mxfp4(shape, std, g), torch.float32)

    h, i = cfg.hidden_size, cfg.intermediate_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj"):  # [E, H, 2I]: gate/up interleaved
                for e in range(p.shape[0]):
                    p[e, :, 0::2], p[e, :, 1::2] = mx((i, h), h**-0.5).T, mx((i, h), h**-0.5).T
            elif name.endswith("experts.down_proj"):  # [E, I, H]
                for e in range(p.shape[0]):
                    p[e] = mx((h, i), 0.5 * i**-0.5).T
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks") or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "sinks" in name else 0.3))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # projections, the router, the LM head: [out, in]
                gain = 3.0 if "lm_head" in name else 2.0 if "router" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[1] ** 0.5)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def gpt_oss_model(tmp_path_factory) -> str:
    return write_hf_gpt_oss(tmp_path_factory.mktemp("gpt-oss"))
