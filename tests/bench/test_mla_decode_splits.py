"""The MLA split-count bench needs a GPU; on CPU it says so, after checking its grid."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench.mla_decode_splits import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
def test_without_a_gpu_it_says_so():
    with pytest.raises(SystemExit, match="need a CUDA GPU"):
        main([])


@pytest.mark.parametrize("bad", [["--table-tokens", "40000"], ["--contexts", "16"]])
def test_a_grid_past_the_cache_is_refused(bad, capsys):
    with pytest.raises(SystemExit):
        main(bad)
    assert "the cache's blocks" in capsys.readouterr().err
