"""Backend selection per device and role, with the faked GPUs of kernels.device."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import pytest

from pdserve.kernels import REGISTRY, KernelSet, Registry, triton_configs
from pdserve.kernels.device import B200, H100, H200, RTX_PRO_6000, DeviceInfo
from pdserve.kernels.registry import OPS

GPUS = {"sm90": H100, "sm100": B200, "sm120": RTX_PRO_6000}
GLUE = ("rms_norm", "rope", "silu_mul", "mla_kv_write", "grouped_topk", "topk_softmax")
DEFAULT_ON_GPU = {op: "triton" for op in OPS}
# Hopper's MoE default: the same kernels on experts in the MMA-fragment layout
MOE_ON_SM90 = {"moe_small": "triton_interleaved", "moe_large": "triton_interleaved"}
# the dense linear for few rows: measured faster than cuBLAS on Hopper alone
CUBLAS_LINEAR = {"linear": "torch"}


# backends whose probe looks for a library or a GPU feature: absent in these tests unless a test
# says otherwise, so a machine that has them picks as one that does not
PROBED = ("flashinfer_cutlass", "flashinfer_fa3", "scaled_mm")
REAL_BACKENDS = {op: list(bs) for op, bs in REGISTRY.backends.items()}


@pytest.fixture(autouse=True)
def _probed_backends_absent(monkeypatch):
    for op, bs in REAL_BACKENDS.items():
        absent = [
            dataclasses.replace(b, unavailable=lambda: "absent in these tests")
            if b.name in PROBED
            else b
            for b in bs
        ]
        monkeypatch.setitem(REGISTRY.backends, op, absent)


def names(device: DeviceInfo, role: str, registry: Registry = REGISTRY) -> dict[str, str]:
    return {op: registry.select(op, device, role).backend.name for op in OPS}


def with_available(prefix: str) -> Registry:
    """The registry as these tests hold it, except that the backends named ``prefix...`` report
    they can run."""
    reg = Registry()
    for op in OPS:
        for b in REGISTRY.backends[op]:
            if b.name.startswith(prefix):
                b = dataclasses.replace(b, unavailable=lambda: None)
            reg.register(b)
    return reg


def with_flashinfer_available() -> Registry:
    return with_available("flashinfer")


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_cpu_gets_torch_everywhere(role):
    assert set(names(DeviceInfo.cpu(), role).values()) == {"torch"}
    lost = dict(REGISTRY.select("mla_decode", DeviceInfo.cpu(), role).rejected)
    assert lost["triton"] == "needs a cuda device, worker has cpu"


@pytest.mark.parametrize("gpu", GPUS.values(), ids=GPUS.keys())
@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_triton_beats_torch_on_every_gpu(gpu, role):
    # FlashInfer is not installed here, so Triton wins moe_large too
    assert names(gpu, role) == DEFAULT_ON_GPU | (MOE_ON_SM90 if gpu.sm == 90 else CUBLAS_LINEAR)


def test_glue_kernels_are_triton_on_gpus_and_torch_when_named():
    ks = KernelSet.resolve(H100, "decode")
    assert ks.rms_norm.__name__ == "rms_norm_triton" and ks.rope.__name__ == "rope_triton"
    assert ks.grouped_topk.__name__ == "grouped_topk_triton"
    assert ks.topk_softmax.__name__ == "topk_softmax_triton"
    assert ks.mla_kv_write.__name__ == "mla_kv_write_triton"
    assert ks.silu_mul.__name__ == "silu_mul_triton"
    ks = KernelSet.resolve(H100, "decode", overrides={op: "torch" for op in GLUE})
    assert {op: ks.names()[op] for op in GLUE} == {op: "torch" for op in GLUE}


def test_triton_configs_fit_sm120_shared_memory():
    for op in OPS:
        triton = next(b for b in REGISTRY.backends[op] if b.name == "triton")
        assert triton.min_smem <= RTX_PRO_6000.smem_per_block, op
        staged = op not in GLUE  # no tiles in shared memory
        assert (triton.min_smem > 0) == staged, op
    small_smem = dataclasses.replace(RTX_PRO_6000, smem_per_block=48 * 1024)
    choice = REGISTRY.select("mla_decode", small_smem, "decode")
    assert choice.backend.name == "torch"
    assert "shared memory per block" in dict(choice.rejected)["triton"]


def test_flashinfer_moe_runs_on_sm90_prefill_when_named_and_available():
    """Measured slower than the Triton grouped MoE at prefill sizes, it is below it: a prefill
    pool takes it by name; it runs nowhere else."""
    reg = with_flashinfer_available()
    for gpu in (H100, H200):
        assert names(gpu, "prefill", reg)["moe_large"] == "triton_interleaved"
        picked = reg.select("moe_large", gpu, "prefill", override="flashinfer_cutlass")
        assert picked.backend.name == "flashinfer_cutlass" and picked.reason == "override"
    for gpu in (B200, RTX_PRO_6000):  # sm_90a code does not run on Blackwell
        with pytest.raises(ValueError, match="built for sm_90 and below"):
            reg.select("moe_large", gpu, "prefill", override="flashinfer_cutlass")
    # without the package, naming it says why
    with pytest.raises(ValueError, match="flashinfer"):
        REGISTRY.select("moe_large", H100, "prefill", override="flashinfer_cutlass")


def test_overrides():
    assert REGISTRY.select("moe_small", H100, "decode", override="torch").backend.name == "torch"
    assert REGISTRY.select("moe_small", H100, "decode", override="torch").reason == "override"
    with pytest.raises(ValueError, match="names no backend"):
        REGISTRY.select("moe_small", H100, "decode", override="cutlass")
    with pytest.raises(ValueError, match="cannot run here: needs a cuda device"):
        REGISTRY.select("mla_decode", DeviceInfo.cpu(), "decode", override="triton")
    with pytest.raises(ValueError, match="built for sm_90"):
        with_flashinfer_available().select(
            "moe_large", B200, "prefill", override="flashinfer_cutlass"
        )
    # an override may take a backend outside its roles
    reg = with_flashinfer_available()
    picked = reg.select("moe_large", H100, "decode", override="flashinfer_cutlass")
    assert picked.backend.name == "flashinfer_cutlass"


def test_flashinfer_mla_decode_is_sm90_decodes_default_when_available():
    """FlashInfer's fa3 MLA decode (wgmma: sm_90a alone, bf16) wins on SM90 decode and
    colocated workers where it can run; prefill workers, other GPUs, float32 and a worker that
    names the Triton kernel keep Triton; without FlashInfer, Triton (the other tests)."""
    reg = with_flashinfer_available()
    for gpu in (H100, H200):
        for role in ("decode", "colocated"):
            assert reg.select("mla_decode", gpu, role, dtype="bfloat16").backend.name == (
                "flashinfer_fa3"
            )
            named = reg.select("mla_decode", gpu, role, override="triton", dtype="bfloat16")
            assert named.backend.name == "triton"
        assert reg.select("mla_decode", gpu, "prefill").backend.name == "triton"
        lost = dict(reg.select("mla_decode", gpu, "decode", dtype="float32").rejected)
        assert lost["flashinfer_fa3"] == "computes in bfloat16, not float32"
    for gpu in (B200, RTX_PRO_6000):
        assert reg.select("mla_decode", gpu, "decode").backend.name == "triton"
    if importlib.util.find_spec("flashinfer") is None:  # the probe says why it lost
        fa3 = next(b for b in REAL_BACKENDS["mla_decode"] if b.name == "flashinfer_fa3")
        assert fa3.unavailable() == "flashinfer is not installed"


def test_cublas_fp8_linear_is_sm90_bf16s_default_when_available():
    """cuBLAS's block-scaled GEMM (torch._scaled_mm, sm_90 only) wins linear_fp8 for bf16 on
    Hopper in every role; float32, other GPUs and a worker naming Triton keep the Triton GEMM."""
    reg = with_available("scaled_mm")
    for gpu in (H100, H200):
        for role in ("prefill", "decode", "colocated"):
            assert reg.select("linear_fp8", gpu, role, dtype="bfloat16").backend.name == (
                "scaled_mm"
            )
        assert reg.select("linear_fp8", gpu, "decode", dtype="float32").backend.name == "triton"
        named = reg.select("linear_fp8", gpu, "decode", override="triton", dtype="bfloat16")
        assert named.backend.name == "triton"
    for gpu in (B200, RTX_PRO_6000):
        assert reg.select("linear_fp8", gpu, "decode", dtype="bfloat16").backend.name == "triton"
    if DeviceInfo.detect().kind == "cpu":  # the probe says why it cannot run
        cublas = next(b for b in REAL_BACKENDS["linear_fp8"] if b.name == "scaled_mm")
        assert cublas.unavailable() == "no CUDA device"


def test_kernel_set_loads_triton_and_the_measured_crossover(monkeypatch):
    monkeypatch.setitem(triton_configs.MOE_CROSSOVER_M, H100.name, 48)
    ks = KernelSet.resolve(H100, "decode")
    assert ks.names() == DEFAULT_ON_GPU | MOE_ON_SM90
    assert ks.moe_crossover_m == 48
    assert ks.moe_small_fn.__name__ == "moe_small_triton"
    assert ks.mla_decode.__name__ == "mla_decode_triton"
    assert KernelSet.resolve(B200, "decode").moe_crossover_m == 64  # no entry: the default
    assert KernelSet.resolve(H200, "decode").moe_crossover_m == 1024  # listed too
    assert KernelSet.resolve(H100, "decode", moe_crossover_m=8).moe_crossover_m == 8
    with pytest.raises(ValueError, match="unknown ops"):
        KernelSet.resolve(H100, "decode", overrides={"moe": "torch"})


def test_import_kernels_does_not_load_triton_kernels():
    code = (
        "import sys, pdserve.kernels; "
        "mods = [m for m in sys.modules if m.startswith('pdserve.kernels.') and 'triton' in m "
        "and m != 'pdserve.kernels.triton_configs']; "
        "assert not mods, mods; assert 'triton' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


def test_dtype_a_backend_does_not_compute_in_falls_back_to_torch():
    from pdserve.kernels import KernelSet
    from pdserve.kernels.device import H100

    names = KernelSet.resolve(H100, "decode", dtype="bfloat16").names()
    assert names["moe_small"] == "triton_interleaved" and names["mla_decode"] == "triton"
    assert KernelSet.resolve(H100, "decode", dtype="float32").names()["moe_small"] == "triton"
    ks = KernelSet.resolve(H100, "decode", dtype="float64")
    assert set(ks.names().values()) == {"torch"}
    assert "not float64" in ks.choices[0].describe()
    with pytest.raises(ValueError, match="cannot run here: computes in"):
        KernelSet.resolve(H100, "decode", {"mla_decode": "triton"}, dtype="float64")


def test_only_triton_decode_kernels_are_graph_safe():
    decode_ops = ("mla_decode", "moe_small", "moe_large")
    assert KernelSet.resolve(H100, "decode").not_graph_safe(decode_ops) == {}
    ks = KernelSet.resolve(H100, "decode", {"mla_decode": "torch"})
    assert ks.not_graph_safe(decode_ops) == {"mla_decode": "torch"}
    on_cpu = KernelSet.resolve(DeviceInfo.cpu(), "decode")
    assert on_cpu.not_graph_safe(decode_ops) == dict.fromkeys(decode_ops, "torch")


def test_ops_a_model_never_runs_are_picked_without_their_probes():
    """A model without FP8 weights does not pay cuBLAS's trial GEMM at start-up; an op it runs
    still probes."""
    probed: list[str] = []

    def probe(name):
        return lambda: probed.append(name) or None

    reg = Registry()
    for op in OPS:
        for b in REGISTRY.backends[op]:
            probed_b = dataclasses.replace(b, unavailable=probe(b.name))
            reg.register(probed_b if b.name in PROBED else b)
    kernels = KernelSet.resolve(H100, "decode", registry=reg, dtype="bfloat16",
                                unused=("linear_fp8",))  # fmt: skip
    assert "scaled_mm" not in probed and "flashinfer_fa3" in probed
    (fp8,) = [c for c in kernels.choices if c.op == "linear_fp8"]
    assert fp8.backend.name == "scaled_mm" and fp8.reason.startswith("unused by the model")


def test_moe_backends_agree_on_the_layout_of_the_codes():
    """The fragment layout on Hopper in bf16, plain codes elsewhere; the Triton kernels read
    either; beside a backend named for plain codes the other MoE op follows it; two named
    backends that disagree are refused."""
    assert KernelSet.resolve(H100, "decode", dtype="bfloat16").moe_codes == "interleaved"
    assert KernelSet.resolve(H100, "decode", dtype="float32").moe_codes == "plain"
    assert KernelSet.resolve(B200, "decode", dtype="bfloat16").moe_codes == "plain"
    assert KernelSet.resolve(DeviceInfo.cpu(), "decode").moe_codes == "plain"
    small = KernelSet.resolve(H100, "decode", {"moe_large": "triton"})
    assert small.moe_codes == "interleaved" and small.names()["moe_small"] == "triton_interleaved"
    mixed = {"moe_small": "triton_interleaved", "moe_large": "torch"}  # the reference reads both
    assert KernelSet.resolve(H100, "decode", mixed).moe_codes == "interleaved"
    reg = with_flashinfer_available()
    cutlass = KernelSet.resolve(H100, "prefill", {"moe_large": "flashinfer_cutlass"}, registry=reg)
    assert cutlass.moe_codes == "plain" and cutlass.names()["moe_small"] == "triton"
    (small_choice,) = [c for c in cutlass.choices if c.op == "moe_small"]
    assert "reads interleaved MXFP4 codes" in dict(small_choice.rejected)["triton_interleaved"]
    with pytest.raises(ValueError, match="moe_small=triton_interleaved reads interleaved"):
        KernelSet.resolve(
            H100,
            "prefill",
            {"moe_small": "triton_interleaved", "moe_large": "flashinfer_cutlass"},
            registry=reg,
        )
    assert REGISTRY.select("moe_small", H200, "decode").backend.name == "triton_interleaved"
