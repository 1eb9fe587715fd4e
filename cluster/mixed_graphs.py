"""Steps that carry prefill chunks, replayed from CUDA graphs captured per bucket.

Eager, every kernel of a step is one launch from Python: on DeepSeek-V2-Lite (27 layers) a
step's host work alone takes about 26 ms, so a step that prefills a short prompt waits on the
host far longer than on the GPU (``bench.mixed_step``). Decode steps replay ``DecodeGraphs``;
this does the same for steps with prefill chunks (colocated mode, prefill replicas).

A step of ``nd`` decode rows and up to ``MAX_PREFILLS`` prefill chunks of ``tq`` tokens in all,
whose chunks attend to ``tk`` context tokens (their own included), runs in the graph of bucket
``(bd, tp)``: the smallest decode bucket ``bd >= nd`` and token bucket ``tp >= tk`` (which
holds the tokens, ``tk >= tq``). Its layout:

- rows ``[0, bd)``: the decode rows, then padding rows that write their KV into the scratch
  block and attend only to it (as in ``DecodeGraphs``);
- rows ``[bd, bd + tp)``: the chunks' tokens, then ``tp - tq`` padding tokens that write their
  KV into the scratch block's first slot and form one more prefill sequence with no keys (its
  rows come out zero: every row of the step is finite);
- ``MAX_PREFILLS + 1`` prefill sequences: the chunks, empty ones, the padding's; their context
  rows (``tp`` in all) gathered from the cache, padding entries naming the scratch slot.

The prefill attention's grid takes ``tp`` as its longest query (blocks past a sequence's queries
do nothing) and reads each sequence's lengths on the device, so one graph serves any chunks that
fit. At start-up each bucket's replay and the same padded step launched eagerly are timed (the
figures agreed over a tensor-parallel group): a step replays its graph only where that replay
beat the eager step of its tokens' own bucket, so large steps of a few wide layers (the GPU the
busier side) and short chunks after a long cached context keep the plain eager path. Logits
come out for every decode row and the last token of every prefill sequence
(``bd + MAX_PREFILLS`` rows); the caller keeps the rows it samples. Models with sliding layers
(GPT-OSS) stage a second set of slots, block tables and context rows, their window's, as
``BatchInputs`` does. An MLA decode that plans each step on the host (FlashInfer's) is handed
the bucket's decode rows (padding included) before every capture, timing and replay, as
``DecodeGraphs`` does: a graph of ``bd`` decode rows reads the plan buffers of FlashInfer's
wrapper for batch ``bd``, which a decode graph of that batch (if captured) shares.
``capture=False`` runs the same padded path uncaptured: CPU tests check the padding that way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from pdserve.cluster.batch_inputs import context_slots
from pdserve.cluster.config import EngineConfig
from pdserve.cluster.decode_graphs import capture_graph, plan_padding
from pdserve.cluster.model.attention_metadata import AttentionMetadata
from pdserve.cluster.scheduler import SchedulerOutput
from pdserve.kernels import KernelSet

log = logging.getLogger(__name__)

MAX_PREFILLS = 8  # prefill chunks one captured step holds


# the ops a mixed step calls whose backends must be graph-safe: the MoE's and, by
# ModelConfig.is_gqa, the attention's
MIXED_OPS = ("moe_small", "moe_large")
ATTENTION_OPS = {False: ("mla_decode", "mla_prefill"), True: ("gqa_decode", "gqa_prefill")}


def mixed_graph_mode(
    config: EngineConfig,
    device: torch.device,
    tp_graph_safe: bool,
    kernels: KernelSet,
    gqa: bool,  # ModelConfig.is_gqa: the attention ops the model calls
) -> str:
    """How a worker runs steps with prefill chunks: "capture", "eager" (the padded path,
    uncaptured) or "off" (the plain eager path). ``mixed_graphs="auto"`` captures on GPUs of
    the roles that prefill, unless the collectives or a kernel the model calls cannot be
    captured."""
    mode = config.mixed_graphs
    if mode not in ("auto", "off", "eager"):
        raise ValueError(f"mixed_graphs must be auto, off or eager, got {mode!r}")
    if mode == "off" or config.mixed_graph_max_tokens == 0:
        return "off"
    if config.mixed_graph_max_tokens < 2:
        raise ValueError(
            f"mixed_graph_max_tokens must be 0 (off) or >= 2, got {config.mixed_graph_max_tokens}"
        )
    if mode == "eager":
        return "eager"
    if device.type != "cuda" or config.role == "decode":
        return "off"
    if not tp_graph_safe:
        log.info("mixed-step CUDA graphs off: the tensor-parallel collectives cannot be captured")
        return "off"
    unsafe = kernels.not_graph_safe(MIXED_OPS + ATTENTION_OPS[gqa])
    if unsafe:
        log.info("mixed-step CUDA graphs off: %s cannot be captured", unsafe)
        return "off"
    return "capture"


def mixed_buckets(max_batch: int, max_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(decode-row buckets, token buckets): 0, 4, 16, 64, ... up to ``max_batch`` (always the
    last; 0 alone for a prefill replica's ``max_batch`` 0), and 16, 32, 64, ... up to
    ``max_tokens`` (always the last)."""
    if max_batch < 0 or max_tokens < 2:
        raise ValueError(f"mixed graph buckets need max_batch >= 0 and max_tokens >= 2, got "
                         f"{max_batch} and {max_tokens}")  # fmt: skip
    rows = [0] + [4**i for i in range(1, 8) if 4**i < max_batch]
    tokens = [16 << i for i in range(20) if 16 << i < max_tokens]
    return (*rows, *([max_batch] if max_batch else [])), (*tokens, max_tokens)


class MixedGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: torch.Tensor,  # [L, num_blocks + 1, block_size, width]; the last is scratch
        max_model_len: int,
        row_buckets: tuple[int, ...],
        token_buckets: tuple[int, ...],
        capture: bool,
        window: int = 0,  # the sliding layers' window (0: none): their own tables and slots
        plan: Callable[..., None] | None = None,  # the MLA decode's host plan, if it has one
    ) -> None:
        self.model, self.kv_caches, self.plan = model, kv_caches, plan
        self.row_buckets, self.token_buckets = row_buckets, token_buckets
        self.capture_enabled = capture
        self.device = dev = kv_caches.device
        self.block_size = kv_caches.shape[2]
        self.scratch_block = kv_caches.shape[1] - 1
        self.width = -(-max_model_len // self.block_size)  # decode block table columns
        self.window = window
        self.tables = g = 1 + (window > 0)  # the full layers' tables, then the sliding ones'
        bd, tp, s = row_buckets[-1], token_buckets[-1], MAX_PREFILLS + 1

        def buffers(pin: bool, dev: torch.device | None) -> dict[str, torch.Tensor]:
            i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.int64, device=dev)
            if pin:
                i32["pin_memory"] = i64["pin_memory"] = True
            return dict(
                # [2 + g, bd + tp]: ids, positions, slots per table (decode rows, then tokens)
                tokens=torch.zeros(2 + g, bd + tp, **i64),
                lens=torch.ones(max(bd, 1), **i32),  # [bd]
                table=torch.zeros(g, max(bd, 1), self.width, **i32),  # [g, bd, width]
                cu=torch.zeros(1 + g, s + 1, **i32),  # [1 + g, S + 1]: q, then k per table
                ctx=torch.zeros(g, tp, **i64),  # [g, tp] context slots per table
                rows=torch.zeros(bd + MAX_PREFILLS, **i64),  # logit rows
            )

        # ===== static inputs, sized for the largest bucket; a bucket's graph reads prefixes =====
        static = buffers(False, dev)
        self.tokens, self.lens, self.table = static["tokens"], static["lens"], static["table"]
        self.cu, self.ctx, self.rows = static["cu"], static["ctx"], static["rows"]
        # host staging, filled with numpy and copied over: two sets used in turn (a rank that
        # queues a step while the one before runs), each refilled once its last copies ran
        pin = dev.type == "cuda"
        self._host = [buffers(pin, None) for _ in range(2)]
        self._staged = [torch.cuda.Event() for _ in range(2)] if pin else None
        self._turn = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # [bd + S, vocab] float32: every bucket's logits, in one buffer (made by the first run,
        # outside any capture) rather than one per graph
        self.logits: torch.Tensor | None = None
        # (bd, tp) -> (eager ms, replay ms) of the padded step, timed at capture
        self.times: dict[tuple[int, int], tuple[float, float]] = {}
        self.capture_s = 0.0  # start-up's capture and timing, seconds
        self.capture_mib = 0.0  # GPU memory it reserved (graph pool, eager timings' buffers)

    def bucket(self, sched: SchedulerOutput) -> tuple[int, int] | None:
        """The step's ``(bd, tp)``, or None where it runs eagerly: pure decode, more prefill
        chunks or context than the largest bucket holds, or (once captured) a
        replay no faster than the eager step of its tokens' own bucket."""
        chunks = sched.chunks
        nd = sched.num_decode_chunks
        prefill = chunks[nd:]
        if not prefill or len(prefill) > MAX_PREFILLS:
            return None
        tq = sum(len(c.token_ids) for c in prefill)
        tk = sum(c.end for c in prefill)
        bd = next((b for b in self.row_buckets if b >= nd), None)
        tp = next((t for t in self.token_buckets if t >= tk), None)
        if bd is None or tp is None:
            return None
        if self.times:  # captured: the graph where it beat the eager step of the tokens alone
            own = next(t for t in self.token_buckets if t >= tq)
            if self.times[bd, tp][1] >= self.times[bd, own][0]:
                return None
        return bd, tp

    @torch.inference_mode()
    def capture(self, agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Capture every bucket, largest first, in one pool, and time each one's replay and the
        same padded step launched eagerly (synchronized; the best of two after an untimed
        run). ``agree`` [2] -> [2]: the figures every rank of a tensor-parallel group then
        uses (their mean), so that all ranks pick the same path for a step. A no-op without
        capture."""
        if not self.capture_enabled:
            return
        start, reserved = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        pool = None
        side = torch.cuda.Stream(self.device)
        for key in sorted(((b, t) for b in self.row_buckets for t in self.token_buckets),
                          key=lambda k: (-k[1], -k[0])):  # fmt: skip
            self._stage_padding(*key)
            if self.plan is not None and key[0]:  # padding rows alone, on batch bd's buffers
                plan_padding(self.plan, key[0], self.width, self.scratch_block, self.block_size)
            graph, _ = capture_graph(lambda k=key: self._forward(*k), self.device, side, pool)
            pool = graph.pool()
            self.graphs[key] = graph
            self._forward(*key)  # untimed: the eager path's memory on this stream
            eager = min(self._ms(lambda k=key: self._forward(*k)) for _ in range(2))
            replay = min(self._ms(graph.replay) for _ in range(2))
            ms = torch.tensor([eager, replay], dtype=torch.float32, device=self.device)
            ms = agree(ms) if agree is not None else ms
            self.times[key] = (float(ms[0]), float(ms[1]))
        self.capture_s = time.perf_counter() - start
        self.capture_mib = (torch.cuda.memory_reserved(self.device) - reserved) / 2**20
        slower = [f"{b}x{t}" for (b, t), (e, r) in sorted(self.times.items()) if r >= e]
        log.info(
            "mixed-step CUDA graphs for %d decode-row x token buckets captured in %.1fs "
            "(%.0f MiB more GPU memory reserved)%s",
            len(self.graphs),
            self.capture_s,
            self.capture_mib,
            f"; replay no faster than eager at {', '.join(slower)}" if slower else "",
        )

    def _ms(self, fn) -> float:
        """Milliseconds of ``fn``'s work, host and GPU, synchronized before and after."""
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(self.device)
        return (time.perf_counter() - t0) * 1e3

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput, key: tuple[int, int]) -> torch.Tensor:
        """[n, vocab] float32 logits of the step's sampled chunks, in chunk order, run in
        bucket ``key`` (``bucket(sched)``)."""
        bd, tp = key
        nd = sched.num_decode_chunks
        turn, self._turn = self._turn, 1 - self._turn
        tokens, lens, table, cu, ctx, rows = self._fresh(bd, tp, turn)
        bs, g = self.block_size, self.tables
        sample: list[int] = []
        for i, c in enumerate(sched.chunks[:nd]):
            p = c.start
            assert len(c.block_ids) <= self.width, (len(c.block_ids), self.width)
            tokens[:2, i] = c.token_ids[0], p
            lens[i] = p + 1
            for t, ids in enumerate((c.block_ids, c.window_block_ids)[:g]):
                tokens[2 + t, i] = ids[p // bs] * bs + p % bs
                table[t, i, : len(ids)] = ids
            if c.sample:
                sample.append(i)
        q, k = 0, [0] * g  # prefill tokens and context rows per table so far
        for j, c in enumerate(sched.chunks[nd:]):
            n = len(c.token_ids)
            r = bd + q
            tokens[0, r : r + n] = c.token_ids
            tokens[1, r : r + n] = np.arange(c.start, c.end)
            for t, ids in enumerate((c.block_ids, c.window_block_ids)[:g]):
                slots = context_slots(c, ids, self.window if t else 0, bs)  # its own last
                tokens[2 + t, r : r + n] = slots[-n:]
                ctx[t, k[t] : k[t] + len(slots)] = slots
                k[t] += len(slots)
                cu[1 + t, j + 1] = k[t]
            q += n
            cu[0, j + 1] = q
            rows[bd + j] = r + n - 1
            if c.sample:
                sample.append(bd + j)
        # empty sequences, then the padding's (its queries, no keys)
        cu[0, j + 2 : MAX_PREFILLS + 1] = q
        cu[0, MAX_PREFILLS + 1] = tp
        for t in range(g):
            cu[1 + t, j + 2 :] = k[t]
        self._copy(bd, tp, turn)
        if self.plan is not None and bd:
            self.plan(lens[:bd], table[0, :bd], bs, bd if key in self.graphs else None)
        if key in self.graphs:
            self.graphs[key].replay()
            logits = self.logits[: bd + MAX_PREFILLS]
        else:
            logits = self._forward(bd, tp)
        index = torch.tensor(sample, dtype=torch.int64).to(self.device, non_blocking=True)
        return logits.index_select(0, index)

    def _fresh(self, bd: int, tp: int, turn: int) -> tuple[np.ndarray, ...]:
        """The host staging for bucket (bd, tp), reset to a step of padding alone: padding
        rows and tokens on the scratch block, every prefill sequence empty but the padding's
        queries."""
        if self._staged is not None:  # this set's last copies: long done, as a rule
            self._staged[turn].synchronize()
        scratch_slot = self.scratch_block * self.block_size
        h = self._host[turn]
        tokens, lens, table = h["tokens"].numpy(), h["lens"].numpy(), h["table"].numpy()
        cu, ctx, rows = h["cu"].numpy(), h["ctx"].numpy(), h["rows"].numpy()
        tokens[:, : bd + tp] = 0
        tokens[2:, : bd + tp] = scratch_slot
        lens[:bd] = 1
        table[:, :bd] = self.scratch_block
        ctx[:, :tp] = scratch_slot
        cu[:, :] = 0
        cu[0, MAX_PREFILLS + 1] = tp
        rows[:bd] = np.arange(bd)
        rows[bd : bd + MAX_PREFILLS] = bd  # empty sequences: any row
        return tokens, lens, table, cu, ctx, rows

    def _stage_padding(self, bd: int, tp: int) -> None:
        self._fresh(bd, tp, self._turn)
        self._copy(bd, tp, self._turn)

    def _copy(self, bd: int, tp: int, turn: int) -> None:
        """Staging set ``turn``'s bucket (bd, tp) to the static inputs, row by row (a strided
        pinned source would be staged through pageable memory)."""
        h = self._host[turn]
        for r in range(2 + self.tables):
            self.tokens[r, : bd + tp].copy_(h["tokens"][r, : bd + tp], non_blocking=True)
        if bd:
            self.lens[:bd].copy_(h["lens"][:bd], non_blocking=True)
        for t in range(self.tables):
            if bd:
                self.table[t, :bd].copy_(h["table"][t, :bd], non_blocking=True)
            self.ctx[t, :tp].copy_(h["ctx"][t, :tp], non_blocking=True)
        for r in range(1 + self.tables):
            self.cu[r].copy_(h["cu"][r], non_blocking=True)
        n = bd + MAX_PREFILLS
        self.rows[:n].copy_(h["rows"][:n], non_blocking=True)
        if self._staged is not None:
            self._staged[turn].record(torch.cuda.current_stream(self.device))

    def _forward(self, bd: int, tp: int) -> torch.Tensor:  # [bd + S, vocab]
        t = bd + tp
        metas = [
            AttentionMetadata(
                slot_mapping=self.tokens[2 + g, :t],
                num_decode_tokens=bd,
                decode_block_table=self.table[g, :bd],
                decode_seq_lens=self.lens[:bd],
                prefill_cu_seqlens_q=self.cu[0],
                prefill_cu_seqlens_k=self.cu[1 + g],
                prefill_ctx_slots=self.ctx[g, :tp],
                prefill_max_q=tp,
                prefill_max_k=tp,
            )
            for g in range(self.tables)
        ]
        meta = metas[0] if self.tables == 1 else replace(metas[0], window=metas[1])
        hidden = self.model(self.tokens[0, :t], self.tokens[1, :t], self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[self.rows[: bd + MAX_PREFILLS]])
        if self.logits is None:
            rows = self.row_buckets[-1] + MAX_PREFILLS
            self.logits = logits.new_empty(rows, logits.shape[1])
        out = self.logits[: bd + MAX_PREFILLS]
        out.copy_(logits)
        return out

    def describe(self) -> str:
        rows, tokens = ",".join(map(str, self.row_buckets)), ",".join(map(str, self.token_buckets))
        if not self.graphs:
            return f"mixed-step graphs uncaptured for decode rows {rows} x tokens {tokens}"
        timed = ", ".join(
            f"{b}x{t} {e:.1f}/{r:.1f}" for (b, t), (e, r) in sorted(self.times.items())
        )
        return (
            f"mixed-step graphs for decode rows {rows} x tokens {tokens}, captured in "
            f"{self.capture_s:.1f} s, {self.capture_mib:.0f} MiB (eager/replay ms: {timed})"
        )
