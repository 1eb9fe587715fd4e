"""KVPeer staging on GPU: a prompt's KV streamed out layer group by layer group while its last
step still runs, each group copied only once its layers are written."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench.kv_transfer import CacheOnlyRunner
from pdserve.cluster.kv_layout import block_rows, scatter_blocks
from pdserve.cluster.kv_transport.kv_peer import KVPeer


@pytest.mark.gpu
def test_streamed_staging_copies_each_group_after_its_layers_and_before_later_writes():
    layers, n = 6, 120  # 6 x 120 blocks of 73 KB: 53 MB, three messages
    runner = CacheOnlyRunner(layers, 300, 64, 576, torch.bfloat16, "cuda")
    peer = KVPeer(runner)
    ids = list(range(299, 299 - 2 * n, -2))  # scattered through the cache
    rows = block_rows(runner.kv_caches, ids)
    for attempt in range(2):  # the first loads the copies' kernels for these shapes
        marks = peer.layer_marks([n])
        assert sorted(marks) == [1, 3]  # groups [0, 2), [2, 4), [4, 6)
        want = torch.randn(layers, n, 64, 576, device="cuda").to(torch.bfloat16)
        torch.cuda.synchronize()
        for i in range(layers):  # a "step": each layer computes for a while, writes its KV
            torch.cuda._sleep(5_000_000)  # a few ms: a copy that did not wait reads old KV
            scatter_blocks(runner.kv_caches, rows, want[i : i + 1], slice(i, i + 1))
            if i in marks:
                marks[i].record()
        end = torch.cuda.Event()
        end.record()
        peer.stage(f"t{attempt}", ids, marks)
        scatter_blocks(runner.kv_caches, rows, torch.zeros_like(want), slice(None))  # next step
        peer._staged[f"t{attempt}"].ready[0][1].synchronize()
        early = not end.query()  # the first group was copied while the step still ran
        assert torch.equal(peer.take(f"t{attempt}"), want)  # each group after its layers
        torch.cuda.synchronize()
        assert not runner.kv_caches.index_select(1, torch.tensor(ids, device="cuda")).any()
    assert early


def test_layer_marks_are_empty_on_cpu():
    runner = CacheOnlyRunner(6, 300, 64, 576, torch.bfloat16, "cpu")
    assert KVPeer(runner).layer_marks([120]) == {}


@pytest.mark.gpu
def test_a_prefill_engine_streams_the_same_kv_it_stages_after_the_step(tiny_model, monkeypatch):
    """The tiny model's KV is one message at the real message sizes; with ends of one byte each
    of its three layers is a group, copied during the step: the staged KV is bit for bit what
    the copy after the step makes."""
    from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
    from pdserve.cluster.kv_transport import pair_group

    engine = LLMEngine(
        EngineConfig(
            model=tiny_model, dtype="bfloat16", device="cuda", role="prefill",
            cache=CacheConfig(block_size=16, num_blocks=64),
        )
    )  # fmt: skip
    prompt = list(range(3, 200))
    staged = {}
    for label, first_bytes in (("after the step", 1 << 40), ("streamed", 1)):
        monkeypatch.setattr(pair_group, "FIRST_BYTES", first_bytes)
        marks = engine.runner.kv_peer.layer_marks([-(-len(prompt) // 16)])
        assert bool(marks) == (label == "streamed"), marks
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
        (tid,) = list(engine.runner.kv_peer._staged)
        staged[label] = engine.runner.kv_peer.take(tid)
    assert staged["streamed"].shape[0] == 3
    assert torch.equal(staged["streamed"], staged["after the step"])
