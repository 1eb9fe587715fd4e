"""TP=2 over gloo: sharded heads, MLPs, experts (MXFP4 blocks split on the intermediate dim) and
vocabulary reproduce the single-process logits, prefill and decode alike."""

from __future__ import annotations

import multiprocessing as mp

import torch

from cluster.block_manager import BlockManager
from cluster.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from cluster.model_runner import ModelRunner
from cluster.parallel import TensorParallel
from cluster.request import Request
from cluster.sampling_params import SamplingParams
from cluster.scheduler import Scheduler


def _logits(path: str, tp: TensorParallel) -> list[torch.Tensor]:
    """Prefill three prompts in chunks, then decode twice; the logits of every sampled row."""
    cfg = EngineConfig(
        model=path,
        dtype="float32",
        cache=CacheConfig(block_size=16, num_blocks=64),
        scheduler=SchedulerConfig(max_num_batched_tokens=40),
    )
    runner = ModelRunner(cfg, ModelConfig.from_dir(path), 512, tp)
    sched = Scheduler(cfg.scheduler, BlockManager(64, 16), 512)
    for i, n in enumerate((5, 37, 60)):
        sched.add(Request(f"r{i}", [(7 * j + i) % 200 + 4 for j in range(n)], SamplingParams()))
    out = []
    for _ in range(5):
        step = sched.schedule()
        logits = runner.compute_logits(step)
        out.append(logits)
        for c, row in zip([c for c in step.chunks if c.sample], logits):
            sched.requests[c.request_id].output_token_ids.append(int(row.argmax()))
    return out


def _rank(rank: int, path: str, init: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    tp = TensorParallel(rank, 2, torch.distributed.group.WORLD)
    logits = _logits(path, tp)
    if rank == 0:
        queue.put([t.tolist() for t in logits])
    torch.distributed.destroy_process_group()


def test_tp2_matches_single_process(tiny_model, tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank, args=(r, tiny_model, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref = _logits(tiny_model, TensorParallel())
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(torch.tensor(g), r, rtol=1e-4, atol=1e-4)
