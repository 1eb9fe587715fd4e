"""bench.copy_stall's summary, and its refusal to run without a GPU."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench import copy_stall


def test_quantiles_of_call_times():
    q = copy_stall.quantiles([float(x) for x in range(1, 11)])
    assert q == {"median": 5.5, "p90": 10.0, "max": 10.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path runs in its bench")
def test_without_a_gpu_it_says_so_and_fails(capsys):
    assert copy_stall.main([]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out
