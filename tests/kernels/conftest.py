"""Kernel tests: without CUDA the Triton kernels run under the interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()  # the interpreter is set up in tests/conftest.py


@pytest.fixture
def device() -> torch.device:
    """Where the small-shape kernel tests run: the GPU when there is one, else the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
