"""One local Ray for all end-to-end tests; apps deployed through the same path `pdserve up` uses."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams

GREEDY_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_serve():
    """(port) of a Serve proxy on a local Ray with room for every replica of every test."""
    import ray
    from ray import serve

    ray.init(num_cpus=32, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


class App:
    """A deployed pdserve app and an HTTP client for it."""

    def __init__(self, port: int, name: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.name = name

    def post(self, path: str, body: dict | bytes, timeout: float = 120) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.url + "/metrics", timeout=30).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def wait_metrics(self, pred, timeout: float = 30) -> dict[str, float]:
        """Metrics once ``pred(metrics)`` holds (replicas report a few times a second)."""
        deadline = time.monotonic() + timeout
        m = self.metrics()
        while not pred(m):
            if time.monotonic() > deadline:
                raise AssertionError(f"metrics never satisfied the condition: {m}")
            time.sleep(0.25)
            m = self.metrics()
        return m


def deploy(port: int, args: dict) -> App:
    from pdserve.deploy import serve_app

    name = serve_app.deploy(args, {"host": "127.0.0.1", "port": port})
    serve_app.wait_running(name, timeout_s=600)
    app = App(port, name)
    serve_app.wait_healthy(app.url, timeout_s=120)
    return app


def app_args(model: str, prefill: dict | None, decode: dict, name: str = "pdserve") -> dict:
    """A CPU app, also on a GPU machine (tests/e2e/test_cluster_gpu.py covers GPUs)."""
    for pool in (prefill, decode):
        if pool is not None:
            pool.setdefault("gpus_per_rank", 0)
    return {
        "name": name,
        # float64: batch compositions under load vary, and in float32 a routing near-tie
        # (1e-7) can flip an expert; in float64 the cluster equals the single process exactly
        "model": {"path": model, "name": "tiny", "block_size": 16, "dtype": "float64"},
        "prefill": prefill,
        "decode": decode,
    }


@pytest.fixture(scope="session")
def reference(tiny_model):
    """Greedy tokens of the single-process engine, keyed by prompt token ids."""
    engine = LLMEngine(
        EngineConfig(
            model=tiny_model, dtype="float64", device="cpu", cache=CacheConfig(block_size=16)
        )
    )
    cache: dict[tuple[int, ...], list[int]] = {}

    def tokens(prompt_ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
        key = (*prompt_ids, -n)
        if key not in cache:
            sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            cache[key] = engine.generate([prompt_ids], sp)[0].token_ids
        return cache[key]

    tokens.engine = engine
    return tokens
