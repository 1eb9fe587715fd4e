"""layer_groups: how a KV is cut into messages (both ends of a pair cut it alike)."""

from __future__ import annotations

import pytest

from pdserve.cluster.kv_transport.pair_group import FIRST_BYTES, GROWTH, layer_groups


def _sizes(layers: int, layer_bytes: int, first_bytes: int = FIRST_BYTES) -> list[int]:
    groups = layer_groups(layers, layers * layer_bytes, first_bytes)
    assert [g.start for g in groups] == [0, *(g.stop for g in groups[:-1])]  # in order, no gaps
    assert groups[-1].stop == layers
    return [g.stop - g.start for g in groups]


@pytest.mark.parametrize("layers", [1, 2, 3, 5, 27, 61])
@pytest.mark.parametrize("layer_mb", [0.1, 1.2, 9.4, 37.7, 300])
def test_groups_cover_every_layer_and_grow_by_at_most_growth_toward_the_middle(layers, layer_mb):
    sizes = _sizes(layers, int(layer_mb * (1 << 20)))
    assert all(s >= 1 for s in sizes) and sum(sizes) == layers
    mid = len(sizes) // 2
    for inner, outer in [*zip(sizes[1 : mid + 1], sizes), *zip(sizes[mid - 1 :], sizes[mid:])]:
        assert inner <= max(GROWTH * outer, 1), sizes
    if len(sizes) > 1:  # the ends are small: about FIRST_BYTES, or one layer
        end = max(1, -(-FIRST_BYTES // int(layer_mb * (1 << 20))))
        assert sizes[0] == sizes[-1] == end, sizes


def test_a_small_kv_is_one_message_and_a_large_one_a_few():
    assert _sizes(27, 1 << 20) == [27]  # 27 MB: under twice the ends
    assert _sizes(27, 9_400_000) == [2, 8, 7, 8, 2]  # DeepSeek-V2-Lite, 8k tokens
    assert _sizes(27, 37_700_000) == [1, 4, 8, 9, 4, 1]  # 32k tokens: 6 messages, not 21
    assert _sizes(61, 37_700_000) == [1, 4, 16, 19, 16, 4, 1]


def test_a_kv_of_several_messages_reaches_write_part_by_part_in_layer_order():
    """Over gloo between two threads: ``send_kv`` cuts a KV into layer groups and ``recv_kv``
    hands each part to ``write(layers, part)`` in layer order, every layer once, bit-exact."""
    import threading

    import torch

    from pdserve.cluster.kv_transport.pair_group import DECODE, PairGroup, listen

    cpu = torch.device("cpu")
    store = listen("127.0.0.1", 10.0)
    joined: dict[str, PairGroup] = {}
    joiner = threading.Thread(
        target=lambda: joined.update(
            p=PairGroup.connect("127.0.0.1", store.port, "parts", cpu, 10.0)
        )
    )
    joiner.start()
    dec = PairGroup(store, "parts", DECODE, cpu, timeout_s=10.0)
    joiner.join(timeout=30)
    pre = joined["p"]
    kv = torch.randn(7, 3, 4, 8)  # [layers, n, block_size, width]: 384 bytes a layer
    for g in (pre, dec):
        g.first_bytes = 400  # both ends cut alike: ends of two layers
    want = layer_groups(7, kv.nbytes, 400)
    assert len(want) > 2
    sender = threading.Thread(target=pre.send_kv, args=(kv,))
    sender.start()
    parts: list[tuple[slice, torch.Tensor]] = []
    times = dec.recv_kv(
        tuple(kv.shape), kv.dtype, lambda ls, part: parts.append((ls, part.clone()))
    )
    sender.join(timeout=30)
    assert [ls for ls, _ in parts] == want
    assert torch.equal(torch.cat([part for _, part in parts]), kv)
    assert times["posted recv"] <= times["queued"]
    for g in (pre, dec):
        g.close()
