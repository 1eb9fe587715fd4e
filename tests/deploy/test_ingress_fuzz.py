"""Fuzzing the HTTP API on the real tiny-model engine: hostile bodies, huge inputs and raw HTTP.

The properties: never a 5xx; a 4xx is OpenAI-style JSON whose message names the problem; every
request ends within TIMEOUT_S; and afterwards the server still serves, with nothing left in the
engine.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.deploy.openai_protocol import ChatCompletionRequest, CompletionRequest
from tests.deploy.conftest import MODEL, client, error_of, run, sse

TIMEOUT_S = 30
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
ROUTES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


async def post(c, route: str, content: bytes, headers: dict | None = None):
    return await asyncio.wait_for(c.post(route, content=content, headers=headers), TIMEOUT_S)


def check(r) -> None:
    """The reply properties every fuzzed request must have."""
    assert r.status_code in (200, 400, 404, 413), r.text[:500]
    if r.status_code != 200:
        err = error_of(r)
        if err["param"]:  # the message names the parameter it blames
            stem = err["param"].split("[")[0].split(".")[0]
            names = {stem, "conversation"} if stem == "messages" else {stem}
            assert any(name in err["message"] for name in names), err
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = sse(r.text)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
    else:
        assert r.json()["choices"], r.text


def still_serving(served, app) -> None:
    async def go():
        async with client(app) as c:
            r = await post(c, "/v1/completions", json.dumps(COMPLETION).encode())
            return r, await served.idle()

    r, idle = run(go())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    assert idle == (False, 0), "a fuzzed request left work or KV blocks in the engine"


@pytest.fixture(scope="module")
def app(served):
    # choices per request kept small so that valid requests finish fast on the real engine
    return served.app(max_choices=8, max_body_bytes=1 << 20)


# ---- hostile bodies ----

_huge = st.sampled_from([10**30, 10**20, 2**63, 2**63 - 1, 2**64, -(2**63) - 1, 10**9, -1, 0])
_floats = st.floats() | st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308])
_scalars = st.none() | st.booleans() | st.integers(-5, 300) | _huge | _floats | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_text = st.text(max_size=30) | st.sampled_from(["<｜User｜>", "<｜end▁of▁sentence｜>", "\ufdd0x"])
_prompt = (
    _text
    | st.lists(st.integers(0, 1023), min_size=1, max_size=6)
    | st.lists(_text | st.lists(st.integers(0, 1023), min_size=1, max_size=4), max_size=3)
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": _text}
)
_BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"]
_CONTENT_TYPES = [
    None,
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=utf-16",
]


@st.composite
def _requests(draw) -> tuple[str, bytes, dict]:
    """(route, body bytes, headers): a plausible body with hostile fields, then maybe broken
    as bytes (invalid UTF-8, cut short, a duplicate key, deep nesting) or replaced outright."""
    route = draw(st.sampled_from(sorted(ROUTES)))
    body: dict = {"model": MODEL, "max_tokens": draw(st.integers(1, 4))}
    if route == "/v1/completions":
        body["prompt"] = draw(_prompt)
    else:
        body["messages"] = draw(st.lists(_message, min_size=1, max_size=3))
    fields = sorted(ROUTES[route].__struct_fields__)
    for name in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        body[name] = draw(_json | _huge | _floats)
    if draw(st.booleans()):
        body[draw(st.text(max_size=10))] = draw(_json)  # an unknown field
    if draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(sorted(body))))
    raw = json.dumps(body, allow_nan=True, ensure_ascii=draw(st.booleans())).encode()
    how = draw(st.sampled_from(["as is"] * 4 + ["utf8", "cut", "dup", "nest", "bytes", "json"]))
    if how == "utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(_BAD_UTF8)) + raw[at:]
    elif how == "cut":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "dup":  # the same key twice: the last one counts
        raw = b'{"model": ' + json.dumps(draw(_json)).encode() + b", " + raw[1:]
    elif how == "nest":
        depth = draw(st.sampled_from([64, 1000, 100_000]))
        raw = raw[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    elif how == "bytes":
        raw = draw(st.binary(max_size=64))
    elif how == "json":
        raw = json.dumps(draw(_json), allow_nan=True).encode()
    content_type = draw(st.sampled_from(_CONTENT_TYPES))
    return route, raw, {} if content_type is None else {"content-type": content_type}


def test_fuzz_hostile_bodies_never_get_a_5xx_and_serving_goes_on(served, app):
    @FUZZ
    @given(request=_requests())
    def one(request):
        route, raw, headers = request

        async def go():
            async with client(app) as c:
                return await post(c, route, raw, headers)

        check(run(go()))

    one()
    still_serving(served, app)


# ---- huge and hostile values, one by one ----

BIG = "the cache " * 2_000_000  # 20 MB
HUGE = [
    # (name, route, body (dict, or raw bytes), status, words the message must hold)
    ("max_tokens 10**30", "c", {"max_tokens": 10**30}, 400, "$.max_tokens"),
    ("n 10**9", "c", {"n": 10**9}, 400, "n must be in"),
    ("seed -1", "c", {"seed": -1, "temperature": 1}, 200, None),
    ("seed int64 max, n 4", "h", {"seed": 2**63 - 1, "n": 4, "temperature": 1}, 200, None),
    ("top_k 10**20", "c", {"top_k": 10**20}, 400, "$.top_k"),
    ("top_k 10**18", "c", {"top_k": 10**18}, 200, None),
    ("temperature 1e999", "c", b'"temperature": 1e999', 400, "$.temperature"),
    ("top_p NaN", "c", b'"top_p": NaN', 400, "not valid JSON"),
    ("temperature -Infinity", "h", b'"temperature": -Infinity', 400, "not valid JSON"),
    ("unknown field 1e999", "c", b'"x_future": 1e999', 200, None),  # valid JSON, ignored
    ("prompt of 10**6 ids", "c", {"prompt": [7] * 10**6}, 400, "1000000 tokens"),
    ("prompt batch of 10**4", "c", {"prompt": ["Hi"] * 10**4}, 400, "at most 256"),
    ("100000 stop strings", "c", {"stop": ["x"] * 10**5}, 400, "stop has 100000 strings"),
    ("stop of 10**6 chars", "h", {"stop": "x" * 10**6}, 400, "stop[0] has 1000000"),
    ("stop_token_ids 10**5", "c", {"stop_token_ids": [5] * 10**5}, 400, "stop_token_ids has"),
    ("messages 10**4", "h", {"messages": CHAT["messages"] * 10**4}, 400, "context limit"),
    ("prompt of 20 MB", "c", {"prompt": BIG}, 413, "limit is 16777216 bytes"),
    (
        "message of 1 MB",
        "h",
        {"messages": [{"role": "user", "content": BIG[: 10**6]}]},
        400,
        "at least",
    ),
    ("prompt of 1 MB", "c", {"prompt": BIG[: 10**6]}, 400, "at least"),
    ("nested 10**5 deep", "c", b'"prompt": ' + b"[" * 10**5 + b"]" * 10**5, 400, "too deeply"),
    (
        "nested unknown field",
        "h",
        b'"x": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000,
        400,
        "too deeply",
    ),
    ("invalid UTF-8 key", "c", b'"x\xff": 1', 400, "UTF-8"),
    ("invalid UTF-8 value", "h", b'"x": "\xed\xa0\x80"', 400, "UTF-8"),
    ("lone surrogate escape", "h", b'"x": "\\udc00"', 400, "not valid JSON"),
    ("duplicate keys", "c", b'"max_tokens": 1, "max_tokens": 3', 200, None),
]


def _body(route: str, body: dict | bytes) -> bytes:
    base = COMPLETION if route == "/v1/completions" else CHAT
    if isinstance(body, dict):
        return json.dumps({**base, **body}).encode()
    return json.dumps(base).encode()[:-1] + b", " + body + b"}"


@pytest.mark.parametrize("name, route, body, status, needle", HUGE, ids=[h[0] for h in HUGE])
def test_fuzz_huge_values_are_refused_fast(served, name, route, body, status, needle):
    route = "/v1/completions" if route == "c" else "/v1/chat/completions"
    raw = _body(route, body)

    async def go():
        async with client(served.app()) as c:
            start = time.monotonic()
            r = await post(c, route, raw)
            return r, time.monotonic() - start

    r, took = run(go())
    assert r.status_code == status, r.text[:500]
    assert took < 10, f"{name} took {took:.1f}s"
    if needle is not None:
        assert needle in error_of(r)["message"], r.text[:500]
    else:
        choices = r.json()["choices"]
        assert all(c["finish_reason"] in ("length", "stop") for c in choices)
    if name == "duplicate keys":
        assert r.json()["usage"]["completion_tokens"] == 3


def test_fuzz_the_server_serves_after_the_huge_values(served):
    still_serving(served, served.app())


# ---- raw HTTP ----

_LENGTHS = ["", "²", "12³", "-1", "1e3", " 7", "99999999999999999999999", "0", "abc", "1, 2"]


@st.composite
def _raw_requests(draw) -> tuple[str, str, list, list[bytes]]:
    """Mostly POSTs to the API routes, in chunks, under odd headers (Content-Length "²":
    a digit to str.isdigit, not to int)."""
    method = draw(st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "HEAD", "OPTIONS"]))
    others = ["/v1/models", "/health", "/metrics", "/openapi.json", "/v1", "//v1/completions"]
    if draw(st.integers(0, 4)):
        path = draw(st.sampled_from([*ROUTES] * 8 + others))
    else:
        path = "/" + draw(st.text(max_size=12))
    body = json.dumps(CHAT if path == "/v1/chat/completions" else COMPLETION).encode()
    cut = draw(st.integers(0, len(body)))
    chunks = draw(
        st.sampled_from([[body], [body[:cut], body[cut:]], [body, b""], [b""], []])
        | st.lists(st.sampled_from([body, b"", b"\xff", b"{", body[:cut]]), max_size=3)
    )
    headers = []
    length = draw(st.sampled_from([None, "true", *_LENGTHS]))
    if length is not None:
        length = str(sum(map(len, chunks))) if length == "true" else length
        headers.append((b"content-length", length.encode("latin-1")))
    for name in (b"authorization", b"content-type", b"x-api-key"):
        if draw(st.booleans()):
            headers.append((name, draw(st.binary(max_size=20))))
    return method, path, headers, chunks


async def _asgi(app, method: str, path: str, headers: list, chunks: list[bytes]) -> list[dict]:
    """One request through raw ASGI; the client stays until the response ends."""
    sent: list[dict] = []
    done = asyncio.Event()
    pending = list(chunks) or [b""]

    async def receive():
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "server": ("ingress", 80),
        "client": ("127.0.0.1", 5000),
    }
    await asyncio.wait_for(app(scope, receive, send), TIMEOUT_S)
    return sent


def test_fuzz_raw_http_never_gets_a_5xx(served, app):
    @FUZZ
    @given(request=_raw_requests())
    def one(request):
        method, path, headers, chunks = request
        sent = run(_asgi(app, method, path, headers, chunks))
        status = sent[0]["status"]
        assert status < 500, sent
        body = b"".join(m.get("body", b"") for m in sent[1:])
        if status >= 400 and method != "HEAD":
            assert json.loads(body)["error"]["message"], body

    one()
    still_serving(served, app)
