"""FlashInfer's paged MLA decode on Hopper (its fa3 kernels): op ``mla_decode``, backend
``flashinfer_fa3``. Contract: ``mla_reference``, plus a plan per step made on the host.

FlashInfer splits a decode batch's work over the SMs on the host, from the sequences' lengths
(``BatchMLAPagedAttentionWrapper.plan``), and its kernels read that split. So the model runner
hands each step's lengths and block tables to ``plan`` before the step's layers run (eager), or
before a CUDA graph replays; every layer of the step then runs under that plan. The graphs of B
decode rows (the decode graph of batch B, the mixed-step graphs of B decode rows beside prefill
chunks) share a wrapper of that batch, whose buffers their captured kernels read: FlashInfer's
plan puts its arrays at the same offsets for the same batch and head count, so a replay after a
new plan computes the new lengths' split (SGLang's and vLLM's FlashInfer MLA graphs work the
same way). The first plan JIT-builds FlashInfer's module (nvcc and FlashInfer's sources are needed;
well under a minute on 16 cores), which the runner's start-up warm-up does.

Memory outside the KV cache's sizing: a 128 MiB workspace, and per wrapper (one per graph
batch, one eager) FlashInfer's 8 MiB device and 8 MiB page-locked work buffers: about 230 MiB of
GPU memory at a largest graph of 128, which the cache's share of free memory leaves room for.

FlashInfer's MLA kernels exist for DeepSeek's latent of 512 + 64 only; a model of other widths
(the test models) runs the Triton kernel through this backend, which says so once in the log
and in ``runs`` (what status reports).

Steps of few decode rows at few heads run the Triton kernel too (``TRITON_ROWS``): there it was
the faster, and such a step makes no host plan. The choice is made per plan from its row count
(a graph's padded batch), so each graph captures one kernel and a replay finds the plan it was
captured under; both kernels read the same paged cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CKV, KPE = 512, 64  # the latent widths FlashInfer's MLA kernels are built for
WORKSPACE_BYTES = 128 << 20  # split-KV partial outputs: FlashInfer's recommended size
# heads per GPU at most -> decode rows at most where the Triton kernel runs in fa3's place.
# Measured on an H100 and an H200 (BENCHMARKS.md, "MLA decode with each tile's pages read a tile
# ahead" and "Tables for the H200"): at 16 heads the Triton kernel with its pages read a tile
# ahead ran 1.03-1.50x fa3's speed at 1-8 sequences of 1k-4k tokens (H100), and
# deepseek-v2-lite's batch-8 step replayed 3.75 ms with it against 3.85 with fa3 (H200); from
# 16 sequences 0.92-0.98x; at 128 heads 0.36-0.83x from one sequence.
TRITON_ROWS: dict[int, int] = {16: 8}


def triton_rows(heads: int) -> int:
    """Decode rows up to which a step of ``heads`` heads runs the Triton kernel (0: none): the
    entry of the fewest heads that covers ``heads``."""
    bounds = [most for most in TRITON_ROWS if heads <= most]
    return TRITON_ROWS[min(bounds)] if bounds else 0


def unavailable() -> str | None:
    """Why FlashInfer's MLA decode cannot run here, or None. Reads files only (no import)."""
    spec = importlib.util.find_spec("flashinfer")
    if spec is None or not spec.submodule_search_locations:
        return "flashinfer is not installed"
    src = Path(next(iter(spec.submodule_search_locations))) / "data" / "csrc"
    if not (src / "batch_mla_sm90_run.cu").is_file():
        return (
            f"FlashInfer's CUDA sources, which its MLA kernels are JIT-built from, are not in {src}"
        )
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if not (shutil.which("nvcc") or (Path(cuda_home) / "bin" / "nvcc").is_file()):
        return "nvcc not found (FlashInfer JIT-builds its MLA kernels at start-up)"
    return None


def csr(lens: Sequence[int], tables: Sequence[Sequence[int]] | np.ndarray, page: int):
    """FlashInfer's paged layout of a decode batch, on the host: (qo_indptr [B + 1], kv_indptr
    [B + 1], kv_indices [pages], kv_lens [B]), int32 arrays. Row i reads the first
    ceil(lens[i] / page) blocks of tables[i] (a list per row, or the decode graphs' [B, width]
    array)."""
    kv_lens = np.asarray(lens, dtype=np.int32)
    pages = -(-kv_lens // page)
    if isinstance(tables, np.ndarray):
        indices = tables[np.arange(tables.shape[1]) < pages[:, None]]  # row by row
    else:
        rows = chain.from_iterable(t[:p] for t, p in zip(tables, pages))
        indices = np.fromiter(rows, np.int32, count=int(pages.sum()))
    assert len(indices) == pages.sum(), "a block table is shorter than its sequence"
    kv_indptr = np.zeros(len(pages) + 1, dtype=np.int32)
    np.cumsum(pages, out=kv_indptr[1:])
    qo = np.arange(len(pages) + 1, dtype=np.int32)
    return qo, kv_indptr, indices.astype(np.int32, copy=False), kv_lens


class FlashInferMLADecode:
    """One worker's MLA decode through FlashInfer: ``plan`` per step, then the op per layer."""

    def __init__(self, backend: str = "fa3", few_rows: bool = True) -> None:
        self.backend = backend  # FlashInfer's: "fa3" (sm_90a), or "fa2" (benchmarks' peer)
        self.few_rows = few_rows  # the Triton kernel for steps of few rows (``TRITON_ROWS``)
        self._wrappers: dict[int | None, Any] = {}  # graph batch -> its wrapper; None: eager
        self._workspace: torch.Tensor | None = None  # shared: one step runs at a time
        self._shape: tuple | None = None  # (heads, page, scale, dtype, device) of the layers
        self._pending: tuple | None = None  # a plan awaiting the layers' shape
        # (wrapper, rows) of the planned step; wrapper None: the Triton kernel runs it
        self._active: tuple[Any, int] | None = None
        self._fallback = None  # the Triton kernel, for latent widths FlashInfer lacks
        self.runs = f"flashinfer_{backend}"  # what runs the op ("triton" after a fallback)
        # The plan's arrays are staged in page-locked memory: CUDA syncs the stream before a
        # copy from pageable memory, which would stall the host until the GPU's queue drains.
        # The staging and FlashInfer's own page-locked buffer are rewritten by the next plan
        # only once this plan's copies are done (``_copied``, recorded after them).
        self._staging: torch.Tensor | None = None
        self._layouts: dict[int, tuple[int, ...]] = {}  # graph batch -> its captured plan layout
        self._triton_graphs: dict[int, bool] = {}  # graph batch -> captured with Triton's kernel
        self._copied: torch.cuda.Event | None = None

    def plan(
        self,
        lens: Sequence[int],  # [B] sequence lengths, the new token included
        tables: Sequence[Sequence[int]],  # [B][>= ceil(len / page)] block ids
        page: int,
        graph_batch: int | None = None,  # decode rows of the graph about to replay; None: eager
    ) -> None:
        """Plan the next step's decode rows. Until a layer has run once (its head count and
        scale are known from the call), the plan waits for that first call, which reads
        ``lens`` and ``tables`` then (in the same step)."""
        if self._fallback is not None or not len(lens):  # no decode rows: no plan to make
            self._pending = None
            return
        self._pending = (graph_batch, page, lens, tables)
        if self._shape is not None:
            self._plan()

    def _plan(self) -> None:
        graph_batch, page, lens, tables = self._pending
        heads, page_cached, scale, dtype, device = self._shape
        assert page == page_cached, (page, page_cached)
        rows = len(lens)
        triton = self.few_rows and rows <= triton_rows(heads)
        if graph_batch is not None:  # a graph replays the kernel it was captured with
            first = self._triton_graphs.setdefault(graph_batch, triton)
            assert first == triton, f"the graphs of {graph_batch} decode rows changed kernel"
        if triton:  # the Triton kernel reads the step's own tensors: no host layout to make
            self._active, self._pending = (None, rows), None
            return
        qo, kv_indptr, indices, kv_lens = csr(lens, tables, page)
        wrapper = self._wrapper(graph_batch, len(tables[0]), device)
        if self._copied is None:
            with torch.cuda.device(device):
                self._copied = torch.cuda.Event()
        else:  # the last plan's copies started its step: done, or about to be
            self._copied.synchronize()
        staged = self._stage((qo, kv_indptr, indices, kv_lens))
        wrapper.plan(*staged, heads, CKV, KPE, page, False, scale, dtype, dtype)
        self._copied.record(torch.cuda.current_stream(device))  # the stream the copies took
        if graph_batch is not None:
            self._check_layout(graph_batch, wrapper)
        self._active, self._pending = (wrapper, rows), None

    def _build(self, rows: int) -> None:
        """Plan ``rows`` one-token rows on the eager wrapper, to no step: the first plan builds
        FlashInfer's module (a JIT build of up to a minute), which this makes happen with the
        first layer's call, in the start-up warm-up, even where no warm-up step nor graph has
        rows enough for FlashInfer's kernel. The eager wrapper is planned again before use."""
        heads, page, scale, dtype, device = self._shape
        arrays = csr([1] * rows, np.zeros((rows, 1), dtype=np.int32), page)
        wrapper = self._wrapper(None, 1, device)
        wrapper.plan(*(torch.from_numpy(a) for a in arrays), heads, CKV, KPE, page, False,
                     scale, dtype, dtype)  # fmt: skip
        torch.cuda.current_stream(device).synchronize()  # its copies done before the next plan

    def _check_layout(self, graph_batch: int, wrapper) -> None:
        """A captured graph reads the plan's arrays where its first plan put them: a later plan
        of that batch must put them there too (FlashInfer 0.6's do: the offsets depend on the
        head count and the SM count alone). A FlashInfer whose plans move them would
        make replays read stale splits; that is an error, not a silent wrong output."""
        try:
            layout = tuple(int(v) for v in wrapper._plan_info)
        except (AttributeError, TypeError):  # a FlashInfer that keeps it otherwise: unchecked
            return
        first = self._layouts.setdefault(graph_batch, layout)
        if layout != first:
            raise RuntimeError(
                f"FlashInfer's MLA plan for the graphs of {graph_batch} decode rows moved its "
                f"arrays since the capture ({first} -> {layout}); set the pool's "
                "cuda_graphs: false or kernels: {mla_decode: triton}"
            )

    def _stage(self, arrays: tuple[np.ndarray, ...]) -> list[torch.Tensor]:
        """Views of the page-locked staging holding ``arrays`` one after another."""
        total = sum(len(a) for a in arrays)
        held = 0 if self._staging is None else len(self._staging)
        if held < total:  # grown by doubling: rarely reallocated
            self._staging = torch.empty(max(total, 2 * held), dtype=torch.int32, pin_memory=True)
        views, at = [], 0
        for a in arrays:
            v = self._staging[at : at + len(a)]
            v.numpy()[:] = a
            views.append(v)
            at += len(a)
        return views

    def _wrapper(self, graph_batch: int | None, width: int, device: torch.device):
        import flashinfer.mla  # a GPU-only dependency, imported when first planned

        if self._workspace is None:
            self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        w = self._wrappers.get(graph_batch)
        if w is None:
            if graph_batch is None:
                w = flashinfer.mla.BatchMLAPagedAttentionWrapper(
                    self._workspace, backend=self.backend
                )
            else:  # the buffers a captured graph reads, sized for the graph's batch
                b = graph_batch

                def i32(n: int) -> torch.Tensor:
                    return torch.zeros(n, dtype=torch.int32, device=device)

                w = flashinfer.mla.BatchMLAPagedAttentionWrapper(
                    self._workspace, use_cuda_graph=True, qo_indptr=i32(b + 1),
                    kv_indptr=i32(b + 1), kv_indices=i32(b * width), kv_len_arr=i32(b),
                    backend=self.backend,
                )  # fmt: skip
            self._wrappers[graph_batch] = w
        return w

    def __call__(
        self,
        q: torch.Tensor,  # [B, H, r + rope]: absorbed queries
        kv_cache: torch.Tensor,  # [N, page, r + rope]
        block_table: torch.Tensor,  # [B, max_blocks] int32 (the plan holds the same)
        seq_lens: torch.Tensor,  # [B] int32
        scale: float,
        v_dim: int,  # r
    ) -> torch.Tensor:  # [B, H, r]
        b, heads, width = q.shape
        if self._fallback is not None or (v_dim, width - v_dim) != (CKV, KPE):
            return self._triton(q, kv_cache, block_table, seq_lens, scale, v_dim)
        if self._shape is None:
            self._shape = (heads, kv_cache.shape[1], scale, q.dtype, q.device)
            if self.few_rows and triton_rows(heads):
                log.info(
                    "mla_decode: steps of up to %d decode rows run the Triton kernel (%d heads), "
                    "larger ones FlashInfer's %s", triton_rows(heads), heads, self.backend,
                )  # fmt: skip
                self._build(triton_rows(heads) + 1)
        if self._pending is not None:
            self._plan()
        assert self._active is not None, "mla_decode through FlashInfer needs a plan per step"
        wrapper, rows = self._active
        assert rows == b, f"planned {rows} decode rows, the step has {b}"
        if wrapper is None:
            return self._triton_kernel()(q, kv_cache, block_table, seq_lens, scale, v_dim)
        out = q.new_empty(b, heads, v_dim)
        wrapper.run(q[..., :v_dim], q[..., v_dim:], kv_cache[..., :v_dim], kv_cache[..., v_dim:],
                    out=out)  # fmt: skip
        return out

    @staticmethod
    def _triton_kernel():
        from pdserve.kernels.mla_decode_triton import mla_decode_triton

        return mla_decode_triton

    def _triton(self, q, kv_cache, block_table, seq_lens, scale, v_dim) -> torch.Tensor:
        if self._fallback is None:
            log.info(
                "mla_decode: FlashInfer's MLA kernels take a latent of %d + %d, this model's "
                "is %d + %d; the Triton kernel runs",
                CKV, KPE, v_dim, q.shape[-1] - v_dim,
            )  # fmt: skip
            self._fallback, self.runs = self._triton_kernel(), "triton"
            self._pending = self._active = None
        return self._fallback(q, kv_cache, block_table, seq_lens, scale, v_dim)
