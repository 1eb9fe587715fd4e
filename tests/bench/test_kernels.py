"""bench.kernels' moe_small sweep candidates: each one a config the kernel runs correctly, on
plain codes and on the fragment layout."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench import kernels
from pdserve.kernels.moe_reference import SwiGLU, moe_mxfp4_torch
from pdserve.kernels.moe_triton_small_m import moe_small_triton
from tests.kernels.kernel_cases import random_moe, random_routing, rel_err

# candidates, the other GEMM's tiles, and the shapes (hidden, intermediate) they run at
LAYOUTS = {
    "plain": (kernels.SWEEP_SMALL, (16, 32, 4, 1, 0), (64, 32)),
    "fragment": (kernels.SWEEP_FRAGMENT, (64, 64, 4, 1, 0), (128, 64)),  # multiples of 64
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gemm", ["gemm1", "gemm2"])
def test_every_small_m_candidate_runs_and_matches_the_reference(gemm, layout):
    sweep, other, (h, i) = LAYOUTS[layout]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # else the interpreter
    w = random_moe(4, h, i, dtype=torch.float32, device=device)
    ids, tw = random_routing(3, 4, 2, device=device, seed=1)
    x = torch.randn(3, h, device=device)
    ref = moe_mxfp4_torch(x, w, ids, tw, SwiGLU())
    w = w.interleaved_copy() if layout == "fragment" else w
    base = kernels._tiles(other, dict(BLOCK_M=16))
    swapped = 0
    for cand in sweep[gemm]:  # with the table entry's split count kept (here 2)
        cfg = {"gemm1": base, "gemm2": base} | {gemm: kernels._tiles(cand, base | {"SPLIT_K": 2})}
        assert cfg[gemm]["SPLIT_K"] == 2
        swapped += cfg[gemm].get("SWAP", 0)
        assert rel_err(moe_small_triton(x, w, ids, tw, SwiGLU(), config=cfg), ref) < 1e-5, cand
    assert swapped == (2 if layout == "plain" else 0)  # the fragment layout implies it


def test_candidates_replace_the_entrys_ahead_and_register_cap():
    entry = dict(BLOCK_M=16, SPLIT_K=2, AHEAD=2, maxnreg=50, SWAP=1)
    capped = kernels._tiles((64, 64, 4, 4, 0, 0, 96), entry)
    assert capped == dict(BLOCK_M=16, SPLIT_K=2, BLOCK_N=64, BLOCK_K=64, num_warps=4,
                          num_stages=4, maxnreg=96)  # fmt: skip
    assert kernels._tiles((64, 64, 4, 1, 0, 1), entry)["AHEAD"] == 1
    assert "maxnreg" not in kernels._tiles((64, 64, 4, 1, 0, 1), entry)
    fragment = kernels.SWEEP_FRAGMENT["gemm1"] + kernels.SWEEP_FRAGMENT["gemm2"]
    assert any(len(c) == 7 for c in fragment) and any(len(c) == 6 for c in fragment)


def test_mla_grid_takes_heads_batches_and_contexts():
    import argparse

    ap = argparse.ArgumentParser()
    assert kernels.mla_grid(ap, "16,128:1,2:1024") == [
        (16, 1, 1024), (16, 2, 1024), (128, 1, 1024), (128, 2, 1024)
    ]  # fmt: skip
    for bad in ("16:1,2", "16:x:1024", "16:1:1024:7"):
        with pytest.raises(SystemExit):
            kernels.mla_grid(ap, bad)


def test_mla_case_widens_tables_past_the_context(monkeypatch):
    """``table_tokens``: each row's table as wide as that many tokens, its blocks distinct."""
    monkeypatch.setattr(kernels, "DEV", "cpu")
    cache = torch.empty(64, 64, 576, dtype=torch.bfloat16)
    q, table, lens = kernels.mla_case(16, 3, 256, cache, table_tokens=1024)
    assert q.shape == (3, 16, 576) and table.shape == (3, 16) and lens.tolist() == [256] * 3
    assert len(set(table.flatten().tolist())) == 48
    assert kernels.mla_case(16, 3, 256, cache)[1].shape == (3, 4)


def test_sweep_times_each_candidate_against_the_tiles_before(monkeypatch):
    """moe_small's sweep times every candidate against the tiles before it (``ms_against``):
    a GPU whose times drift upward as the sweep goes on still picks the fastest tiles, a
    candidate slower than the tiles before never replaces them, and down's candidates are
    timed against gate/up's winner."""
    fast = {"gemm1": {128: 0.8, 64: 1.0}, "gemm2": {64: 1.0}}  # BLOCK_N -> relative time

    def true_ms(cfg):
        return sum(fast[g].get(cfg[g]["BLOCK_N"], 1.1) for g in ("gemm1", "gemm2"))

    calls = []

    def ms_against(ref, cand):  # later pairs run slower: the drift ratios cancel
        calls.append((ref.keywords["config"], cand.keywords["config"]))
        drift = 1 + 0.05 * len(calls)
        return true_ms(ref.keywords["config"]) * drift, true_ms(cand.keywords["config"]) * drift

    monkeypatch.setattr(kernels, "DEV", "cpu")  # the table's "default" entry
    monkeypatch.setattr(kernels, "ms_against", ms_against)
    monkeypatch.setattr(kernels, "ms_graph", lambda fn, *a, config, **kw: true_ms(config))
    monkeypatch.setattr(kernels, "moe_case", lambda model, m, fragment: ())
    monkeypatch.setattr(kernels, "SWEEP_FRAGMENT", {
        "gemm1": [(64, 64, 4, 3, 0), (128, 64, 8, 4, 0), (256, 64, 8, 4, 0)],
        "gemm2": [(256, 64, 8, 4, 0), (128, 64, 4, 3, 0)],
    })  # fmt: skip
    entry = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    table = {"default": {1 << 30: {"gemm1": dict(entry), "gemm2": dict(entry)}}}
    monkeypatch.setattr(kernels.triton_configs, "MOE_SMALL_FRAGMENT", table)
    out: dict = {}
    kernels.sweep("GPU", out, deadline=float("inf"), tables=("MOE_SMALL_FRAGMENT",),
                  small_m=(16,))  # fmt: skip
    tuned = table["GPU"][16]
    assert tuned["gemm1"]["BLOCK_N"] == 128  # 0.8 against 1.0, though timed later than 64's
    assert tuned["gemm2"]["BLOCK_N"] == 64  # both candidates slower: the entry stays
    assert all(ref["gemm1"]["BLOCK_N"] == 128 for ref, _ in calls[3:])  # down against the winner
    assert len(calls) == 5
    res = out["sweep"]
    assert res["MOE_SMALL_FRAGMENT M=16 entry"] == pytest.approx(2.0)
    assert res["MOE_SMALL_FRAGMENT M=16 gemm1 (128, 64, 8, 4, 0)"] == pytest.approx(1.8)
    assert res["MOE_SMALL_FRAGMENT M=16 gemm2 (256, 64, 8, 4, 0)"] == pytest.approx(1.9)


def test_grouped_gemm_sweep_keeps_the_tables_tiles_unless_beaten(monkeypatch):
    """moe_large's candidates are timed against the table's entry for each bucket too: the
    bucket whose candidates are all slower keeps no entry of its own for this GPU."""
    entry = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    table = {"default": {1 << 30: {"gemm1": dict(entry), "gemm2": dict(entry)}}}
    monkeypatch.setattr(kernels.triton_configs, "MOE_LARGE", table)
    speed = {4096: {128: 0.9}, 16384: {}}  # BLOCK_M -> time against the entry's 1.0

    def true_ms(call):
        m = call.args[0]
        return speed[m].get(call.keywords["config"]["gemm1"]["BLOCK_M"], 1.0)

    m_seen: list = []
    monkeypatch.setattr(kernels, "DEV", "cpu")
    monkeypatch.setattr(kernels, "ms_graph", lambda call: true_ms(call))
    monkeypatch.setattr(kernels, "ms_against", lambda ref, cand: (true_ms(ref), true_ms(cand)))
    monkeypatch.setattr(kernels, "moe_case", lambda model, m, fragment: m_seen.append(m) or (m,))
    monkeypatch.setattr(kernels, "SWEEP_LARGE", [(64, 64, 64, 4, 4), (128, 64, 64, 4, 3)])
    out: dict = {}
    kernels.sweep("GPU", out, deadline=float("inf"), tables=("MOE_LARGE",))
    assert m_seen == [4096, 16384]
    assert table["GPU"][4096]["gemm1"]["BLOCK_M"] == 128
    assert table["GPU"][1 << 30] == table["default"][1 << 30]  # ties do not replace it
    assert out["sweep"]["moe_large M=4096 (128, 64, 64, 4, 3)"] == pytest.approx(0.9)
