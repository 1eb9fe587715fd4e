"""A load trace: each request's prompt and output lengths and its arrival time, and the prompts.

Everything random is drawn from ``numpy.random.default_rng((seed, stream))`` with one stream
per quantity (input lengths, output lengths, arrivals, prompt ids), so a seed fixes the lengths
whatever the rate: a sweep over rates, or two deployments, see the same requests.

Arrival processes (``arrival_s`` is the offset from the start of the run, the first at 0):
``fixed`` spaces requests 1/rate apart, ``poisson`` draws exponential gaps of mean 1/rate, and
rate ``inf`` sends every request at 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ARRIVALS = ("fixed", "poisson")
MIN_TOKEN_ID = 4  # ids below are often special tokens (bos, eos, pad, unk)
DEFAULT_VOCAB_HIGH = 1000  # prompt ids lie in [4, 1000) when no vocabulary size is known

# one random stream per quantity
_INPUT, _OUTPUT, _ARRIVAL, _PROMPT = 1, 2, 3, 4

# chat prompts are text: words that most BPE vocabularies hold as one token each (with the space)
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those"
).split()


@dataclass(frozen=True)
class TraceRequest:
    input_len: int  # prompt tokens (exact for token-id prompts, about that for chat text)
    output_len: int  # tokens asked for: max_tokens, with ignore_eos
    arrival_s: float  # when to send it, from the start of the run

    def to_json(self) -> dict:
        return {
            "input_len": self.input_len,
            "output_len": self.output_len,
            "arrival_s": self.arrival_s,
        }


@dataclass(frozen=True)
class Trace:
    """The requests of one run, in arrival order; ``seed`` also fixes the prompt ids."""

    requests: tuple[TraceRequest, ...]
    seed: int
    source: str  # how the lengths were made: "fixed", "uniform" or "file:<path>"
    rate: float | None  # requests/s (math.inf: all at once); None: arrivals from a file
    arrival: str  # "fixed", "poisson" or "file"

    def __len__(self) -> int:
        return len(self.requests)

    def at_rate(self, rate: float, arrival: str) -> Trace:
        """The same lengths with arrivals drawn anew for ``rate`` (seeded)."""
        times = arrival_times(len(self.requests), rate, arrival, self.seed)
        reqs = tuple(replace(r, arrival_s=t) for r, t in zip(self.requests, times))
        return replace(self, requests=reqs, rate=rate, arrival=arrival)

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "source": self.source,
            "rate": rate_to_json(self.rate),
            "arrival": self.arrival,
            "requests": [r.to_json() for r in self.requests],
        }

    @classmethod
    def from_json(cls, d: dict) -> Trace:
        reqs = tuple(
            TraceRequest(r["input_len"], r["output_len"], r["arrival_s"]) for r in d["requests"]
        )
        return cls(reqs, d["seed"], d["source"], rate_from_json(d["rate"]), d["arrival"])


def synthetic_trace(
    n: int,
    input_len: int | tuple[int, int],
    output_len: int | tuple[int, int],
    rate: float,
    arrival: str,
    seed: int,
) -> Trace:
    """``n`` requests with fixed lengths or lengths uniform over an inclusive ``(lo, hi)``."""
    if n < 1:
        raise ValueError(f"the number of requests must be >= 1, got {n}")
    ins = lengths(n, input_len, seed, _INPUT, "input length")
    outs = lengths(n, output_len, seed, _OUTPUT, "output length")
    source = "uniform" if isinstance(input_len, tuple) or isinstance(output_len, tuple) else "fixed"
    reqs = tuple(TraceRequest(i, o, 0.0) for i, o in zip(ins, outs))
    return Trace(reqs, seed, source, None, "file").at_rate(rate, arrival)


def lengths(n: int, spec: int | tuple[int, int], seed: int, stream: int, what: str) -> list[int]:
    """``n`` lengths: ``spec`` itself, or uniform over the inclusive range ``spec``."""
    if isinstance(spec, tuple):
        lo, hi = spec
        if not 1 <= lo <= hi:
            raise ValueError(f"{what} range {lo}:{hi} must satisfy 1 <= a <= b")
        rng = np.random.default_rng((seed, stream))
        return [int(x) for x in rng.integers(lo, hi + 1, size=n)]
    if spec < 1:
        raise ValueError(f"{what} must be >= 1, got {spec}")
    return [spec] * n


def arrival_times(n: int, rate: float, arrival: str, seed: int) -> list[float]:
    """Send offsets of ``n`` requests at ``rate`` requests/s, the first at 0."""
    if not rate > 0:
        raise ValueError(f"the request rate must be > 0 (or inf), got {rate}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival process {arrival!r} is not one of {list(ARRIVALS)}")
    if math.isinf(rate):
        return [0.0] * n
    if arrival == "fixed":
        return [i / rate for i in range(n)]
    gaps = np.random.default_rng((seed, _ARRIVAL)).exponential(1.0 / rate, size=n - 1)
    return [0.0] + [float(t) for t in np.cumsum(gaps)]


def load_trace(path: str | Path, seed: int, n: int | None = None) -> Trace:
    """A trace from JSON lines ``{"input_len", "output_len", "arrival_s"?}``, or the trace
    stored in an earlier result file (``bench.serve`` output). The first ``n`` requests when
    ``n`` is given. Arrivals come from the file only if every line has one; they are sorted."""
    path = Path(path)
    text = path.read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and "trace" in doc:
        rows = doc["trace"]["requests"]
    else:
        rows = []
        for k, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{k} is not a JSON object: {e}") from None
    if n is not None:
        if n > len(rows):
            raise ValueError(f"--num-requests {n} exceeds the {len(rows)} requests in {path}")
        rows = rows[:n]
    if not rows:
        raise ValueError(f"trace file {path} holds no requests")
    timed = sum("arrival_s" in r for r in rows)
    if timed not in (0, len(rows)):
        raise ValueError(
            f"{path}: {timed} of {len(rows)} requests have arrival_s; give all or none"
        )
    reqs = []
    for k, r in enumerate(rows):
        i, o, t = r.get("input_len"), r.get("output_len"), r.get("arrival_s", 0.0)
        if not (_count(i) and _count(o)):
            raise ValueError(
                f"{path} request {k}: input_len {i!r}, output_len {o!r} must be ints >= 1"
            )
        if not isinstance(t, int | float) or not t >= 0:
            raise ValueError(f"{path} request {k}: arrival_s {t!r} must be a number >= 0")
        reqs.append(TraceRequest(i, o, float(t)))
    reqs.sort(key=lambda r: r.arrival_s)
    return Trace(tuple(reqs), seed, f"file:{path}", None, "file" if timed else "fixed")


def prompt_token_ids(seed: int, run: int, index: int, length: int, vocab_high: int) -> list[int]:
    """Request ``index``'s prompt in run ``run`` of a sweep: ``length`` ids uniform in
    [MIN_TOKEN_ID, vocab_high). Runs differ, so no run reuses another's prompts (a prefix
    cache would make later runs look faster); the same run of two sweeps sends the same."""
    rng = np.random.default_rng((seed, _PROMPT, run, index))
    return [int(x) for x in rng.integers(MIN_TOKEN_ID, vocab_high, size=length)]


def prompt_text(seed: int, run: int, index: int, length: int) -> str:
    """Like ``prompt_token_ids``, for chat: ``length`` common words, about one token each."""
    rng = np.random.default_rng((seed, _PROMPT, run, index))
    return " ".join(WORDS[int(k)] for k in rng.integers(0, len(WORDS), size=length))


def parse_range(text: str, what: str) -> tuple[int, int]:
    """``"a:b"`` as ``(a, b)`` with 1 <= a <= b."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{what} {text!r} must be two integers a:b")
    lo, hi = int(parts[0]), int(parts[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"{what} {text!r} must satisfy 1 <= a <= b")
    return lo, hi


def parse_rate(text: str) -> float:
    """A request rate: a number > 0, or ``inf``."""
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"request rate {text!r} is not a number or 'inf'") from None
    if not rate > 0 or math.isnan(rate):
        raise ValueError(f"request rate {text!r} must be > 0 (or inf)")
    return rate


def rate_to_json(rate: float | None) -> float | str | None:
    return "inf" if rate is not None and math.isinf(rate) else rate


def rate_from_json(rate: float | str | None) -> float | None:
    return math.inf if rate == "inf" else rate


def _count(x: object) -> bool:
    return type(x) is int and x >= 1
