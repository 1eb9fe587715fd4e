"""Multi-turn chat against a running deployment: what a prefix cache saves.

    pdserve bench --url http://127.0.0.1:8000 --conversations 8 --turns 4 --system-len 1024 \
        --user-len 64 --output-len 64

(or ``python -P -m pdserve.bench.conversations`` with the same flags).

Every conversation opens with the same system prompt (``--system-len`` token ids) and its own
first user message; each later turn's prompt is the previous prompt, the answer to it (the
token ids the server returned) and a new user message, as a chat client resends its history.
Conversations run side by side, each turn after the one before. Prompts are token ids
(``/v1/completions`` with ``return_token_ids``), drawn from ``--seed``.

From the deployment's ``/metrics`` before and after: prompt tokens admitted to a batch and
those the prefix cache held, in the pool that computes prompts (prefill; decode when
colocated), so the tokens computed are their difference; the KV bytes the decode pool
received, and those it did not need because its own prefix cache held them (a conversation's
earlier turns ran there: Serve's router sends each turn where its prefix went). Printed as a
table; ``--out`` writes them with every turn's record as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.request
from dataclasses import dataclass

import numpy as np

from pdserve.bench.request_record import RequestRecord
from pdserve.bench.result_file import write_result
from pdserve.bench.sse_client import SSEClient
from pdserve.bench.trace import MIN_TOKEN_ID

COUNTERS = {  # metric -> what it counts, summed over the label given
    "prefix_cache_queries_total": "prompt tokens admitted",
    "prefix_cache_hits_total": "of which cached",
    "kv_transfer_bytes_total": "KV bytes moved",
    "kv_transfer_saved_bytes_total": "KV bytes decode held, not moved",
    "prompt_tokens_total": "prompt tokens served",
}


@dataclass(frozen=True)
class Shape:
    conversations: int
    turns: int
    system_len: int
    user_len: int
    output_len: int
    vocab: int
    seed: int


def counters(url: str) -> dict[str, dict[str, float]]:
    """``pdserve_<name>`` counter values by pool, from ``GET {url}/metrics``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {name: {} for name in COUNTERS}
    for line in text.splitlines():
        for name in COUNTERS:
            prefix = f"pdserve_{name}{{"
            if line.startswith(prefix):
                labels, value = line[len(prefix) :].rsplit("} ", 1)
                pool = labels.split('pool="', 1)[1].split('"', 1)[0]
                out[name][pool] = float(value)
    return out


async def _conversation(
    client: SSEClient, model: str, shape: Shape, system: list[int], index: int
) -> list[RequestRecord]:
    rng = np.random.default_rng((shape.seed, 1 + index))
    prompt = list(system)
    records = []
    for turn in range(shape.turns):
        prompt += rng.integers(MIN_TOKEN_ID, shape.vocab, shape.user_len).tolist()
        record = RequestRecord(index * shape.turns + turn, len(prompt), shape.output_len)
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": shape.output_len,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
            "stream": True,
        }
        ids: list[int] = []
        await client.stream("/v1/completions", json.dumps(body).encode(), record, ids)
        records.append(record)
        if not record.ok:
            break  # the history is broken: the conversation ends here
        prompt += ids
    return records


async def run(url: str, model: str | None, shape: Shape) -> tuple[list[RequestRecord], dict]:
    rng = np.random.default_rng((shape.seed, 0))
    system = rng.integers(MIN_TOKEN_ID, shape.vocab, shape.system_len).tolist()
    before = counters(url)
    async with SSEClient(url) as client:
        model = model or (await client.model_ids())[0]
        turns = await asyncio.gather(
            *(_conversation(client, model, shape, system, i) for i in range(shape.conversations))
        )
    after = counters(url)
    delta = {
        name: {pool: after[name][pool] - before[name].get(pool, 0.0) for pool in after[name]}
        for name in COUNTERS
    }
    return [r for conv in turns for r in conv], delta


def summary(records: list[RequestRecord], delta: dict) -> dict:
    """TTFT percentiles over all turns, and the counters of the pool that computes prompts."""
    ttft = [r.ttft_s for r in records if r.ok]
    queries = delta["prefix_cache_queries_total"]
    pool = "prefill" if queries.get("prefill") else "decode"
    admitted = queries.get(pool, 0.0)
    hits = delta["prefix_cache_hits_total"].get(pool, 0.0)
    moved = delta["kv_transfer_bytes_total"].get("decode", 0.0)
    held = delta["kv_transfer_saved_bytes_total"].get("decode", 0.0)
    return {
        "requests": len(records),
        "failed": sum(not r.ok for r in records),
        "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)) if ttft else None,
        "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)) if ttft else None,
        "prompt_pool": pool,
        "prompt_tokens_admitted": admitted,
        "prompt_tokens_cached": hits,
        "prompt_tokens_computed": admitted - hits,
        "kv_bytes_moved": moved,
        "kv_bytes_held_by_decode": held,
        # what the transfers would have carried without the decode side's prefix cache
        "kv_bytes_fewer_x": (moved + held) / moved if moved else None,
        "decode_prefix_tokens_held": delta["prefix_cache_hits_total"].get("decode", 0.0)
        if pool == "prefill"
        else 0.0,
    }


OUTPUT_LEN, VOCAB, LABEL = 64, 1000, "conversations"  # defaults where no flag gives them


def add_arguments(p: argparse.ArgumentParser, standalone: bool = True) -> None:
    """The trace's own flags on ``p``; ``standalone`` adds those ``pdserve bench`` shares with
    its load generator (--url, --model, --output-len, --vocab-size, --seed, --label, --out)."""
    g = p.add_argument_group("multi-turn chat (pdserve bench --conversations N)")
    g.add_argument(
        "--conversations",
        type=int,
        default=8 if standalone else None,
        help="conversations side by side; with pdserve bench, runs this trace",
    )
    g.add_argument("--turns", type=int, default=4, help="turns per conversation")
    g.add_argument("--system-len", type=int, default=1024, help="shared system prompt tokens")
    g.add_argument("--user-len", type=int, default=64, help="tokens of each user message")
    if not standalone:
        return
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--output-len", type=int, default=OUTPUT_LEN, help="tokens of each answer")
    p.add_argument("--vocab-size", type=int, default=VOCAB, help="prompt ids in [4, V)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=LABEL, help="names the run in its result file")
    p.add_argument("--out", help="result JSON (default bench/results/conversations-<label>.json)")


def run_args(args: argparse.Namespace) -> int:
    """Run the trace the parsed flags describe, print its table and write its JSON; 1 if a
    turn failed. Flags ``pdserve bench`` leaves unset take this trace's defaults."""
    output_len = args.output_len or OUTPUT_LEN
    vocab = args.vocab_size or VOCAB
    counts = {"conversations": args.conversations, "turns": args.turns}
    for name, value in (counts | {"user-len": args.user_len, "output-len": output_len}).items():
        if value < 1:
            raise SystemExit(f"--{name} must be >= 1, got {value}")
    shape = Shape(
        args.conversations, args.turns, args.system_len, args.user_len, output_len, vocab,
        args.seed,
    )  # fmt: skip
    records, delta = asyncio.run(run(args.url, args.model, shape))
    s = summary(records, delta)
    for key, value in s.items():
        print(f"{key:24} {value if not isinstance(value, float) else round(value, 2)}")
    result = {"shape": shape.__dict__, "summary": s, "counters": delta}
    result["records"] = [r.to_json() for r in records]
    write_result(result, "conversations", args.label or LABEL, args.out)
    return 1 if s["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.conversations", description=__doc__)
    add_arguments(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
