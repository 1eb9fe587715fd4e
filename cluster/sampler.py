"""Pick the next token of every sampled sequence: greedy, or temperature / top-k / top-p.

Random rows sample by the exponential race (argmax of p / q with q ~ Exp(1)), which equals a
draw from p. A seeded request draws its noise from a generator keyed by (seed, token index), so
its tokens do not depend on the batch it ran in, on preemption, or on which worker sampled which
token (the prefill worker samples the first, a decode worker the rest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from pdserve.cluster.sampling_params import SamplingParams

_MASK = (1 << 63) - 1


def token_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for token ``index`` of a request seeded with ``seed``."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93) & _MASK


def _on(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on ``device`` without waiting for the device's queued work (a plain
    copy to a GPU waits for the stream: it would stall a step launched ahead)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the sampled token under the model's distribution
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # (token id, logprob), best first


@dataclass(frozen=True)
class Draw:
    """Sampled tokens still on the device (the device may still be computing them)."""

    tokens: torch.Tensor  # [N] int64
    want: tuple[int | None, ...]  # per row: top logprobs wanted (0: the chosen one's), or None
    chosen: torch.Tensor | None = None  # [N] logprob of each sampled token, when any row wants
    top: tuple[torch.Tensor, torch.Tensor] | None = None  # ([N, k] logprobs, [N, k] ids)
    host: tuple[torch.Tensor, ...] = ()  # on a GPU: the parts' copies to the host, under way
    copied: torch.cuda.Event | None = None  # recorded after those copies

    def parts(self) -> list[torch.Tensor]:
        return [self.tokens, *(() if self.chosen is None else (self.chosen,)), *(self.top or ())]

    def start_copy(self) -> Draw:
        """This draw with its copy to the host queued now, behind the sampling: a step queued
        later on the device then does not hold ``to_host`` back. The copies go into pinned
        memory and ``to_host`` waits on an event: a copy into pageable memory would wait for
        the step inside the driver, and other threads' copies behind it (a KV transfer's on
        the decode side, which then lands a step or more late)."""
        if not self.tokens.is_cuda:
            return self
        host = tuple(x.to("cpu", non_blocking=True) for x in self.parts())
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.tokens.device))  # the copies' stream
        return replace(self, host=host, copied=done)

    def rows(self, rows: Sequence[int]) -> torch.Tensor:
        """[len(rows)] the token ids sampled in ``rows``, on the device, without waiting."""
        if tuple(rows) == tuple(range(len(rows))):
            return self.tokens[: len(rows)]
        return self.tokens[_on(self.tokens.device, list(rows), torch.int64)]

    def to_host(self) -> list[SampledToken]:
        """Wait for the device and hand the tokens over, one per row."""
        if self.copied is not None:
            self.copied.synchronize()
        parts = list(self.host) or self.parts()
        tokens = parts[0].tolist()
        if self.chosen is None:
            return [SampledToken(t) for t in tokens]
        chosen = parts[1].tolist()
        top_v, top_i = (None, None) if self.top is None else (t.tolist() for t in parts[2:])
        out = []
        for i, (t, w) in enumerate(zip(tokens, self.want)):
            if w is None:
                out.append(SampledToken(t))
                continue
            top = tuple(zip(top_i[i][:w], top_v[i][:w])) if w else ()
            out.append(SampledToken(t, chosen[i], top))
        return out


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,  # [N, V] float32
        params: list[SamplingParams],
        token_index: list[int],  # index of the token being sampled within each request's output
    ) -> list[SampledToken]:
        return self.draw(logits, params, token_index).to_host()

    @torch.inference_mode()
    def draw(
        self,
        logits: torch.Tensor,  # [N, V] float32
        params: list[SamplingParams],
        token_index: list[int],  # index of the token being sampled within each request's output
    ) -> Draw:
        """Queue the sampling and its copy to the host on the logits' device;
        ``Draw.to_host`` waits for it. Greedy batches queue without waiting for the device."""
        tokens = logits.argmax(dim=-1)  # [N]; greedy rows keep this
        rand_rows = [i for i, p in enumerate(params) if not p.greedy]
        if rand_rows:
            rows = _on(logits.device, rand_rows, torch.int64)
            probs = self._filtered_probs(logits[rows], [params[i] for i in rand_rows])
            noise = torch.empty_like(probs)
            for j, i in enumerate(rand_rows):
                seed = params[i].seed
                g = self.generator
                if seed is not None:
                    g = torch.Generator(device=logits.device).manual_seed(
                        token_seed(seed, token_index[i])
                    )
                noise[j].exponential_(generator=g)
            tokens[rows] = (probs / noise).argmax(dim=-1)
        want = tuple(p.logprobs for p in params)
        if all(w is None for w in want):
            return Draw(tokens, want).start_copy()
        logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [N]
        k = max(w or 0 for w in want)
        top = logprobs.topk(k, dim=-1) if k else None  # values, indices [N, k]
        return Draw(tokens, want, chosen, top).start_copy()

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, then top-k and top-p over the sorted logits -> probabilities [R, V]."""
        dev = logits.device
        temp = _on(dev, [p.temperature for p in params], torch.float32)[:, None]
        scaled = logits / temp
        top_k = [p.top_k if p.top_k > 0 else logits.shape[1] for p in params]
        top_p = [p.top_p for p in params]
        if min(top_k) >= logits.shape[1] and min(top_p) >= 1.0:
            return torch.softmax(scaled, dim=-1)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [R, V]
        rank = torch.arange(logits.shape[1], device=dev)[None, :]
        drop = rank >= _on(dev, top_k, torch.int64)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p; the best token always stays
        before = probs.cumsum(dim=-1) - probs
        drop = before >= _on(dev, top_p, torch.float32)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(scaled, float("-inf")).scatter_(1, order, sorted_logits)
        return torch.softmax(filtered, dim=-1)
