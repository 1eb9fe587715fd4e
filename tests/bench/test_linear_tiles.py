"""The linear tile sweep needs a GPU; on CPU it says so. Its candidates hold the shipped Hopper
tiles, and bad arguments are refused by name."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench.linear_tiles import CANDIDATES, main
from pdserve.kernels.triton_configs import SKINNY_LINEAR


def test_candidates_hold_the_shipped_tiles():
    for which, c in SKINNY_LINEAR["sm90"].items():
        tile = (c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"], c["SWAP"])
        assert tile in CANDIDATES, which


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
def test_without_a_gpu_it_says_so():
    with pytest.raises(SystemExit, match="need a CUDA GPU"):
        main([])


def test_unknown_models_rows_past_a_tile_and_malformed_tiles_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--models", "v2l,llama"])
    assert "--models ['llama']: known are" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--rows", "1,32"])
    assert "--rows (1, 32) must lie in [1, 16]" in capsys.readouterr().err
    for bad in ("32,256,4", "32,256,4,4,x"):
        with pytest.raises(SystemExit):
            main(["--tiles", bad])
        assert "five numbers each" in capsys.readouterr().err
