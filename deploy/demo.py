"""``pdserve demo``: a local Ray, the tiny model (made if missing), one prefill and one decode
replica, a few streaming chat requests over HTTP, printed with their TTFT and TPOT."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pdserve.deploy.sse import read_events

PROMPTS = (
    "Tell me about the expert router.",
    "What does the decode pool do with the cache?",
    "Write a short story about a tensor.",
    "Why split prefill from decode?",
)


@dataclass
class Streamed:
    prompt: str
    text: str = ""
    tokens: int = 0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    chunk_times: list[float] = field(default_factory=list)


def stream_chat(url: str, model: str, prompt: str, max_tokens: int) -> Streamed:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    out = Streamed(prompt)
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        for chunk in read_events(resp):
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    out.text += piece
                    out.chunk_times.append(time.perf_counter() - start)
            if chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
    if out.chunk_times:
        out.ttft_s = out.chunk_times[0]
        if out.tokens > 1:
            out.tpot_s = (out.chunk_times[-1] - out.chunk_times[0]) / (out.tokens - 1)
    return out


def run_demo(port: int = 8000, max_tokens: int = 48) -> int:
    import ray

    from pdserve.deploy import serve_app
    from pdserve.deploy.local_head import logical_cpus

    t0 = time.perf_counter()
    ray.init(
        num_cpus=logical_cpus(), include_dashboard=False, logging_level="ERROR", log_to_driver=False
    )
    url = f"http://127.0.0.1:{port}"
    try:
        args = {"model": {"preset": "tiny", "name": "tiny"}, "prefill": {}, "decode": {}}
        print("deploying 1 prefill + 1 decode replica of the tiny model on a local Ray ...")
        name = serve_app.deploy(args, {"host": "127.0.0.1", "port": port})
        serve_app.wait_running(name)
        serve_app.wait_healthy(url)
        took = time.perf_counter() - t0
        print(f"serving at {url}/v1 after {took:.1f}s; sending {len(PROMPTS)} streams")
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(lambda p: stream_chat(url, "tiny", p, max_tokens), PROMPTS))
        for r in results:
            print(f"\n> {r.prompt}\n{r.text!r}")
            print(
                f"  {r.tokens} tokens, TTFT {r.ttft_s * 1e3:.0f} ms, TPOT {r.tpot_s * 1e3:.1f} ms"
            )
        metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
        moved = [l for l in metrics.splitlines() if l.startswith("pdserve_kv_transfer_bytes_total")]
        print("\n" + "\n".join(moved))
        print("(random weights: the text is noise; the tokens equal a single-process run's)")
        return 0
    finally:
        # the demo's Ray runs in this process: its end stops every replica, at once and quietly
        # (serve.shutdown would drain them first, and its controller's end logs an error line)
        ray.shutdown()
