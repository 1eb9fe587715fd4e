"""The ahead-of-time build of FlashInfer's MoE module: its parts that need no FlashInfer.

The build itself (nvcc, about 25 minutes on 2 cores) is run by ``pdserve build-kernels``; its
module is checked on the GPU by ``bench.flashinfer_check`` and the FlashInfer e2e test.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from pdserve.kernels import flashinfer_aot as aot
from pdserve.kernels import moe_flashinfer


def _fake_spec_sources(tmp_path: Path) -> list[Path]:
    """A stock-like source list: the fixed units, unrelated units and generated files of which
    two hold the bf16 x fp4 launcher."""
    out = []
    for name in (
        *aot.FIXED_SOURCES,
        "moe_gemm_kernels_fp8_fp8.cu",
        "moe_gemm_kernels_fp16_fp16.cu",
    ):
        out.append(tmp_path / "csrc" / name)
    gen = tmp_path / "generated"
    gen.mkdir(parents=True)
    bodies = {
        "g_M64_Mixed_group15.generated.cu": f"template void {aot.MIXED_LAUNCHER}, float>();",
        "g_M128_Mixed_group27.generated.cu": f"{aot.MIXED_LAUNCHER}, half>",
        "g_M128_Mixed_group1.generated.cu": "sm90_generic_mixed_moe_gemm_kernelLauncher<half, u4>",
        "g_M128_group3.generated.cu": "sm90_generic_moe_gemm_kernelLauncher<__nv_bfloat16>",
    }
    for name, body in bodies.items():
        (gen / name).write_text(body)
        out.append(gen / name)
    return out


def test_select_sources_keeps_the_fixed_units_and_the_bf16_fp4_launchers(tmp_path):
    picked = aot.select_sources(_fake_spec_sources(tmp_path))
    names = [p.name for p in picked]
    assert names[: len(aot.FIXED_SOURCES)] == list(aot.FIXED_SOURCES)
    assert names[len(aot.FIXED_SOURCES) :] == [
        "g_M128_Mixed_group27.generated.cu",
        "g_M64_Mixed_group15.generated.cu",
    ]


def test_select_sources_names_what_a_changed_layout_lacks(tmp_path):
    sources = [p for p in _fake_spec_sources(tmp_path) if p.name != "lora.cpp"]
    with pytest.raises(RuntimeError, match="lora.cpp"):
        aot.select_sources(sources)
    no_launcher = [p for p in _fake_spec_sources(tmp_path / "b") if "Mixed_group1" not in p.name]
    no_launcher = [p for p in no_launcher if "group15" not in p.name and "group27" not in p.name]
    with pytest.raises(RuntimeError, match="no generated source"):
        aot.select_sources(no_launcher)


def test_parse_version():
    assert aot.parse_version("0.6.13") == (0, 6, 13)
    assert aot.parse_version("0.6.13.post2") == (0, 6, 13)
    assert aot.parse_version("/usr/local/cuda-13.0") == (13, 0)
    assert aot.SUPPORTED[0] <= aot.parse_version("0.6.13") <= aot.SUPPORTED[1]
    assert not aot.parse_version("0.7.4") <= aot.SUPPORTED[1]


def _toolkit(root: Path, runtime_header: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text(
        "#!/bin/sh\necho 'Cuda compilation tools, release 12.9, V12.9.1'\n"
    )
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include").mkdir()
    if runtime_header:
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_find_cuda_home_needs_nvcc_and_the_runtime_headers(tmp_path):
    good = _toolkit(tmp_path / "cuda-12.9")
    half = _toolkit(tmp_path / "wrapper", runtime_header=False)
    env = {"CUDA_HOME": str(half), "CUDA_PATH": str(good), "PATH": ""}
    assert aot.find_cuda_home(env) == good
    assert aot.nvcc_version(good) == (12, 9)


def test_find_cuda_home_takes_the_newest_local_toolkit_and_says_where_it_looked(tmp_path):
    env = {"CUDA_HOME": str(tmp_path / "none"), "PATH": str(tmp_path)}
    with pytest.raises(RuntimeError, match="no nvcc found.*CUDA_HOME"):
        aot.find_cuda_home(env, local=tmp_path)
    _toolkit(tmp_path / "cuda-12.8")
    newest = _toolkit(tmp_path / "cuda-12.10")
    assert aot.find_cuda_home(env, local=tmp_path) == newest


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_lib_dir_links_nvrtc_and_stubs_the_driver_with_its_soname(tmp_path):
    wheel = tmp_path / "nvidia" / "cu13"
    (wheel / "lib").mkdir(parents=True)
    (wheel / "lib" / "libnvrtc.so.13").write_text("")
    (wheel / "lib" / "libnvrtc-builtins.so.13.0").write_text("")
    cuda = _toolkit(tmp_path / "cuda")
    (cuda / "lib64").mkdir()
    lib = aot.make_lib_dir(tmp_path / "work", [wheel], cuda)
    assert (lib / "libnvrtc.so").resolve() == (wheel / "lib" / "libnvrtc.so.13").resolve()
    if not Path("/usr/lib64/libcuda.so").exists():
        dyn = subprocess.run(
            ["readelf", "-d", str(lib / "libcuda.so")], capture_output=True, text=True
        )
        if dyn.returncode == 0:
            assert "libcuda.so.1" in dyn.stdout
        assert (lib / "libcuda.so").stat().st_size > 0


def test_lib_dir_without_nvrtc_says_what_to_install(tmp_path):
    cuda = _toolkit(tmp_path / "cuda")
    (cuda / "lib64").mkdir()
    with pytest.raises(RuntimeError, match="nvidia-cuda-nvrtc"):
        aot.make_lib_dir(tmp_path / "work", [], cuda)


def test_build_env_points_flashinfer_at_the_work_folder(tmp_path):
    tools = aot.Toolchain(tmp_path, (13, 0), (tmp_path / "inc",), tmp_path / "lib")
    env = aot.build_env(tmp_path / "w", tools, 3)
    assert env["FLASHINFER_WORKSPACE_BASE"] == str(tmp_path / "w")
    assert env["FLASHINFER_CUDA_ARCH_LIST"] == "9.0a" and env["MAX_JOBS"] == "3"
    assert f"-I{tmp_path / 'inc'}" in env["FLASHINFER_EXTRA_CUDAFLAGS"]
    assert f"-L{tmp_path / 'lib'}" in env["FLASHINFER_EXTRA_LDFLAGS"]
    assert aot.default_jobs() >= 1


@pytest.mark.skipif(
    importlib.util.find_spec("flashinfer") is not None, reason="flashinfer is installed here"
)
def test_build_without_flashinfer_says_how_to_install_it():
    with pytest.raises(RuntimeError, match="pip install --no-deps flashinfer-python"):
        aot.build()
    reason = moe_flashinfer.unavailable()
    assert reason is not None and "flashinfer" in reason


def test_the_cli_reports_a_failed_build(monkeypatch, capsys):
    from pdserve.deploy import cli

    def fail(**kwargs):
        raise RuntimeError("no nvcc found (looked in ...)")

    monkeypatch.setattr(aot, "build", fail)
    assert cli.main(["build-kernels", "--jobs", "1"]) == 1
    assert "build-kernels failed: no nvcc found" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("ninja") is None, reason="no ninja")
def test_run_ninja_logs_each_unit_and_raises_the_tail_of_a_failure(tmp_path):
    (tmp_path / "a.cu").write_text("x")
    rules = "rule cc\n  command = cp $in $out && true -c $in\n"
    (tmp_path / "build.ninja").write_text(rules + "build a.o: cc a.cu\ndefault a.o\n")
    lines: list[str] = []
    aot.run_ninja(tmp_path, 1, lines.append)
    assert (tmp_path / "a.o").read_text() == "x"
    assert len(lines) == 1 and lines[0].startswith("[1/1] a.cu (")
    assert "cp" in (tmp_path / "build.log").read_text()
    rules = "rule cc\n  command = echo broken header && false -c $in\n"
    (tmp_path / "build.ninja").write_text(rules + "build b.o: cc a.cu\ndefault b.o\n")
    with pytest.raises(RuntimeError, match="ninja failed(.|\n)*broken header"):
        aot.run_ninja(tmp_path, 1, lines.append)
