"""Decode steps replayed from CUDA graphs captured per batch-size bucket.

A pure decode step (every chunk one token) of n sequences, n up to the largest bucket, is padded
to the smallest bucket B >= n: its tokens, positions, cache slots, block tables and sequence
lengths are copied into static buffers, and the graph captured for B replays the whole model and
the LM head over them in one launch. Padding rows write their KV into a scratch block that the
block manager never hands out and attend only to it, so they touch no request's cache. A model
with sliding layers has a second table and slot row for them (``kv_groups``).

Buckets are captured at start-up, largest first, sharing one memory pool. Every kernel on the
decode path takes its launch grid from shapes alone (the MLA decode's split count from the block
table's fixed width, the MoE's from the slot count), so a replay computes what an eager call on
the same buffers would; an attention backend that splits its work on the host (FlashInfer's
MLA) is handed the step's lengths and tables by ``plan`` before each capture and replay.
``capture=False`` runs the same padded path eagerly: CPU tests check the padding and the
buffers that way. A step planned before the tokens it runs are known (``schedule_ahead``) gets
them as a device tensor, copied into the static ids after the host's buffers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from pdserve.cluster.config import EngineConfig
from pdserve.cluster.model.attention_metadata import AttentionMetadata
from pdserve.cluster.scheduler import SchedulerOutput
from pdserve.kernels import KernelSet

log = logging.getLogger(__name__)


# the ops a pure decode step calls: their backends must be graph-safe for decode graphs
DECODE_OPS = ("moe_small", "moe_large")
ATTENTION_DECODE_OP = {False: "mla_decode", True: "gqa_decode"}  # by ModelConfig.is_gqa


def graph_mode(
    config: EngineConfig, device: torch.device, tp_graph_safe: bool, kernels: KernelSet, gqa: bool
) -> str:
    """How a worker runs decode steps: "capture" (graphs replayed), "eager" (the padded path,
    uncaptured) or "off". ``decode_graphs="auto"`` captures on GPUs of the roles that decode,
    unless the tensor-parallel collectives or a decode kernel cannot be captured."""
    mode = config.decode_graphs
    if mode not in ("auto", "off", "eager"):
        raise ValueError(f"decode_graphs must be auto, off or eager, got {mode!r}")
    if mode != "auto":
        return mode
    if device.type != "cuda" or config.role == "prefill":
        return "off"
    if not tp_graph_safe:
        log.info("decode CUDA graphs off: the tensor-parallel collectives cannot be captured")
        return "off"
    unsafe = kernels.not_graph_safe(DECODE_OPS + (ATTENTION_DECODE_OP[gqa],))  # torch's sync
    if unsafe:
        log.info("decode CUDA graphs off: %s cannot be captured", unsafe)
        return "off"
    return "capture"


def capture_graph(
    forward: Callable[[], torch.Tensor], device: torch.device, side: torch.cuda.Stream, pool
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``forward`` run once on ``side`` (its compiles and tuning happen outside the capture),
    then captured into a graph in ``pool`` (None: a new one). The graph and what the captured
    call returned."""
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    # thread_local: KV transfers may run CUDA work on other threads meanwhile
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = forward()
    return graph, out


def plan_padding(plan: Callable[..., None], rows: int, width: int, scratch: int, bs: int) -> None:
    """Hand a host-planning MLA decode ``rows`` padding rows (one token each, tables of
    ``width`` scratch blocks ``scratch``) on the buffers of graph batch ``rows``: the plan a
    graph of that many decode rows is captured under."""
    plan([1] * rows, np.full((rows, width), scratch, dtype=np.int32), bs, rows)


def fits_graphs(sched: SchedulerOutput, max_batch: int) -> bool:
    """Whether ``sched`` is pure decode and small enough for the largest bucket."""
    chunks = sched.chunks
    return 0 < len(chunks) <= max_batch and all(len(c.token_ids) == 1 for c in chunks)


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 16 up to ``max_batch`` (which is always the last)."""
    if max_batch < 1:
        raise ValueError(f"the largest decode graph batch must be >= 1, got {max_batch}")
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return (*small, *range(16, max_batch, 16), max_batch)


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: torch.Tensor,  # [L, num_blocks + 1, block_size, width]; the last is scratch
        max_model_len: int,
        buckets: tuple[int, ...],
        capture: bool,
        windowed: bool = False,  # sliding layers: their own block tables and slots
        # (lens, tables, page, graph batch): called with a step's decode rows before it runs
        plan: Callable[..., None] | None = None,
    ) -> None:
        self.model, self.kv_caches, self.plan = model, kv_caches, plan
        self.buckets = buckets
        self.max_batch = buckets[-1]
        self.capture_enabled = capture
        self.device = kv_caches.device
        self.block_size = kv_caches.shape[2]
        self.scratch_block = kv_caches.shape[1] - 1
        self.width = -(-max_model_len // self.block_size)  # block table columns
        b, w, dev = self.max_batch, self.width, self.device
        # ===== static inputs: the graphs read these addresses on every replay =====
        # ids, positions, slots (and the sliding layers' slots)
        self.tables = 1 + windowed
        self.tokens = torch.zeros(2 + self.tables, b, dtype=torch.int64, device=dev)
        self.lens = torch.ones(b, dtype=torch.int32, device=dev)  # [B] sequence lengths
        # [tables, B, w]: the block tables (the full layers', then the sliding layers')
        self.table = torch.full(
            (self.tables, b, w), self.scratch_block, dtype=torch.int32, device=dev
        )
        self.tokens[2:].fill_(self.scratch_block * self.block_size)
        # host staging, filled with numpy and copied over row by row; two sets, used
        # in turn: a step is staged while the one before it may not have started (planning
        # ahead), and a set is refilled only once its last copies ran (``_staged``)
        pin = dev.type == "cuda"
        self._h_tokens = [
            torch.zeros(2 + self.tables, b, dtype=torch.int64, pin_memory=pin) for _ in range(2)
        ]
        self._h_lens = [torch.ones(b, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._h_table = [
            torch.zeros(self.tables, b, w, dtype=torch.int32, pin_memory=pin) for _ in range(2)
        ]
        self._staged = [torch.cuda.Event() for _ in range(2)] if pin else None
        self._turn = 0
        empty32 = torch.zeros(1, dtype=torch.int32, device=dev)
        self._no_prefill = dict(
            prefill_cu_seqlens_q=empty32,
            prefill_cu_seqlens_k=empty32,
            prefill_ctx_slots=torch.zeros(0, dtype=torch.int64, device=dev),
            prefill_max_q=0,
            prefill_max_k=0,
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # [B, vocab] logits each graph writes

    def fits(self, sched: SchedulerOutput) -> bool:
        """Whether the step is pure decode and small enough for a bucket."""
        return fits_graphs(sched, self.max_batch)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, in one pool (a no-op without capture)."""
        if not self.capture_enabled:
            return
        start = time.perf_counter()
        pool = None
        side = torch.cuda.Stream(self.device)
        for b in reversed(self.buckets):
            if self.plan is not None:  # padding rows alone: each reads the scratch block
                plan_padding(self.plan, b, self.width, self.scratch_block, self.block_size)
            graph, self.outputs[b] = capture_graph(
                lambda b=b: self._forward(b), self.device, side, pool
            )
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        log.info(
            "decode CUDA graphs for batch %s captured in %.1fs",
            ",".join(map(str, self.buckets)),
            time.perf_counter() - start,
        )

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput, fed: torch.Tensor | None = None) -> torch.Tensor:
        """[n, vocab] float32 logits of the step's chunks, in chunk order. ``fed`` [k]: the
        first k chunks' input token ids on the device, for a step planned ahead of them."""
        chunks = sched.chunks
        n = len(chunks)
        b = self.bucket(n)
        bs, scratch = self.block_size, self.scratch_block
        turn, self._turn = self._turn, 1 - self._turn
        if self._staged is not None:  # this set's last copies: long done, as a rule
            self._staged[turn].synchronize()
        h_tokens, h_lens, h_table = self._h_tokens[turn], self._h_lens[turn], self._h_table[turn]
        tokens, lens, table = h_tokens.numpy(), h_lens.numpy(), h_table.numpy()
        table[:, :b] = scratch
        lens[:b] = 1
        tokens[:, :b] = 0
        tokens[2:, :b] = scratch * bs
        for i, c in enumerate(chunks):
            p = c.start
            assert len(c.block_ids) <= self.width, (len(c.block_ids), self.width)
            tokens[0, i], tokens[1, i] = c.token_ids[0], p
            lens[i] = p + 1
            for g, ids in enumerate((c.block_ids, c.window_block_ids)[: self.tables]):
                tokens[2 + g, i] = ids[p // bs] * bs + p % bs
                table[g, i, : len(ids)] = ids
        k = 0 if fed is None else len(fed)  # the first k chunks' tokens come from ``fed``
        tokens[0, :k] = 0  # their FED placeholders
        # row by row: a strided pinned source would be staged through pageable memory, whose
        # copy may wait for the step before
        for r in range(h_tokens.shape[0]):
            self.tokens[r, :b].copy_(h_tokens[r, :b], non_blocking=True)
        self.lens[:b].copy_(h_lens[:b], non_blocking=True)
        for g in range(self.tables):
            self.table[g, :b].copy_(h_table[g, :b], non_blocking=True)
        if self._staged is not None:
            self._staged[turn].record(torch.cuda.current_stream(self.device))
        if k:
            self.tokens[0, :k].copy_(fed)
        if self.plan is not None:
            self.plan(lens[:b], table[0, :b], bs, b if b in self.graphs else None)
        if b in self.graphs:
            self.graphs[b].replay()
            logits = self.outputs[b]
        else:
            logits = self._forward(b)
        return logits[:n]

    def _forward(self, b: int) -> torch.Tensor:
        metas = [
            AttentionMetadata(
                slot_mapping=self.tokens[2 + g, :b],
                num_decode_tokens=b,
                decode_block_table=self.table[g, :b],
                decode_seq_lens=self.lens[:b],
                **self._no_prefill,
            )
            for g in range(self.tables)
        ]
        meta = metas[0] if self.tables == 1 else replace(metas[0], window=metas[1])
        hidden = self.model(self.tokens[0, :b], self.tokens[1, :b], self.kv_caches, meta)
        return self.model.compute_logits(hidden)  # [B, vocab]

    def describe(self) -> str:
        mode = "captured" if self.graphs else "eager (not captured)"
        return f"decode graphs {mode} for batch sizes {','.join(map(str, self.buckets))}"
