"""Turns a scheduled step (integers) into tensors, runs the model, samples.

Owns the model, the paged KV cache ``[slots, num_blocks, block_size, width]`` (a slot per
layer, or per full and sliding layer pair: ``kv_groups``; width: MLA's latent and rope key, or
GQA's keys and values, ``ModelConfig.kv_cache_dim``) and the sampler. Both workers use it:
prefill runs chunks, decode runs single tokens, colocated both.
"""

from __future__ import annotations

import logging
import time

import torch

from pdserve.cluster.batch_inputs import BatchInputs
from pdserve.cluster.config import EngineConfig, ModelConfig
from pdserve.cluster.decode_graphs import DecodeGraphs, graph_buckets, graph_mode
from pdserve.cluster.executor import Executor
from pdserve.cluster.kernel_choice import choose_kernels
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.kv_layout import block_rows, gather_blocks, scatter_blocks, warm_up
from pdserve.cluster.kv_sizing import propose_num_blocks
from pdserve.cluster.kv_transport.kv_peer import KVPeer, local_peer_id
from pdserve.cluster.kv_transport.peer_client import PeerClient
from pdserve.cluster.mixed_graphs import MixedGraphs, mixed_buckets, mixed_graph_mode
from pdserve.cluster.model.causal_lm import build
from pdserve.cluster.model.weights import load_weights
from pdserve.cluster.parallel import SINGLE, TensorParallel
from pdserve.cluster.sampler import Draw, SampledToken, Sampler
from pdserve.cluster.scheduler import SchedulerOutput
from pdserve.cluster.step_warmup import warmup_steps
from pdserve.kernels.compile_watch import WATCH

log = logging.getLogger(__name__)


class ModelRunner(Executor):
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        max_model_len: int,
        tp: TensorParallel = SINGLE,
        num_blocks: int | None = None,
        allocate: bool = True,
    ) -> None:
        """Load the model; then size and allocate the KV cache unless ``allocate`` is False
        (a tensor-parallel group agrees on one size first and calls ``allocate_kv``)."""
        self.config, self.model_config, self.tp = config, model_config, tp
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.block_size = config.cache.block_size
        # ===== kernels =====
        self.kernels, self.device_info = choose_kernels(
            config, model_config, self.device, self.dtype
        )
        self.kernel_names = self.kernels.names()
        self.device_name = self.device_info.describe()
        # an MLA decode backend that plans each step on the host (FlashInfer's ``plan``: lens,
        # tables, page, graph batch) is handed the step's decode rows before it runs, eager or
        # replayed; the others take everything from tensors
        mla_plan = getattr(self.kernels.mla_decode, "plan", None)
        self._plan_decode = None if model_config.is_gqa else mla_plan
        # ===== model =====
        start = time.perf_counter()
        with torch.device(self.device):
            self.model = build(
                model_config,
                max_positions=max_model_len,
                kernels=self.kernels,
                dtype=self.dtype,
                tp=tp,
            )
        n = load_weights(
            self.model,
            config.model,
            model_config.num_hidden_layers,
            model_config.fp8_block,
            config.random_weights_seed,
            self.device,
        )
        self.model.eval()
        log.info(
            "loaded %d tensors from %s as %s on %s in %.1fs",
            n,
            config.model if config.random_weights_seed is None else "a random draw",
            self.dtype,
            self.device,
            time.perf_counter() - start,
        )
        self.max_model_len = max_model_len
        self.sampler = Sampler(self.device, config.seed)
        self.kv_peer = KVPeer(self, config.kv_message_timeout_s)
        self.kv_line: str | None = None  # "host:port" of the line serving kv_peer's calls
        self.num_blocks = 0
        self.groups = KVGroups.of(model_config)
        self.graph_mode = graph_mode(
            config, self.device, tp.graph_safe, self.kernels, model_config.is_gqa
        )
        self.graphs: DecodeGraphs | None = None
        self.mixed_mode = mixed_graph_mode(
            config,
            self.device,
            tp.graph_safe,
            self.kernels,
            gqa=model_config.is_gqa,
        )
        self.mixed: MixedGraphs | None = None
        if allocate:
            self.allocate_kv(num_blocks or self.propose_num_blocks())

    # ===== KV cache =====

    def allocate_kv(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` blocks (one more, the spare block no request owns, with
        decode or mixed-step graphs, whose padding rows write it, or sliding layers, whose
        tables name it before their window) and capture the graphs over them."""
        graphs = self.graph_mode != "off" or self.mixed_mode != "off"
        shape = (
            self.groups.num_slots,
            num_blocks + (graphs or self.groups.windowed),
            self.block_size,
            self.model_config.kv_cache_dim,
        )
        self.kv_caches = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.num_blocks = num_blocks
        warm_up(self.kv_caches)  # the block copies load their kernels now
        most = min(self.config.decode_graph_max_batch, self.config.scheduler.max_num_seqs)
        if self.graph_mode != "off":
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.max_model_len,
                graph_buckets(most),
                capture=self.graph_mode == "capture",
                windowed=self.groups.windowed,
                plan=self._plan_decode,
            )
            self.graphs.capture()
            log.info("%s", self.graphs.describe())
        if self.mixed_mode != "off":
            sched = self.config.scheduler
            rows = 0 if self.config.role == "prefill" else most
            tokens = min(self.config.mixed_graph_max_tokens, sched.max_num_batched_tokens)
            self.mixed = MixedGraphs(
                self.model,
                self.kv_caches,
                self.max_model_len,
                *mixed_buckets(rows, tokens),
                capture=self.mixed_mode == "capture",
                window=self.groups.window,
                plan=self._plan_decode,
            )
            tp = self.tp  # every rank takes the group's mean timings: the same path per step
            agree = None if tp.size == 1 else lambda ms: tp.all_reduce(ms) / tp.size
            try:
                self.mixed.capture(agree)
            except torch.OutOfMemoryError as e:
                raise RuntimeError(
                    f"the mixed-step CUDA graphs (steps of up to {tokens} prefill tokens) do not "
                    f"fit in GPU memory beside the KV cache ({num_blocks} blocks): lower "
                    "mixed_graph_max_tokens (YAML cuda_graph_max_tokens) or the KV cache's "
                    "memory fraction"
                ) from e
            log.info("%s", self.mixed.describe())
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB, %d tokens)",
            num_blocks,
            self.block_size,
            self.kv_caches.numel() * self.kv_caches.element_size() / 2**20,
            num_blocks * self.block_size,
        )
        if self.device.type == "cuda":
            if self.config.warmup_steps:
                self.warm_up_steps()
            WATCH.serving()  # start-up's kernels are compiled: a later compile stalls a step
        self.kernel_names = self.kernels.names()  # a backend's first call may hand its op on

    @torch.inference_mode()
    def warm_up_steps(self) -> int:
        """Run the eager steps ``step_warmup`` lists over the empty cache, then zero it: their
        kernels compile now, not during the first requests. Every rank of a tensor-parallel
        group runs the same steps. Returns how many ran."""
        sched = self.config.scheduler
        steps = warmup_steps(
            limit=sched.max_num_batched_tokens,
            crossover=self.kernels.moe_crossover_m,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            max_model_len=self.max_model_len,
            decodes=self.config.role != "prefill",
            graph_max_batch=self.graphs.max_batch if self.graphs else 0,
            max_num_seqs=sched.max_num_seqs,
            windowed=self.groups.windowed,
        )
        start, before = time.perf_counter(), WATCH.totals()["start-up"][0]
        # the eager path, mixed-step graphs aside: serving runs it for steps outside every bucket
        mixed, self.mixed = self.mixed, None
        try:
            for step in steps:
                self.compute_logits(step)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"a step of {step.num_tokens} tokens does not fit in GPU memory beside the "
                f"KV cache ({self.num_blocks} blocks): lower max_num_batched_tokens "
                f"({sched.max_num_batched_tokens}) or the KV cache's memory fraction"
            ) from e
        finally:
            self.mixed = mixed
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.kv_caches.zero_()
        log.info(
            "warm-up: %d eager steps (%s tokens) in %.1fs, %d Triton compiles",
            len(steps),
            ",".join(str(s.num_tokens) for s in steps),
            time.perf_counter() - start,
            WATCH.totals()["start-up"][0] - before,
        )
        return len(steps)

    def propose_num_blocks(self) -> int:
        """How many blocks fit (``kv_sizing``)."""
        return propose_num_blocks(
            self.config,
            self.groups,
            self.model_config.kv_cache_dim,
            self.dtype,
            self.device,
            self.max_model_len,
        )

    # ---- KV blocks in and out (prefill/decode handoff) ----

    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        """[slots, n, block_size, width]: a copy of the given blocks, in order."""
        return gather_blocks(self.kv_caches, block_rows(self.kv_caches, block_ids), slice(None))

    def write_kv(
        self, block_ids: list[int] | torch.Tensor, kv: torch.Tensor, layers: slice = slice(None)
    ) -> None:
        """Scatter ``kv`` [slots, n, block_size, width] into the blocks (into ``layers`` of
        the cache only, for a part of a message), on the current stream."""
        cache = self.kv_caches[layers]
        expect = (cache.shape[0], len(block_ids), *cache.shape[2:])
        if tuple(kv.shape) != expect:
            raise ValueError(
                f"KV of shape {tuple(kv.shape)} for {len(block_ids)} blocks; expected {expect}"
            )
        kv = kv.to(device=self.device, dtype=cache.dtype)
        scatter_blocks(self.kv_caches, block_rows(self.kv_caches, block_ids), kv, layers)

    def stage_kv(self, transfer_id: str, block_ids: list[int]) -> int:
        return self.kv_peer.stage(transfer_id, block_ids)

    def take_staged(self, transfer_id: str) -> torch.Tensor:
        return self.kv_peer.take(transfer_id).cpu()

    def drop_staged(self, transfer_id: str) -> None:
        self.kv_peer.drop(transfer_id)

    def kv_peers(self) -> list[PeerClient]:
        if self.kv_line is not None:  # other replicas reach this peer over the replica's line
            return [PeerClient(local_peer_id(), line=self.kv_line)]
        return [PeerClient(local_peer_id(), local=self.kv_peer)]

    @property
    def kv_layout(self) -> tuple[int, int, int, str]:
        layers, _, block_size, width = self.kv_caches.shape
        return layers, block_size, width, str(self.dtype).removeprefix("torch.")

    # ---- one step ----

    @torch.inference_mode()
    def compute_logits(
        self,
        sched: SchedulerOutput,
        layer_done: dict[int, torch.cuda.Event] | None = None,
        feed: Draw | None = None,
    ) -> torch.Tensor:
        """Run one step and return the logits of the sampled rows [N, vocab] float32. Records
        ``layer_done[i]`` once layer i of an eager step is queued (``layer_marks``); a step
        replayed from a graph empties it. A step planned ahead takes its input tokens from
        ``feed``'s rows ``sched.feed_rows``."""
        if self.graphs is not None and self.graphs.fits(sched):
            if layer_done:  # a replay marks no layer: the KV is staged after the step
                layer_done.clear()
            fed = None if sched.feed_rows is None else self._fed_ids(sched, feed)  # [k]
            logits = self.graphs.run(sched, fed)  # [n, vocab], every chunk's row
            if all(c.sample for c in sched.chunks):
                return logits
            rows = [i for i, c in enumerate(sched.chunks) if c.sample]
            return logits[torch.tensor(rows, dtype=torch.int64, device=self.device)]
        assert sched.feed_rows is None, "a step planned ahead replays a decode graph"
        key = None if self.mixed is None else self.mixed.bucket(sched)
        if key is not None:
            if layer_done:  # as for decode graphs: the KV is staged after the step
                layer_done.clear()
            return self.mixed.run(sched, key)  # [n, vocab], the sampled chunks' rows
        self.plan_eager(sched)
        inputs = BatchInputs.of(sched, self.block_size, self.device, self.groups.window)

        def mark(i: int) -> None:
            if i in layer_done:
                layer_done[i].record()

        mark_layers = mark if layer_done else None
        hidden = self.model(
            inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, mark_layers
        )
        return self.model.compute_logits(hidden[inputs.sample_rows])

    def plan_eager(self, sched: SchedulerOutput) -> None:
        """Hand the decode rows of a step run eagerly (``BatchInputs``' layout) to an MLA
        decode that plans on the host; a no-op for the others."""
        if self._plan_decode is not None:
            decode = [c for c in sched.chunks if len(c.token_ids) == 1]  # as BatchInputs.of
            self._plan_decode(
                [c.end for c in decode], [c.block_ids for c in decode], self.block_size
            )

    def _fed_ids(self, sched: SchedulerOutput, feed: Draw | None) -> torch.Tensor:
        """[k] the input ids a step planned ahead takes from the step before's samples, on the
        device. Under tensor parallelism rank 0 alone samples (its ``feed``; the other ranks'
        is None): the group sums its ids with the others' zeros, so every rank runs them."""
        rows = sched.feed_rows
        if self.tp.size == 1:
            return feed.rows(rows)
        if not rows:  # every rank knows: none calls the group
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        if feed is None:
            return self.tp.all_reduce(torch.zeros(len(rows), dtype=torch.int64, device=self.device))
        return self.tp.all_reduce(feed.rows(rows).clone())  # not in place on the draw

    def ahead_rows(self, sched: SchedulerOutput) -> int:
        if self.graphs is None or not self.graphs.fits(sched):
            return 0
        return self.graphs.max_batch  # the step ahead runs on the decode graphs too

    def synchronize(self) -> None:
        if self.device.type == "cuda":  # the steps' stream only: KV transfers run on others
            torch.cuda.current_stream(self.device).synchronize()

    @torch.inference_mode()
    def launch(
        self, sched: SchedulerOutput, feed: Draw | None = None
    ) -> Draw | torch.cuda.Event | None:
        """Queue one step: the model, then the sampling of every chunk with ``sample`` set.
        A decode step replayed from a graph with greedy or plain random sampling returns
        before the GPU is done with it. A step that samples nothing hands back an event after
        it (None on the CPU): ``collect`` waits for the step all the same, as the blocks it
        writes may be let go once it is collected."""
        assert (feed is None) == (sched.feed_rows is None), "a step planned ahead needs a feed"
        layer_done = self.layer_marks(sched)
        logits = self.compute_logits(sched, layer_done, feed)
        sampled = [c for c in sched.chunks if c.sample]
        if not sampled:
            if self.device.type != "cuda":
                return None
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            return done
        draw = self.sampler.draw(
            logits, [c.sampling for c in sampled], [c.num_output_tokens for c in sampled]
        )
        self.stage_finished(sched, layer_done)
        return draw

    def collect(self, handle: Draw | torch.cuda.Event | None) -> list[SampledToken]:
        if isinstance(handle, torch.cuda.Event):
            handle.synchronize()
            return []
        return [] if handle is None else handle.to_host()

    def layer_marks(self, sched: SchedulerOutput) -> dict[int, torch.cuda.Event]:
        """Prefill role: the layers after which the KV of a prompt this step finishes streams
        out (``KVPeer.layer_marks``); empty for other roles."""
        if self.config.role != "prefill":
            return {}
        return self.kv_peer.layer_marks([len(blocks) for _, blocks in self._sent(sched)])

    def stage_finished(
        self, sched: SchedulerOutput, layer_done: dict[int, torch.cuda.Event] | None = None
    ) -> None:
        """Prefill role: stage the KV of every prompt this step finished (each sampled chunk
        ends its prompt: prefill samples one token), here on the rank, before the scheduler
        frees the blocks; a send waiting for it starts at once (layer group by layer group as
        ``layer_done`` marks them, while the step still runs). Other roles stage nothing."""
        if self.config.role != "prefill":
            return
        for request_id, blocks in self._sent(sched):
            self.kv_peer.stage(request_id, blocks, layer_done)

    def _sent(self, sched: SchedulerOutput) -> list[tuple[str, list[int]]]:
        """(request id, the blocks its prompt's KV travels in) of each prompt the step finishes
        (each sampled chunk ends its prompt in the prefill role): ``KVGroups.sent_blocks``."""
        return [
            (c.request_id, self.groups.sent_blocks(c, self.block_size))
            for c in sched.chunks
            if c.sample
        ]
