"""The MLA tile sweep needs a GPU; on CPU it says so. Its candidates include tiles an SM120
GPU can run (99 KB of shared memory per block) at both head counts, which its comparison needs."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench.mla_decode_tiles import CANDIDATES, main
from pdserve.kernels.triton_configs import MLA_DECODE, mla_decode_smem


def test_candidates_hold_the_shipped_tiles_and_some_that_fit_sm120():
    for heads, cands in CANDIDATES.items():
        cfgs = [dict(BLOCK_H=h, BLOCK_N=n, num_warps=w, num_stages=s) for h, n, w, s in cands]
        assert any(mla_decode_smem(c, 576) <= 99 * 1024 for c in cfgs), heads
        assert all(c["BLOCK_H"] <= heads for c in cfgs)
    shipped = MLA_DECODE["sm90"][16]
    assert (16, shipped["BLOCK_N"], shipped["num_warps"], shipped["num_stages"]) in CANDIDATES[16]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
def test_without_a_gpu_it_says_so():
    with pytest.raises(SystemExit, match="need a CUDA GPU"):
        main([])


def test_a_table_wider_than_the_cache_holds_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--table-tokens", "40000"])
    assert "--table-tokens 40000 is outside [0, 32768]" in capsys.readouterr().err


def test_head_counts_without_candidates_and_contexts_past_the_cache_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--heads", "32"])
    assert "--heads [32]: candidates exist for [16, 128]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--contexts", "1024,65536"])
    assert "multiples of 64 in [64, 32768]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--contexts", "100"], "multiples of 64"),
        (["--batches", "256", "--contexts", "32768"], "more than the cache's 65536"),
    ],
)
def test_a_grid_the_cache_cannot_hold_is_refused(bad, says, capsys):
    with pytest.raises(SystemExit):
        main(bad)
    assert says in capsys.readouterr().err
