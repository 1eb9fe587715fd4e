"""The ingress on a real engine, without Ray: an LLMEngine on the tiny checkpoint behind an
AsyncEngine serves as the decode pool, and a second engine gives the expected tokens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SchedulerConfig
from pdserve.cluster.async_engine import AsyncEngine
from pdserve.cluster.messages import GenerateRequest
from pdserve.cluster.request_output import RequestOutput
from pdserve.deploy.ingress_settings import IngressSettings
from pdserve.deploy.openai_app import build_app
from pdserve.deploy.openai_server import OpenAIServer

MODEL = "tiny-chat"
MAX_MODEL_LEN = 128
BASE_URL = "http://ingress"


def _engine(path: str) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=path,
            dtype="float64",  # batch-invariant: concurrent requests batch unpredictably
            device="cpu",
            cache=CacheConfig(block_size=16, num_blocks=96),
            scheduler=SchedulerConfig(max_model_len=MAX_MODEL_LEN),
        )
    )


@dataclass
class Served:
    """An ingress app over a live engine, and an idle engine for expected outputs."""

    engine: AsyncEngine
    reference: LLMEngine
    settings: IngressSettings
    health: list  # [live, detail] that the injected health() returns
    _app: Any = None

    def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        return self.engine.stream(
            req.request_id,
            lambda e: e.add_request(req.prompt_token_ids, req.sampling, req.request_id) and None,
        )

    def server(self, generate: Callable | None = None, **settings: Any) -> OpenAIServer:
        async def health() -> tuple[bool, dict]:
            return self.health[0], dict(self.health[1])

        async def metrics() -> str:
            return f"pdserve_engine_steps_total {self.engine.steps}\n"

        return OpenAIServer(
            replace(self.settings, **settings), generate or self.generate, health, metrics
        )

    def app(self, generate: Callable | None = None, **settings: Any):
        """The app over the live engine (built once), or over ``generate`` / other settings."""
        if generate is None and not settings:
            if self._app is None:
                self._app = build_app(self.server())
            return self._app
        return build_app(self.server(generate, **settings))

    async def idle(self) -> tuple[bool, int]:
        """(requests still in the engine, KV blocks in use), read on the engine thread."""
        return await self.engine.run(lambda e: (e.has_unfinished(), e.blocks.num_used))


@pytest.fixture(scope="session")
def served(tiny_model) -> Served:
    live = AsyncEngine(_engine(tiny_model), name="ingress-test-engine")
    settings = IngressSettings(
        served_model_name=MODEL, model_path=tiny_model, max_model_len=MAX_MODEL_LEN, max_n=4
    )
    yield Served(live, _engine(tiny_model), settings, [True, {"decode": {"live": 1}}])
    live.shutdown()


@asynccontextmanager
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=120) as c:
        yield c


def run(coro):
    return asyncio.run(coro)


def sse(text: str) -> list[Any]:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def error_of(response: httpx.Response) -> dict:
    """The OpenAI-style error of a response, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err
