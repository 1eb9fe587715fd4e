"""Both KV transports between real executors, on CPU: the point-to-point one runs over gloo here
(NCCL on GPUs), prefill ranks as Ray actors, decode in process or as a TP group."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from pdserve.cluster.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.cluster.kv_layout import fingerprint
from pdserve.cluster.kv_transport import make_transport
from pdserve.cluster.kv_transport.kv_peer import KVNotSent
from pdserve.cluster.messages import KVDestination
from pdserve.cluster.model_runner import ModelRunner
from pdserve.cluster.tp_executor import RayTPExecutor

BLOCKS = 32


@pytest.fixture(scope="module")
def ray_cpu():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _config(path: str, tp: int, actors: bool) -> EngineConfig:
    return EngineConfig(
        model=path, device="cpu", tp=tp, rank_actors=actors,
        cache=CacheConfig(block_size=16, num_blocks=BLOCKS),
    )  # fmt: skip


def _executor(path: str, tp: int, actors: bool):
    cfg = _config(path, tp, actors)
    mc = ModelConfig.from_dir(path)
    return RayTPExecutor(cfg, mc, 512) if actors else ModelRunner(cfg, mc, 512)


def _fill(executor, block_ids: list[int], seed: int) -> torch.Tensor:
    layers, block_size, width, _ = executor.kv_layout
    kv = torch.randn(
        layers, len(block_ids), block_size, width, generator=torch.Generator().manual_seed(seed)
    )
    executor.write_kv(block_ids, kv)
    return kv


def _dest(tid: str, block_ids: list[int], cfg: ModelConfig) -> KVDestination:
    fp = fingerprint(cfg, "d", torch.float32, 16)
    return KVDestination(
        transfer_id=tid,
        decode_replica="d0",
        num_blocks=len(block_ids),
        fingerprint=fp,
        block_ids=block_ids,
    )


async def _move(sender, receiver, prefill, decode, src_blocks, dst_blocks, tid, cfg) -> None:
    prefill.stage_kv(tid, src_blocks)
    dest = _dest(tid, dst_blocks, cfg)
    handle = await sender.send(prefill, tid, dest)
    await receiver.receive(handle, dest, decode)


# five transfers of three blocks each, in flight at once on the same pair(s)
JOBS = [([i, i + 8, i + 16], [20 - i, 5 + i, 31 - i]) for i in range(5)]


def _move_all(sender, receiver, prefill, decode, prefix: str, cfg) -> None:
    """Every job of JOBS at once: order must hold per pair."""

    async def run():
        moves = [
            _move(sender, receiver, prefill, decode, src, dst, f"{prefix}{i}", cfg)
            for i, (src, dst) in enumerate(JOBS)
        ]
        await asyncio.gather(*moves)

    asyncio.run(run())


@pytest.mark.parametrize(
    "transport_name, prefill_tp, decode_tp, decode_actors",
    [
        ("nccl", 1, 1, False),  # gloo on CPU; decode in process
        ("nccl", 2, 1, False),  # prefill rank 1's copy is dropped
        ("nccl", 1, 2, True),  # one staged copy serves two decode ranks
        ("object_store", 2, 2, True),
    ],
)
def test_transfers_land_in_the_right_blocks(
    ray_cpu, tiny_model, transport_name, prefill_tp, decode_tp, decode_actors
):
    cfg = ModelConfig.from_dir(tiny_model)
    prefill = _executor(tiny_model, prefill_tp, True)
    decode = _executor(tiny_model, decode_tp, decode_actors)
    # one transport object per side, as each replica has its own
    sender, receiver = make_transport(transport_name), make_transport(transport_name)
    sent = [_fill(prefill, src, seed=i) for i, (src, _) in enumerate(JOBS)]
    _move_all(sender, receiver, prefill, decode, "t", cfg)
    for i, (_, dst) in enumerate(JOBS):
        torch.testing.assert_close(decode.read_kv(dst), sent[i], rtol=0, atol=0)
    assert sender.stats.transfers == receiver.stats.transfers == len(JOBS)
    # nothing staged is left behind on any prefill rank
    for tid in (f"t{i}" for i in range(len(JOBS))):
        with pytest.raises(KeyError):
            prefill.take_staged(tid)
    for ex in (prefill, decode):
        ex.shutdown()


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_nccl_between_two_gpus_lands_in_the_right_blocks(ray_cpu, tiny_model):
    """Prefill ranks on one GPU, decode on the other: NCCL through the same code."""
    cfg = ModelConfig.from_dir(tiny_model)

    def gpu_executor():
        ec = EngineConfig(
            model=tiny_model, device="cuda", dtype="bfloat16", rank_actors=True,
            gpus_per_rank=1, cache=CacheConfig(block_size=16, num_blocks=BLOCKS),
        )  # fmt: skip
        return RayTPExecutor(ec, cfg, 512)

    prefill, decode = gpu_executor(), gpu_executor()
    sender, receiver = make_transport("nccl"), make_transport("nccl")
    sent = [_fill(prefill, src, seed=i).to(torch.bfloat16) for i, (src, _) in enumerate(JOBS)]
    _move_all(sender, receiver, prefill, decode, "g", cfg)
    for i, (_, dst) in enumerate(JOBS):
        assert torch.equal(decode.read_kv(dst), sent[i])
    for ex in (prefill, decode):
        ex.shutdown()


def test_timeout_a_pair_group_message_from_a_dead_peer_fails_within_its_bound():
    """A receive whose sender never sends (it died) raises after ``timeout_s``, not never."""
    import threading

    from pdserve.cluster.kv_transport.pair_group import DECODE, PairGroup, listen

    cpu = torch.device("cpu")
    store = listen("127.0.0.1", 10.0)
    groups: dict[str, PairGroup] = {}

    def join_prefill() -> None:  # gloo groups block until both ranks join
        groups["prefill"] = PairGroup.connect("127.0.0.1", store.port, "dead", cpu, 2.0)

    joiner = threading.Thread(target=join_prefill)
    joiner.start()
    decode = PairGroup(store, "dead", DECODE, cpu, timeout_s=2.0)
    joiner.join(timeout=30)
    sender = threading.Thread(target=groups["prefill"].send, args=(torch.ones(4),))
    sender.start()  # one message goes through
    got = torch.zeros(4)
    decode.recv(got)
    sender.join(timeout=30)
    assert got.tolist() == [1.0] * 4
    groups["prefill"].close()  # the prefill side dies; its next message never comes
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        decode.recv(torch.zeros(4))
    assert time.monotonic() - t0 < 15.0, "the receive should fail near its 2 s bound"
    decode.close()


def test_receives_posted_before_their_prompts_end_land_in_order(ray_cpu, tiny_model):
    """Decode posts five transfers before any prompt is staged (as it does when the prefill
    replica announces them); the prompts end in reverse order; every KV lands where it should."""
    cfg = ModelConfig.from_dir(tiny_model)
    prefill, decode = _executor(tiny_model, 1, True), _executor(tiny_model, 1, False)
    sender, receiver = make_transport("nccl"), make_transport("nccl")
    sent = [_fill(prefill, src, seed=i) for i, (src, _) in enumerate(JOBS)]

    async def run():
        posted = []
        for i, (_, dst) in enumerate(JOBS):
            dest = _dest(f"e{i}", dst, cfg)
            handle = sender.announce(prefill, f"e{i}", dest)
            posted.append(asyncio.ensure_future(receiver.receive(handle, dest, decode, 30.0)))
        await asyncio.sleep(0.5)
        assert not any(p.done() for p in posted)  # waiting for their prompts
        for i in reversed(range(len(JOBS))):
            prefill.stage_kv(f"e{i}", JOBS[i][0])
        await asyncio.wait_for(asyncio.gather(*posted), 60)

    asyncio.run(run())
    for i, (_, dst) in enumerate(JOBS):
        torch.testing.assert_close(decode.read_kv(dst), sent[i], rtol=0, atol=0)
    assert _staged_count(prefill) == 0
    for ex in (prefill, decode):
        ex.shutdown()


def _staged_count(executor) -> int:
    import ray

    return sum(ray.get([r.kv.remote("count") for r in executor.ranks]))


def test_fault_a_dropped_prompt_ends_its_transfer_and_the_pair_goes_on(tiny_model):
    """A transfer whose prompt failed on the prefill side (its copy dropped) ends at once with
    ``KVNotSent``; the pair group stays open and the next transfer lands through it."""
    cfg = ModelConfig.from_dir(tiny_model)
    prefill, decode = _executor(tiny_model, 1, False), _executor(tiny_model, 1, False)
    sender, receiver = make_transport("nccl"), make_transport("nccl")
    sent = _fill(prefill, [1, 2], seed=3)

    async def run():
        await _move(sender, receiver, prefill, decode, [1, 2], [3, 4], "ok-1", cfg)
        key = dict(receiver._open)
        dest = _dest("gone", [5, 6], cfg)
        posted = receiver.receive(sender.announce(prefill, "gone", dest), dest, decode, 30.0)
        prefill.drop_staged("gone")  # the prompt failed before it was staged
        t0 = time.monotonic()
        with pytest.raises(KVNotSent):
            await posted
        assert time.monotonic() - t0 < 5.0
        assert receiver._open == key and len(decode.kv_peer._groups) == 1
        await _move(sender, receiver, prefill, decode, [1, 2], [7, 8], "ok-2", cfg)

    asyncio.run(run())
    torch.testing.assert_close(decode.read_kv([3, 4]), sent, rtol=0, atol=0)
    torch.testing.assert_close(decode.read_kv([7, 8]), sent, rtol=0, atol=0)


def test_fault_a_broken_pair_is_closed_on_both_ends_and_the_next_transfer_opens_a_new_one(
    tiny_model,
):
    """The prefill end's group is gone (its peer died and came back): the posted transfer
    fails within seconds instead of waiting out its bound, both ends close the group, and the
    next transfer between the same ranks lands its blocks over a new one."""
    cfg = ModelConfig.from_dir(tiny_model)
    prefill, decode = _executor(tiny_model, 1, False), _executor(tiny_model, 1, False)
    for ex in (prefill, decode):
        ex.kv_peer.timeout_s = 2.0
    sender, receiver = make_transport("nccl"), make_transport("nccl")
    sent = _fill(prefill, [1, 2], seed=3)

    async def run():
        await _move(sender, receiver, prefill, decode, [1, 2], [3, 4], "ok-1", cfg)
        (key,) = receiver._open.values()
        prefill.kv_peer.close(key)  # only the prefill end forgets it
        prefill.stage_kv("lost", [1, 2])
        dest = _dest("lost", [5, 6], cfg)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="closed"):
            await receiver.receive(sender.announce(prefill, "lost", dest), dest, decode, 30.0)
        assert time.monotonic() - t0 < 10.0
        assert not receiver._open and not decode.kv_peer._groups and not prefill.kv_peer._groups
        await _move(sender, receiver, prefill, decode, [1, 2], [7, 8], "ok-2", cfg)
        assert list(receiver._open.values()) != [key]

    asyncio.run(run())
    torch.testing.assert_close(decode.read_kv([3, 4]), sent, rtol=0, atol=0)
    torch.testing.assert_close(decode.read_kv([7, 8]), sent, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_timeout_an_nccl_peer_that_dies_mid_transfer_fails_the_transfer_not_the_process():
    """Over NCCL between two GPUs (one thread per end in this process): the prefill end signals
    that the KV follows and then dies without sending. The decode end's receive raises within
    its pair's timeout (the group aborts its communicator; the process lives on), and a new
    pair group between the same GPUs then moves KV intact."""
    import threading

    from pdserve.cluster.kv_transport.pair_group import DECODE, PairGroup, listen

    pre_dev, dec_dev = torch.device("cuda:0"), torch.device("cuda:1")
    shape = (4, 3, 16, 64)

    def open_pair(key: str) -> tuple[PairGroup, PairGroup]:
        store = listen("127.0.0.1", 30.0)
        joined: dict[str, PairGroup] = {}
        joiner = threading.Thread(
            target=lambda: joined.update(
                p=PairGroup.connect("127.0.0.1", store.port, key, pre_dev, 3.0)
            )
        )
        joiner.start()
        dec = PairGroup(store, key, DECODE, dec_dev, timeout_s=3.0)
        joiner.join(timeout=60)
        return joined["p"], dec

    def written() -> tuple[dict, callable]:
        got: dict[str, torch.Tensor] = {}

        def write(layers: slice, part: torch.Tensor) -> None:  # each layer group in turn
            got.setdefault("kv", torch.empty(shape, dtype=part.dtype, device=part.device))
            got["kv"][layers] = part

        return got, write

    pre, dec = open_pair("dies")
    kv = torch.randn(shape, device=pre_dev).to(torch.bfloat16)
    sender = threading.Thread(target=lambda: (pre.signal("t0", "ok"), pre.send_kv(kv)))
    sender.start()
    assert dec.await_signal("t0", 10.0) == "ok"
    got, write = written()
    dec.recv_kv(shape, torch.bfloat16, write)
    sender.join(timeout=30)
    assert torch.equal(got["kv"].cpu(), kv.cpu())

    pre.signal("t1", "ok")  # ... and the prefill end dies before it sends
    assert dec.await_signal("t1", 10.0) == "ok"
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - torch raises DistBackendError or RuntimeError
        dec.recv_kv(shape, torch.bfloat16, written()[1])
    assert time.monotonic() - t0 < 30.0, "the receive should fail near its 3 s timeout"
    for g in (pre, dec):
        g.close()

    pre, dec = open_pair("again")
    sender = threading.Thread(target=lambda: pre.send_kv(kv))
    sender.start()
    got, write = written()
    dec.recv_kv(shape, torch.bfloat16, write)
    sender.join(timeout=30)
    assert torch.equal(got["kv"].cpu(), kv.cpu())
    for g in (pre, dec):
        g.close()


def test_a_traced_transfer_records_both_peers_phases_on_one_clock(
    tiny_model, tmp_path, monkeypatch
):
    """With PDSERVE_KV_TRACE set, each KV peer of a transfer writes its phase times; on one host
    the two ends' clocks agree, so the decode end has the word after the prefill end staged."""
    from pdserve.bench.kv_trace import load

    monkeypatch.setenv("PDSERVE_KV_TRACE", str(tmp_path))
    cfg = ModelConfig.from_dir(tiny_model)
    prefill, decode = _executor(tiny_model, 1, False), _executor(tiny_model, 1, False)
    sender, receiver = make_transport("nccl"), make_transport("nccl")
    sent = _fill(prefill, [1, 2, 3], seed=5)
    asyncio.run(_move(sender, receiver, prefill, decode, [1, 2, 3], [9, 10, 11], "traced", cfg))
    torch.testing.assert_close(decode.read_kv([9, 10, 11]), sent, rtol=0, atol=0)
    # the prefill end records once its send call returns, which may be after decode has the KV
    deadline = time.monotonic() + 10
    while "prefill peer" not in (rec := load(tmp_path).get("traced", {})):
        assert time.monotonic() < deadline, f"no prefill peer record: {sorted(rec)}"
        time.sleep(0.02)
    pre, dec = rec["prefill peer"], rec["decode peer"]
    # (the prefill end times "signalled" once its write returned: the decode end may be first)
    assert pre["stage called"] <= pre["staged"] <= pre["signalled"] <= pre["sent"]
    assert pre["staged"] <= dec["signalled"] <= dec["posted recv"] <= dec["received"]
    for ex in (prefill, decode):
        ex.shutdown()
