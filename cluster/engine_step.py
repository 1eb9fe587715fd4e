"""What an engine step hands between its phases (launch -> collect -> emit), and the output one
sampled token makes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.cluster.detokenizer import IncrementalDetokenizer
from pdserve.cluster.request import FinishReason, Request
from pdserve.cluster.request_output import RequestOutput, TokenLogprob
from pdserve.cluster.sampler import SampledToken
from pdserve.cluster.scheduler import SchedulerOutput


@dataclass(frozen=True)
class LaunchedStep:
    """A step started on the executor; ``collect`` waits for its tokens."""

    sched: SchedulerOutput
    handle: Any  # the executor's, for its ``collect``
    requests: tuple[Request, ...]  # each chunk's request, as launched
    number: int  # the block manager's count of launched steps (``BlockManager.launched``)


@dataclass(frozen=True)
class CollectedStep:
    """A step's tokens, applied to the requests (finished ones have left the scheduler), not
    yet turned into text and outputs: ``emit`` does that."""

    tokens: tuple[tuple[Request, SampledToken, FinishReason | None], ...]


def make_output(
    req: Request,
    tok: SampledToken,
    reason: FinishReason | None,
    detok: IncrementalDetokenizer,
    first: bool,
) -> RequestOutput:
    """``tok``'s output (``first``: the request's first, which carries the prompt ids)."""
    sp = req.sampling
    if not detok.stop:
        detok.add(tok.token_id)
    return RequestOutput(
        request_id=req.request_id,
        token_ids=[tok.token_id],
        text=detok.take(finished=reason is not None),
        logprobs=None
        if sp.logprobs is None
        else [TokenLogprob(tok.token_id, tok.logprob, tok.top_logprobs or ())],
        finished=reason is not None,
        finish_reason=None if reason is None else reason.value,
        stop_reason=req.stop_reason,
        num_prompt_tokens=len(req.prompt_token_ids),
        num_output_tokens=len(req.output_token_ids),
        prompt_token_ids=req.prompt_token_ids if first else None,
    )
