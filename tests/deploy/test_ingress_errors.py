"""Bad requests, failures in the decode pool, and clients that go away: every one gets an
OpenAI-style error with the right status, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.exceptions import RayTaskError

from pdserve.cluster.errors import OverloadedError, RequestError, WorkerError
from pdserve.cluster.request_output import RequestOutput
from tests.deploy.conftest import BASE_URL, MAX_MODEL_LEN, MODEL, client, error_of, run, sse

COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LONG = list(range(4, 4 + MAX_MODEL_LEN))


def completion(**kw):
    return ("/v1/completions", {**COMPLETION, **kw})


def chat(**kw):
    return ("/v1/chat/completions", {**CHAT, **kw})


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


BAD = [
    # (route, body, status, words the message must hold)
    ("/v1/completions", b'{"model": ', 400, "not valid JSON"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object, got array"),
    ("/v1/completions", b"", 400, "empty"),
    ("/v1/completions", without(COMPLETION, "model"), 400, "`model`"),
    ("/v1/completions", without(COMPLETION, "prompt"), 400, "`prompt`"),
    ("/v1/chat/completions", without(CHAT, "messages"), 400, "`messages`"),
    completion(max_tokens="5") + (400, "$.max_tokens"),
    completion(temperature="hot") + (400, "$.temperature"),
    completion(stop=[1]) + (400, "$.stop"),
    completion(seed=2**70) + (400, "$.seed"),
    completion(stream="yes") + (400, "$.stream"),
    chat(messages=[{"role": "user", "content": 5}]) + (400, "$.messages[0].content"),
    completion(model="gpt-9") + (404, "gpt-9"),
    chat(model="gpt-9") + (404, "gpt-9"),
    completion(max_tokens=0) + (400, "max_tokens"),
    completion(max_tokens=-3) + (400, "max_tokens"),
    completion(max_tokens=MAX_MODEL_LEN) + (400, "context limit"),
    chat(max_completion_tokens=MAX_MODEL_LEN) + (400, "max_completion_tokens"),
    chat(max_tokens=0) + (400, "max_tokens"),
    completion(temperature=-0.5) + (400, "temperature"),
    completion(top_p=0) + (400, "top_p"),
    completion(top_p=1.5) + (400, "top_p"),
    completion(top_k=-5) + (400, "top_k"),
    completion(n=0) + (400, "n must be"),
    completion(n=5) + (400, "n must be"),
    chat(n=5) + (400, "n must be"),
    completion(logprobs=21) + (400, "logprobs"),
    completion(logprobs=-1) + (400, "logprobs"),
    chat(logprobs=True, top_logprobs=21) + (400, "top_logprobs"),
    chat(top_logprobs=2) + (400, "top_logprobs"),
    completion(stop=["x", ""]) + (400, "stop"),
    completion(stop_token_ids=[10**7]) + (400, "stop_token_ids"),
    completion(prompt=[5, 10**7]) + (400, "vocabulary"),
    completion(prompt=[[5, 6], [-1]]) + (400, "vocabulary"),
    completion(prompt=LONG) + (400, "context limit"),
    completion(prompt=["ok", LONG]) + (400, "prompt 1"),
    completion(prompt="") + (400, "empty"),
    completion(prompt=[]) + (400, "empty"),
    completion(prompt=[[]]) + (400, "empty"),
    completion(prompt=[1.5, 2]) + (400, "string or a list of integer token ids"),
    completion(prompt=[True]) + (400, "string or a list of integer token ids"),
    completion(prompt=[{"a": 1}]) + (400, "string or a list of integer token ids"),
    chat(messages=[]) + (400, "at least one message"),
    chat(messages=[{"role": "tool", "content": "x"}]) + (400, "role 'tool'"),
    chat(messages=[{"role": "user"}]) + (400, "content is required"),
    chat(messages=[{"role": "user", "content": "x" * 2000}]) + (400, "context limit"),
    completion(echo=True) + (400, "echo"),
    chat(echo=True) + (400, "echo"),
    completion(presence_penalty=0.5) + (400, "presence_penalty"),
    chat(frequency_penalty=1.0) + (400, "frequency_penalty"),
    completion(logit_bias={"5": 10}) + (400, "logit_bias"),
    completion(best_of=3) + (400, "best_of"),
    completion(suffix="end") + (400, "suffix"),
    completion(stream_options={"include_usage": True}) + (400, "stream_options"),
    chat(tools=[{"type": "function", "function": {"name": "f"}}]) + (400, "tools"),
    chat(response_format={"type": "json_object"}) + (400, "response_format"),
    chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    + (400, "'image_url'"),
]


@pytest.mark.parametrize(
    "route, body, status, needle", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)]
)
def test_bad_requests_get_4xx_naming_the_problem_and_serving_goes_on(
    served, route, body, status, needle
):
    async def go():
        async with client(served.app()) as c:
            if isinstance(body, bytes):
                bad = await c.post(route, content=body)
            else:
                bad = await c.post(route, json=body)
            good = await c.post("/v1/completions", json={**COMPLETION, "max_tokens": 1})
            return bad, good

    bad, good = run(go())
    assert bad.status_code == status, bad.text
    err = error_of(bad)
    assert needle in err["message"], err
    if status == 404:
        assert err["code"] == "model_not_found"
    assert good.status_code == 200, good.text
    assert good.json()["usage"]["completion_tokens"] == 1


def test_unknown_fields_are_ignored_and_null_means_not_given(served):
    nulls = dict.fromkeys(["n", "temperature", "top_p", "top_k", "seed", "stop", "stream"], None)
    nulls |= dict.fromkeys(["stream_options", "echo", "logprobs", "logit_bias", "best_of"], None)

    async def go():
        async with client(served.app()) as c:
            extra = await c.post("/v1/completions", json={**COMPLETION, "x_future": {"a": [1]}})
            null = await c.post("/v1/completions", json={**COMPLETION, **nulls})
            chat_null = await c.post(
                "/v1/chat/completions",
                json={**CHAT, **nulls, "logprobs": None, "max_completion_tokens": None},
            )
            return extra, null, chat_null

    for r in run(go()):
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2


def test_bodies_over_the_limit_get_413_before_being_read_whole(served):
    app = served.app(max_body_bytes=4096)
    big = json.dumps({**COMPLETION, "prompt": "the " * 2000}).encode()

    async def chunked():
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    async def go():
        async with client(app) as c:
            sized = await c.post("/v1/completions", content=big)
            streamed = await c.post("/v1/completions", content=chunked())
            good = await c.post("/v1/completions", json=COMPLETION)
            return sized, streamed, good

    sized, streamed, good = run(go())
    for r in (sized, streamed):
        assert r.status_code == 413 and "4096" in error_of(r)["message"]
    assert good.status_code == 200


# ---- failures in the decode pool ----


def failing(exc: BaseException):
    async def generate(req):
        raise exc
        yield  # an async generator that fails on first use

    return generate


def ray_wrapped(exc: Exception) -> Exception:
    """The exception as a Ray handle re-raises it from a decode replica."""
    return RayTaskError("generate", f"Traceback ...\n{exc!r}", exc).as_instanceof_cause()


@pytest.mark.parametrize("wrap", [lambda e: e, ray_wrapped], ids=["local", "ray"])
def test_overload_is_503_with_retry_after_streamed_or_not(served, wrap):
    app = served.app(failing(wrap(OverloadedError("decode pool is full", retry_after_s=2.5))))

    async def go():
        async with client(app) as c:
            return [
                await c.post("/v1/completions", json=COMPLETION),
                await c.post("/v1/chat/completions", json={**CHAT, "stream": True}),
            ]

    for r in run(go()):
        assert r.status_code == 503
        assert r.headers["retry-after"] == "3"
        assert error_of(r)["message"] == "decode pool is full"


@pytest.mark.parametrize(
    "exc, status, needle",
    [
        (WorkerError("engine step failed"), 500, "worker error: engine step failed"),
        (ray_wrapped(WorkerError("engine step failed")), 500, "worker error: engine step failed"),
        (KeyError("slot"), 500, "KeyError"),
        (ray_wrapped(RequestError("needs 900 KV blocks", "max_tokens")), 400, "900 KV blocks"),
    ],
)
def test_failures_before_the_first_token_keep_their_status(served, exc, status, needle):
    app = served.app(failing(exc))

    async def go():
        async with client(app) as c:
            return [
                await c.post("/v1/completions", json=body)
                for body in (COMPLETION, {**COMPLETION, "stream": True})
            ]

    for r in run(go()):
        assert r.status_code == status
        assert needle in error_of(r)["message"]
        assert "Traceback" not in error_of(r)["message"]


def fails_after(served, n: int, exc: BaseException):
    """Real outputs from the engine; choice 1 of each prompt raises ``exc`` after its n-th."""

    async def generate(req):
        async with aclosing(served.generate(req)) as stream:
            i = 0
            async for out in stream:
                yield out
                i += 1
                if i == n and req.request_id.endswith("-1"):
                    raise exc

    return generate


def test_a_mid_stream_failure_ends_the_stream_with_an_error_event(served):
    app = served.app(fails_after(served, 2, WorkerError("decode replica lost")))
    body = {**COMPLETION, "max_tokens": 60, "n": 2, "ignore_eos": True, "stream": True}

    async def go():
        async with client(app) as c:
            raw = await c.post("/v1/completions", json=body)
            idle = await served.idle()
            whole = await c.post("/v1/completions", json={**body, "stream": False})
            api = openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="x", http_client=c)
            with pytest.raises(openai.APIError, match="decode replica lost"):
                async for _ in await api.chat.completions.create(
                    model=MODEL, messages=CHAT["messages"], max_tokens=60, n=2, stream=True
                ):
                    pass
            return raw, idle, whole, await served.idle()

    raw, idle, whole, idle_after = run(go())
    assert raw.status_code == 200
    events = sse(raw.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == "worker error: decode replica lost"
    assert events[-2]["error"]["type"] == "internal_error"
    assert all("choices" in e for e in events[:-2]) and len(events) > 3
    assert idle == (False, 0), "choice 0, still running, must be aborted with the stream"
    assert whole.status_code == 500 and "decode replica lost" in error_of(whole)["message"]
    assert idle_after == (False, 0)


def test_a_final_output_with_finish_reason_error_is_an_error(served):
    async def generate(req):
        yield RequestOutput(
            request_id=req.request_id,
            token_ids=[],
            text="",
            finished=True,
            finish_reason="error",
            error="engine step failed: boom",
        )

    async def go():
        async with client(served.app(generate)) as c:
            whole = await c.post("/v1/completions", json=COMPLETION)
            return whole

    r = run(go())
    assert r.status_code == 500 and "boom" in error_of(r)["message"]


def test_a_client_that_stops_reading_aborts_its_requests(served):
    """Driven through raw ASGI: the client disconnects after two chunks of a long stream."""
    app = served.app()
    body = json.dumps({**COMPLETION, "max_tokens": 100, "n": 2, "ignore_eos": True, "stream": True})

    async def go():
        sent: list[dict] = []
        left = asyncio.Event()
        requested = False

        async def receive():
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body.encode(), "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if sum(m["type"] == "http.response.body" for m in sent) == 2:
                left.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "server": ("ingress", 80),
            "client": ("127.0.0.1", 5000),
        }
        await asyncio.wait_for(app(scope, receive, send), timeout=60)
        return sent, await served.idle()

    sent, idle = run(go())
    assert sent[0]["status"] == 200
    chunks = [m["body"] for m in sent[1:] if m.get("body")]
    assert 2 <= len(chunks) < 20 and b"[DONE]" not in b"".join(chunks)
    assert idle == (False, 0), "both requests must be aborted and their blocks freed"


# ---- fuzz ----


async def _echo(req):
    """A fast stand-in for the decode pool: echoes prompt tokens, at most 3 per request."""
    n = min(req.sampling.max_tokens, 3)
    for i in range(n):
        tok = req.prompt_token_ids[i % len(req.prompt_token_ids)]
        yield RequestOutput(
            request_id=req.request_id,
            token_ids=[tok],
            text=f"<{tok}>",
            finished=i == n - 1,
            finish_reason="length" if i == n - 1 else None,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_output_tokens=i + 1,
            prompt_token_ids=req.prompt_token_ids if i == 0 else None,
        )


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
_fields = {  # mostly plausible values, some out of range
    "max_tokens": st.integers(1, 4) | st.integers(-2, 200),
    "temperature": st.sampled_from([0, 0.7, 1]) | st.floats(-1, 3),
    "top_p": st.floats(0.01, 1) | st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 50),
    "n": st.integers(1, 4) | st.integers(-1, 6),
    "seed": st.integers(-(2**64), 2**64),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(-1, 1100), max_size=2),
    "logprobs": st.integers(0, 5) | st.integers(-2, 25),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | st.none(),
    "echo": st.sampled_from([False, False, True]),
    "best_of": st.none() | st.integers(0, 5),
    "presence_penalty": st.sampled_from([0, 0.0, 1.5]),
    "logit_bias": st.dictionaries(st.text(max_size=3), st.floats(-5, 5), max_size=1),
    "return_token_ids": st.booleans(),
    "ignore_eos": st.booleans(),
    "user": st.text(max_size=5),
}
_prompts = st.one_of(
    st.text(min_size=1, max_size=30),
    st.lists(st.integers(0, 1023), min_size=1, max_size=8),
    st.lists(st.integers(-3, 1100), max_size=8),
    st.lists(
        st.text(min_size=1, max_size=10) | st.lists(st.integers(0, 1023), min_size=1, max_size=4),
        min_size=1,
        max_size=3,
    ),
    _json,
)


@st.composite
def _bodies(draw) -> object:
    """Completion bodies, mostly well-formed; some with one field of any JSON type, or none."""
    if draw(st.integers(0, 9)) == 9:
        return draw(_json)
    body = {
        "model": MODEL if draw(st.integers(0, 7)) < 7 else "other",
        "prompt": draw(_prompts),
        "stream": draw(st.booleans()),
    }
    for key in draw(st.lists(st.sampled_from(sorted(_fields)), max_size=5, unique=True)):
        body[key] = draw(_fields[key])
    if draw(st.integers(0, 3)) == 3:
        body[draw(st.sampled_from(sorted(body)))] = draw(_json)
    return body


@pytest.fixture(scope="module")
def echo_app(served):
    return served.app(_echo)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies())
def test_fuzz_completion_bodies_never_get_a_500(echo_app, body):
    async def go():
        async with client(echo_app) as c:
            return await c.post("/v1/completions", json=body)

    r = run(go())
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        error_of(r)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = sse(r.text)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    else:
        assert r.json()["usage"]["completion_tokens"] >= 1
