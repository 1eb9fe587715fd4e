"""What one streamed request measured, and the latencies derived from it.

Times are ``time.perf_counter()`` seconds. ``scheduled_s`` and ``sent_s`` are offsets from the
start of the run (they differ when a concurrency cap holds a request back); ``chunk_s`` and
``end_s`` are offsets from ``sent_s``. Only chunks that carry output tokens are timed (a chat
stream's opening ``{"role": "assistant"}`` chunk and the usage chunk are not).

Derived, for a successful request:
- TTFT = ``chunk_s[0]``, send to the first token;
- TPOT = ``(chunk_s[-1] - chunk_s[0]) / (output_tokens - 1)``, None for one output token;
- ITL = the gaps between consecutive token-carrying chunks;
- E2E = ``end_s``, send to the end of the stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RequestRecord:
    index: int  # position in the trace
    input_len: int  # prompt tokens asked for
    output_len: int  # max_tokens asked for
    scheduled_s: float = 0.0  # arrival time in the trace
    sent_s: float = 0.0  # when the HTTP request went out
    ok: bool = False  # HTTP 200, no error event, [DONE] seen, at least one token
    status: int | None = None  # HTTP status; None: no response (connection error, timeout)
    error: str | None = None  # why it failed
    chunk_s: list[float] = field(default_factory=list)  # arrival of each token chunk, to 1 us
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of those chunks
    end_s: float | None = None  # the stream ended (or failed)
    prompt_tokens: int | None = None  # from usage
    output_tokens: int | None = None  # from usage; else the tokens counted in chunks
    finish_reason: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_s[0] if self.ok and self.chunk_s else None

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens or 0
        if not self.ok or n < 2 or not self.chunk_s:
            return None
        return (self.chunk_s[-1] - self.chunk_s[0]) / (n - 1)

    @property
    def itl_s(self) -> list[float]:
        if not self.ok:
            return []
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    @property
    def e2e_s(self) -> float | None:
        return self.end_s if self.ok else None

    def meets_slo(self, ttft_s: float, tpot_s: float) -> bool:
        """Succeeded with TTFT <= ``ttft_s`` and TPOT <= ``tpot_s`` (a request of one output
        token has no TPOT and meets that half). A failed request never meets the SLO."""
        ttft, tpot = self.ttft_s, self.tpot_s
        return ttft is not None and ttft <= ttft_s and (tpot is None or tpot <= tpot_s)

    def fail(self, error: str, end_s: float) -> None:
        self.ok, self.error, self.end_s = False, error, end_s

    def to_json(self) -> dict:
        d = asdict(self)
        d["ttft_s"], d["tpot_s"], d["e2e_s"] = self.ttft_s, self.tpot_s, self.e2e_s
        return d

    @classmethod
    def from_json(cls, d: dict) -> RequestRecord:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})
