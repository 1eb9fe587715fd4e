"""bench.moe_splits' split sweep on a small MoE (the interpreter here): every split pair it
times is a config moe_small runs correctly, and its rows name the programs and the best pair."""

from __future__ import annotations

import torch

from pdserve.bench import kernels, moe_splits
from pdserve.bench.moe_peers import Peers
from pdserve.kernels.moe_reference import moe_mxfp4_torch
from tests.kernels.kernel_cases import rel_err


def test_every_split_pair_matches_the_reference(monkeypatch):
    monkeypatch.setattr(kernels, "DEV", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setitem(kernels.MODELS, "small", (128, 8, 2, 64))  # hidden, experts, top-k, I
    outputs = []

    def run_once(fn, *args, rep_ms=None, **kwargs):  # the sweep's timer: a run, output kept
        outputs.append((args, fn(*args, **kwargs)))
        return float(len(outputs))  # later pairs "slower": the first (unsplit) is the best

    monkeypatch.setattr(kernels, "ms_graph", run_once)
    rows = moe_splits.split_rows(["small"], (1, 3), (1, 2, 3), Peers(), copy_gbps=1.0)
    assert [r["M"] for r in rows] == [1, 3] and all(r["best"] == "1,1" for r in rows)
    assert all(len(r["times"]) == 9 for r in rows)
    assert rows[0]["programs_gemm1"] == 2 * 1 and rows[1]["programs_gemm2"] == 6 * 2
    case = kernels.moe_case("small", 3)
    for (x, _, ids, tw, act), out in outputs:  # fragment-layout experts: the plain ones' result
        m = x.shape[0]
        ref = moe_mxfp4_torch(x, case[1], ids, tw, act)
        assert torch.equal(x, case[0][:m]) and rel_err(out, ref) < 2e-2


def test_tiles_loaded_ahead_reach_the_kernel(monkeypatch):
    """``--ahead N``: the sweep's tiles carry AHEAD N without pipeline stages, and give the
    reference's result."""
    monkeypatch.setattr(kernels, "DEV", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setitem(kernels.MODELS, "small", (128, 8, 2, 64))  # hidden, experts, top-k, I
    configs = []

    def run_once(fn, *args, rep_ms=None, config=None):
        configs.append(config)
        x, w, ids, tw, act = args
        ref = moe_mxfp4_torch(x, kernels.moe_case("small", 1)[1], ids, tw, act)
        assert rel_err(fn(*args, config=config), ref) < 2e-2
        return 1.0

    monkeypatch.setattr(kernels, "ms_graph", run_once)
    moe_splits.split_rows(["small"], (1,), (1, 2), Peers(), copy_gbps=1.0, ahead=2)
    assert len(configs) == 4
    for cfg in configs:
        assert all(c["AHEAD"] == 2 and c["num_stages"] == 1 for c in cfg.values()), cfg
