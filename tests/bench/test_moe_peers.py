"""The MoE peers of bench.kernels where none can run (no GPU here): each named with the reason,
and a row without a peer time says so instead of a ratio."""

from __future__ import annotations

import torch

from pdserve.bench import kernels
from pdserve.bench.moe_peers import Peers, flashinfer_reason


def test_without_a_gpu_the_flashinfer_peer_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert flashinfer_reason() == "no GPU"
    peers = Peers()
    assert peers.names == [] and peers.skipped["flashinfer_cutlass"] == "no GPU"
    assert set(peers.skipped) == {"flashinfer_cutlass", "triton_kernels"}
    x = torch.zeros(2, 64)
    assert peers.calls(x, None, None, None, None, x) == {}
    row = kernels.time_peers(peers, (x, None, None, None), None, lambda *case: x, 1.0)
    assert row["vs_best_peer"] is None
    assert row["peers"]["flashinfer_cutlass"] == {"skipped": "no GPU"}
    assert "skipped" in row["peers"]["triton_kernels"]


def test_without_a_gpu_the_mla_peers_are_skipped_with_their_reason(monkeypatch):
    monkeypatch.setattr(kernels, "DEV", "cpu")
    x = torch.zeros(1, 16, 576)
    row = kernels.mla_peers(x, None, None, None, x, 1.0)
    assert row["vs_best_peer"] is None
    assert row["peers"] == {n: {"skipped": "no GPU"} for n in ("flashinfer_fa3", "flashinfer_fa2")}
    assert kernels._peer(row).split() == ["-", "-"]  # no ratio without a peer time
