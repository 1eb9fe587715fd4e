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
def yarn_model(tmp_path_factory) -> str:
    """``tiny`` with q_lora_rank null and YaRN (mscale != mscale_all_dim), float32 weights."""
    from pdserve.cluster.checkpoint_maker import make_model

    path = tmp_path_factory.mktemp("yarn")
    return str(make_model(path, "tiny", dtype="float32", seed=3, overrides=YARN_OVERRIDES))
