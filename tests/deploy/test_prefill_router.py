"""The prefill pool's router leaves out replicas a request already failed on, while others are
there."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from pdserve.cluster.kv_layout import KVFingerprint
from pdserve.cluster.messages import KVDestination, PrefillRequest
from pdserve.cluster.sampling_params import SamplingParams
from pdserve.deploy.prefill_router import AvoidTriedReplicas, _avoid, without_tried


def _replica(uid: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid))


def _pending(avoid: tuple[str, ...]):
    fp = KVFingerprint("m", "w", str(torch.float32), 16, 2, 80, 1)
    dest = KVDestination(transfer_id="t", decode_replica="d", num_blocks=1, fingerprint=fp)
    req = PrefillRequest(
        request_id="r", prompt_token_ids=[5], sampling=SamplingParams(), kv=dest, avoid=avoid
    )
    return SimpleNamespace(args=[req], kwargs={})


def test_tried_replicas_are_left_out_while_others_remain():
    a, b, c = _replica("a"), _replica("b"), _replica("c")
    assert without_tried([a, b, c], ("a", "c")) == [b]
    assert without_tried([a, b], ()) == [a, b]
    assert without_tried([a], ("a",)) == [a]  # only the failed one left: better than none


def test_the_avoid_list_is_read_from_the_prefill_request():
    assert _avoid(_pending(("x", "y"))) == ("x", "y")
    assert _avoid(None) == () and _avoid(SimpleNamespace(args=[], kwargs={})) == ()


def test_choose_replicas_never_ranks_a_tried_replica_while_another_exists():
    router = object.__new__(AvoidTriedReplicas)  # choose_replicas reads no router state
    replicas = [_replica(u) for u in "abcd"]
    for _ in range(50):
        (ranked,) = asyncio.run(router.choose_replicas(replicas, _pending(("a", "b", "c"))))
        assert [r.replica_id.unique_id for r in ranked] == ["d"]
        (ranked,) = asyncio.run(router.choose_replicas(replicas, _pending(("a",))))
        assert len(ranked) == 2 and "a" not in {r.replica_id.unique_id for r in ranked}
