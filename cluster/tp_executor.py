"""Tensor parallelism across Ray actors: one process per rank, all-reduce through torch.distributed
(gloo on CPU, NCCL on GPU).

Inside a Serve replica the ranks go into the replica's placement group, bundle i + 1 for rank i
(bundle 0 holds the replica itself, which schedules but holds no weights). The ranks meet through
a Ray call: rank 0 reports an address and a free port, and nothing is fixed in advance. Every
step goes to all ranks (``launch``, which returns once the step is queued); rank 0 samples (the
others would draw the same tokens from the same all-gathered logits) and hands the tokens back
on a call of their own (``collect``). A step planned ahead is launched before the step before
it is collected: rank 0 takes its input ids from that step's draw and the group sums them with
the other ranks' zeros, so every rank runs them. MLA's latent cache is the same on every rank,
so KV is read from rank 0 and written to all.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.cluster import trace_file
from pdserve.cluster.config import EngineConfig, ModelConfig
from pdserve.cluster.decode_graphs import fits_graphs
from pdserve.cluster.executor import Executor
from pdserve.cluster.kv_transport.kv_peer import WAIT_THREADS
from pdserve.cluster.kv_transport.peer_client import PeerClient
from pdserve.cluster.sampler import SampledToken
from pdserve.cluster.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


class TPRank:
    """One rank's process: a model runner over its shard of the weights."""

    def __init__(self, config: EngineConfig, rank: int, size: int) -> None:
        self.config, self.rank, self.size = config, rank, size
        self.runner = None
        self._launched: deque = deque()  # rank 0: its launched steps' draws, to collect in turn
        torch.set_num_threads(max(1, int(config.cpus_per_rank)))

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, master: tuple[str, int], max_model_len: int) -> int:
        """Join the group, load this rank's shard; returns how many KV blocks would fit."""
        import torch.distributed as dist

        from pdserve.cluster.model_runner import ModelRunner
        from pdserve.cluster.nccl_comm import NcclComm
        from pdserve.cluster.parallel import TensorParallel

        config = self.config
        if config.gpus_per_rank > 0:
            # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
            config = replace(config, device="cuda:0")
        backend = "nccl" if config.resolve_device().type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master[0]}:{master[1]}",
            rank=self.rank,
            world_size=self.size,
        )
        comm = None
        if backend == "nccl" and config.role != "prefill" and config.decode_graphs != "off":
            try:  # the collectives decode CUDA graphs can capture (prefill runs no graphs)
                comm = NcclComm(self.rank, self.size, dist.group.WORLD)
            except (OSError, RuntimeError) as e:
                log.warning("no graph-safe NCCL communicator (%s): TP decodes eagerly", e)
        tp = TensorParallel(self.rank, self.size, dist.group.WORLD, comm)
        self.runner = ModelRunner(
            config, ModelConfig.from_dir(config.model), max_model_len, tp, allocate=False
        )
        return self.runner.propose_num_blocks()

    def allocate_kv(self, num_blocks: int) -> tuple[dict[str, str], str, bool, int]:
        """Allocate (and capture the decode graphs); kernels, device, whether graphs replay, and
        the largest batch of the decode-graph path (0: none)."""
        self.runner.allocate_kv(num_blocks)
        graphs = self.runner.graphs
        trace_file.watch_gc()
        replay = graphs is not None and bool(graphs.graphs)
        return (
            self.runner.kernel_names,
            self.runner.device_name,
            replay,
            (graphs.max_batch if graphs else 0),
        )

    def launch(self, sched: SchedulerOutput) -> None:
        """Queue one step on this rank and return. Rank 0 samples and keeps the draw for
        ``collect`` (and, planned ahead, the next step's input ids); the others take part in
        the collectives, keep their copy of a finished prompt's KV for decode, and sample
        nothing (every rank would draw the same tokens from the same all-gathered logits)."""
        if self.rank == 0:
            feed = self._launched[-1] if sched.feed_rows is not None else None
            self._launched.append(self.runner.launch(sched, feed))
            return
        layer_done = self.runner.layer_marks(sched)
        self.runner.compute_logits(sched, layer_done)
        self.runner.stage_finished(sched, layer_done)

    def collect(self) -> list[SampledToken]:
        """Rank 0: the tokens of its oldest launched step not yet collected."""
        return self.runner.collect(self._launched.popleft())

    def synchronize(self) -> None:
        """Wait for every step queued on this rank; steps never collected are forgotten."""
        self.runner.synchronize()
        self._launched.clear()

    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        return self.runner.read_kv(block_ids).cpu()

    def write_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        self.runner.write_kv(block_ids, kv)

    @ray.method(concurrency_group="kv")
    def kv(self, name: str, *args):
        """A quick KV peer call (stage, take, drop, connect, listen, accept, close), on a thread
        of its own so it never waits behind a model step or a posted transfer."""
        out = self.runner.kv_peer.call(name, *args)
        return out.cpu() if isinstance(out, torch.Tensor) else out

    @ray.method(concurrency_group="kv_wait")
    def kv_wait(self, name: str, *args):
        """A posted transfer (send_staged, recv_into): waits for its turn and its prompt."""
        return self.runner.kv_peer.call(name, *args)

    def kv_layout(self) -> tuple[int, int, int, str]:
        return self.runner.kv_layout

    def pid(self) -> int:
        return os.getpid()


def gather_ranks(
    refs: list[ray.ObjectRef],
    what: str,
    on_failure: Callable[[], None],
    poll_s: float = 1.0,
    ranks: list[int] | None = None,
) -> list:
    """The results of calls to the ranks (``ranks[i]`` answers ``refs[i]``; by default one
    call per rank, in rank order). A rank that fails ends the wait (within ``poll_s``): the
    others may be blocked in a collective with it, forever, so ``on_failure`` (stopping the
    group) runs and a RuntimeError names the rank and what the group was doing. A quick call
    (a step) costs one wait and one get."""

    def check(done: list[ray.ObjectRef]) -> None:
        for r in done:
            try:
                ray.get(r)
            except Exception as e:
                on_failure()
                rank = refs.index(r) if ranks is None else ranks[refs.index(r)]
                raise RuntimeError(
                    f"tensor-parallel rank {rank} failed while {what}; the group's "
                    f"ranks were stopped: {type(e).__name__}: {e}"
                ) from e

    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
        if pending:  # a slow call: has a rank that answered failed?
            check([r for r in refs if r not in pending])
    try:
        return ray.get(refs)
    except Exception:
        check(refs)  # names the failing rank and stops the group
        raise


def shared_gpu(config: EngineConfig) -> str | None:
    """Why the group's ranks would all open one GPU, or None. Without Ray GPU resources
    (``gpus_per_rank`` 0) every rank takes the same CUDA device, and NCCL refuses two ranks on
    one device (deep in its first collective)."""
    if config.tp > 1 and config.gpus_per_rank == 0 and config.resolve_device().type == "cuda":
        return (
            f"tp={config.tp} ranks with gpus_per_rank=0 on device {config.device!r} would all "
            "open the same GPU, which NCCL refuses: give each rank a GPU (gpus_per_rank=1) "
            "or run them on device='cpu'"
        )
    return None


class RayTPExecutor(Executor):
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> None:
        if why := shared_gpu(config):
            raise ValueError(why)
        size = config.tp
        pg = get_current_placement_group()
        actor = ray.remote(concurrency_groups={"kv": 4, "kv_wait": WAIT_THREADS})(TPRank)
        self.ranks = []
        for rank in range(size):
            opts: dict = {"num_cpus": config.cpus_per_rank, "num_gpus": config.gpus_per_rank}
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank + 1
                )
            self.ranks.append(actor.options(**opts).remote(config, rank, size))
        master = ray.get(self.ranks[0].address.remote())
        starts = [r.start.remote(master, max_model_len) for r in self.ranks]
        self.num_blocks = min(gather_ranks(starts, "loading", self.shutdown))
        allocs = [r.allocate_kv.remote(self.num_blocks) for r in self.ranks]
        infos = gather_ranks(allocs, "allocating the KV cache and warming up", self.shutdown)
        self.kernel_names, self.device_name, self.decode_graphs, self.graph_max_batch = infos[0]
        self._kv_layout = ray.get(self.ranks[0].kv_layout.remote())
        log.info(
            "tensor parallel x%d ready: %d KV blocks on %s", size, self.num_blocks, self.device_name
        )

    def launch(self, sched: SchedulerOutput, feed: Any = None) -> list[ray.ObjectRef]:
        """Every rank's ``launch`` call; a step planned ahead (``feed``: the step before's
        handle) reads its ids from the draw rank 0 keeps of that step, the step it ran last."""
        if self.stopped or not self.ranks:
            raise RuntimeError(self.stopped or "the tensor-parallel group was shut down")
        assert (feed is None) == (sched.feed_rows is None), "a step planned ahead needs a feed"
        return [r.launch.remote(sched) for r in self.ranks]

    def collect(self, handle: list[ray.ObjectRef]) -> list[SampledToken]:
        refs = [*handle, self.ranks[0].collect.remote()]
        return self._gather(refs, "running a step", ranks=[*range(len(handle)), 0])[-1]

    def ahead_rows(self, sched: SchedulerOutput) -> int:
        """As a rank's runner answers (``DecodeGraphs.fits``)."""
        return self.graph_max_batch if fits_graphs(sched, self.graph_max_batch) else 0

    def synchronize(self) -> None:
        if self.ranks and not self.stopped:
            self._gather([r.synchronize.remote() for r in self.ranks], "waiting for its steps")

    def _gather(self, refs: list[ray.ObjectRef], what: str, ranks: list[int] | None = None):
        """``gather_ranks`` while serving: a rank that fails leaves the others in a collective,
        so the group is stopped for good (the replica's health check then asks Serve for a new
        one) and later steps are refused with why."""
        try:
            return gather_ranks(refs, what, self.shutdown, ranks=ranks)
        except RuntimeError as e:
            self.stopped = f"the tensor-parallel group was stopped: {e}"
            raise

    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        return ray.get(self.ranks[0].read_kv.remote(block_ids))

    def write_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        ref = ray.put(kv.cpu())
        ray.get([r.write_kv.remote(block_ids, ref) for r in self.ranks])

    def stage_kv(self, transfer_id: str, block_ids: list[int]) -> int:
        return ray.get([r.kv.remote("stage", transfer_id, block_ids) for r in self.ranks])[0]

    def take_staged(self, transfer_id: str) -> torch.Tensor:
        kv = ray.get(self.ranks[0].kv.remote("take", transfer_id))
        ray.get([r.kv.remote("drop", transfer_id) for r in self.ranks[1:]])
        return kv

    def drop_staged(self, transfer_id: str) -> None:
        ray.get([r.kv.remote("drop", transfer_id) for r in self.ranks])

    def kv_peers(self) -> list[PeerClient]:
        return [PeerClient(r._actor_id.hex(), actor=r) for r in self.ranks]

    @property
    def kv_layout(self) -> tuple[int, int, int, str]:
        return self._kv_layout

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        self.ranks = []
