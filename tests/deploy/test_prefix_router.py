"""Both pools' Serve router: a request goes to the replica that got its prompt's longest prefix
unless that one is busier than a random pick by more than the slack; a prefill retry leaves out
the replicas it failed on while others are there."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from pdserve.cluster.kv_layout import KVFingerprint
from pdserve.cluster.messages import GenerateRequest, KVDestination, PrefillRequest
from pdserve.cluster.sampling_params import SamplingParams
from pdserve.deploy.prefix_router import PrefixAffinityRouter, _avoid, without_tried


def _replica(uid: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid))


def _pending(avoid: tuple[str, ...] = (), prompt: list[int] | None = None):
    fp = KVFingerprint("m", "w", str(torch.float32), 16, 2, 2, 0, 80)
    dest = KVDestination(transfer_id="t", decode_replica="d", num_blocks=1, fingerprint=fp)
    req = PrefillRequest(
        request_id="r",
        prompt_token_ids=prompt or [5],
        sampling=SamplingParams(),
        kv=dest,
        avoid=avoid,
    )
    return SimpleNamespace(args=[req], kwargs={})


def _generate(prompt: list[int]):
    req = GenerateRequest(
        request_id="g", prompt_token_ids=prompt, sampling=SamplingParams(), arrival_time=0.0
    )
    return SimpleNamespace(args=[req], kwargs={})


class _Router(PrefixAffinityRouter):
    """The policy alone: queue lengths from a dict instead of Serve's cache."""

    def __init__(self, lens: dict[str, int], slack: int = 2) -> None:  # no Serve state
        self.lens = lens
        self.initialize_state(block_size=4, slack=slack)

    def queue_len(self, replica) -> int:
        return self.lens.get(replica.replica_id.unique_id, 0)


def _choose(router, replicas, pending) -> list[list[str]]:
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_tried_replicas_are_left_out_while_others_remain():
    a, b, c = _replica("a"), _replica("b"), _replica("c")
    assert without_tried([a, b, c], ("a", "c")) == [b]
    assert without_tried([a, b], ()) == [a, b]
    assert without_tried([a], ("a",)) == [a]  # only the failed one left: better than none


def test_the_avoid_list_is_read_from_the_prefill_request():
    assert _avoid(_pending(("x", "y"))) == ("x", "y")
    assert _avoid(None) == () and _avoid(SimpleNamespace(args=[], kwargs={})) == ()
    assert _avoid(_generate([1, 2])) == ()  # decode requests name none


def test_a_tried_replica_is_never_ranked_while_another_exists():
    router, replicas = _Router({}), [_replica(u) for u in "abcd"]
    for _ in range(50):
        assert _choose(router, replicas, _pending(("a", "b", "c"))) == [["d"]]
        ranks = _choose(router, replicas, _pending(("a",)))
        assert "a" not in sum(ranks, []) and len(sum(ranks, [])) == 2


def test_a_prompt_goes_where_its_longest_prefix_went_on_both_pools():
    replicas = [_replica(u) for u in "abcdefgh"]
    system = list(range(100, 140))  # 10 blocks of 4
    for pending in (_pending, _generate):
        router = _Router({})
        (first, *_), *_ = _choose(router, replicas, pending(prompt=system + [1, 2, 3]))
        for turn in range(20):  # each later prompt extends the conversation
            ranks = _choose(router, replicas, pending(prompt=system + [1, 2, 3] + [turn] * 9))
            assert ranks[0] == [first]
        assert router.affinity_picks == 20
        # a prompt sharing no whole block goes wherever the load says
        assert len(router.keys(pending(prompt=[7, 8, 9]))) == 0


def test_a_busy_replica_holding_the_prefix_loses_to_a_less_loaded_one_beyond_the_slack():
    replicas = [_replica(u) for u in "ab"]
    prompt = list(range(40))
    router = _Router({"a": 0, "b": 0}, slack=2)
    (owner,), *_ = _choose(router, replicas, _pending(prompt=prompt))
    other = "b" if owner == "a" else "a"
    router.lens = {owner: 2, other: 0}  # within the slack: the prefix wins
    assert _choose(router, replicas, _pending(prompt=prompt))[0] == [owner]
    router.lens = {owner: 3, other: 0}  # beyond it: the load wins, and now owns the prefix
    assert _choose(router, replicas, _pending(prompt=prompt))[0] == [other]
    router.lens = {owner: 0, other: 0}
    assert _choose(router, replicas, _pending(prompt=prompt))[0] == [other]


def test_new_prompts_spread_over_equally_loaded_replicas():
    replicas = [_replica(u) for u in "ab"]
    router = _Router({})
    firsts = [_choose(router, replicas, _generate([i] * 20))[0][0] for i in range(10)]
    assert sorted(firsts) == ["a"] * 5 + ["b"] * 5  # each went to the one fewer went to
    assert router.routes.owned("a") == router.routes.owned("b") == 5 * 4
