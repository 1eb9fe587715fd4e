"""Start-up steps that compile the kernels eager steps launch, before the first request.

Triton compiles a kernel at its first launch with a new specialization (``kernels/compile_watch``):
another config bucket (the MoE tables are keyed by token count), an integer argument that newly
equals 1 or divides by 16, another ``constexpr`` such as a window or a prefix. Decode graphs
compile their buckets when they are captured; the eager steps (prefill chunks, mixed steps,
decode batches larger than the largest graph) would compile during the first requests, each
compile stalling every request of its step for 0.3 to 2 s. ``warmup_steps`` lists synthetic
steps that meet those specializations: one chunk of each token count of ``token_counts``
(powers of two, one past each, the MoE crossover and the step's limit), a chunk behind a
cached prefix, and, for roles that decode, mixed steps and decode batches at contexts of a few
blocks to 16k tokens. The runner runs them over the still-empty cache
(``ModelRunner.warm_up_steps``) and zeroes it after.

Schedulers reason about integers: this builds ``SchedulerOutput``s only; the runner makes tensors.
"""

from __future__ import annotations

from pdserve.cluster.sampling_params import SamplingParams
from pdserve.cluster.scheduler import ScheduledChunk, SchedulerOutput

WARMUP_ID = "warmup"


def token_counts(limit: int, crossover: int) -> list[int]:
    """Token counts up to ``limit`` that meet each MoE bucket and integer specialization: 1, 3,
    each power of two from 16 and one past it, the crossover and one below it, the limit."""
    counts = {1, 3, crossover - 1, crossover, limit}
    p = 16
    while p <= limit:
        counts |= {p, p + 1}
        p *= 2
    return sorted(c for c in counts if 1 <= c <= limit)


def _chunks(sizes: list[tuple[int, int]], block_size: int, windowed: bool) -> SchedulerOutput:
    """One step of (tokens, start) chunks of zeros, decodes first as the scheduler orders them;
    each request gets as many blocks as the longest needs, so block ids stay disjoint (with
    sliding layers, the same ids for their table: a slot's full and sliding layers then write
    the same rows, which a warm-up step, whose outputs are dropped, may)."""
    sizes = sorted(sizes, key=lambda s: s[0] != 1)
    blocks = [-(-(start + n) // block_size) for n, start in sizes]
    per = max(blocks)
    return SchedulerOutput(
        chunks=tuple(
            ScheduledChunk(
                request_id=f"{WARMUP_ID}-{i}",
                token_ids=(0,) * n,
                start=start,
                block_ids=tuple(range(i * per, i * per + nb)),
                window_block_ids=tuple(range(i * per, i * per + nb)) if windowed else (),
                sample=True,
                sampling=SamplingParams(max_tokens=1),
                num_output_tokens=0,
            )
            for i, ((n, start), nb) in enumerate(zip(sizes, blocks))
        )
    )


def warmup_steps(
    limit: int,
    crossover: int,
    block_size: int,
    num_blocks: int,
    max_model_len: int,
    decodes: bool,
    graph_max_batch: int = 0,
    max_num_seqs: int = 1,
    windowed: bool = False,
) -> list[SchedulerOutput]:
    """The steps to run at start-up. ``limit``: tokens per step; ``decodes``: the role runs
    decode steps (mixed steps and eager decode batches above ``graph_max_batch``). Steps that
    need more blocks than the cache holds, or positions past ``max_model_len``, are left out."""
    steps = [_chunks([(n, 0)], block_size, windowed) for n in token_counts(limit, crossover)]
    if limit > block_size:
        steps.append(_chunks([(min(17, limit - block_size), block_size)], block_size, windowed))
    if decodes:
        # decode rows at short, middle and long contexts: the decode kernels split a row's
        # context by the width of the step's block table, and these meet each compiled variant
        # (one split or several; a combine of up to 16 splits, or more)
        contexts = sorted({min(c, max_model_len - 1) for c in (2 * block_size, 1024, 16384)})
        if limit > 18:
            for context in contexts:
                steps.append(_chunks([(1, context), (17, 0)], block_size, windowed))
        batches = [b for b in (graph_max_batch + 1, max_num_seqs) if b > graph_max_batch]
        for b in sorted({min(b, limit, max_num_seqs) for b in batches}):
            for context in contexts[:2]:
                steps.append(_chunks([(1, context)] * b, block_size, windowed))

    def fits(step: SchedulerOutput) -> bool:
        highest = max(b for c in step.chunks for b in c.block_ids)  # ids may leave gaps
        return highest < num_blocks and max(c.end for c in step.chunks) <= max_model_len

    return [s for s in steps if fits(s)]
