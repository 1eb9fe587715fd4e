"""The OpenAI ingress end to end on a real engine: raw HTTP, SSE and the official client."""

from __future__ import annotations

import asyncio

import openai
import pytest

from pdserve.cluster.sampling_params import SamplingParams
from tests.deploy.conftest import BASE_URL, MAX_MODEL_LEN, MODEL, client, error_of, run, sse

PROMPTS = ["The model and the cache", [17, 300, 42, 9, 512, 77, 5], "Hello"]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def by_index(events: list, key: str = "text") -> dict[int, list]:
    """Each choice's stream chunks, in order; checks every data event is a chunk or [DONE]."""
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks: dict[int, list] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            chunks.setdefault(c["index"], []).append(c)
    return chunks


# ---- /v1/completions ----


def test_completions_match_the_engine_for_a_batch_streamed_or_not(served):
    expected = served.reference.generate(PROMPTS, greedy(6))
    prompt_ids = [served.reference.tokenize(p) for p in PROMPTS]
    body = {
        "model": MODEL,
        "prompt": PROMPTS,
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }

    async def go():
        async with client(served.app()) as c:
            whole = await c.post("/v1/completions", json=body)
            stream = await c.post(
                "/v1/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )
            return whole, stream

    whole, stream = run(go())
    assert whole.status_code == 200, whole.text
    r = whole.json()
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion" and r["model"] == MODEL
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for c, exp, ids in zip(r["choices"], expected, prompt_ids):
        assert c["text"] == exp.text and c["token_ids"] == exp.token_ids
        assert c["prompt_token_ids"] == ids
        assert c["finish_reason"] == "length" and c["stop_reason"] is None
        assert c["logprobs"] is None
    usage = {"prompt_tokens": sum(map(len, prompt_ids)), "completion_tokens": 18}
    assert r["usage"] == {**usage, "total_tokens": usage["prompt_tokens"] + 18}

    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = sse(stream.text)
    assert events[-2]["choices"] == [] and events[-2]["usage"] == r["usage"]
    assert all(e["usage"] is None for e in events[:-2])
    assert len({e["id"] for e in events[:-1]}) == 1
    chunks = by_index(events)
    for i, exp in enumerate(expected):
        assert "".join(c["text"] for c in chunks[i]) == exp.text
        assert [t for c in chunks[i] for t in c["token_ids"]] == exp.token_ids
        assert chunks[i][0]["prompt_token_ids"] == prompt_ids[i]
        assert all("prompt_token_ids" not in c for c in chunks[i][1:])
        assert [c["finish_reason"] for c in chunks[i]] == [None] * (len(chunks[i]) - 1) + ["length"]


def test_concurrent_requests_each_get_their_own_tokens(served):
    prompts = ["Hello", "The cache", [40, 41, 42], "model", [7] * 20, "The model and the cache"]
    expected = [o.token_ids for o in served.reference.generate(prompts, greedy(5))]

    async def one(c, prompt, stream):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0}
        body |= {"ignore_eos": True, "return_token_ids": True, "stream": stream}
        r = await c.post("/v1/completions", json=body)
        if not stream:
            return r.json()["choices"][0]["token_ids"]
        return [t for c in by_index(sse(r.text))[0] for t in c["token_ids"]]

    async def go():
        async with client(served.app()) as c:
            return await asyncio.gather(
                *(one(c, p, stream=i % 2 == 0) for i, p in enumerate(prompts))
            )

    assert run(go()) == expected


def test_logprobs_in_the_legacy_format(served):
    prompt = "Hello"
    exp = served.reference.generate([prompt], greedy(5, logprobs=3))[0]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0}
    body |= {"ignore_eos": True, "logprobs": 3}

    async def go():
        async with client(served.app()) as c:
            whole = await c.post("/v1/completions", json=body)
            stream = await c.post("/v1/completions", json={**body, "stream": True})
            return whole.json(), sse(stream.text)

    r, events = run(go())
    lp = r["choices"][0]["logprobs"]
    tok = served.reference.tokenizer
    assert lp["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in exp.token_ids]
    assert lp["token_logprobs"] == pytest.approx([x.logprob for x in exp.logprobs], abs=1e-5)
    offsets, at = [], 0
    for t in lp["tokens"]:
        offsets.append(at)
        at += len(t)
    assert lp["text_offset"] == offsets
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 3  # two ids may decode to the same text
        assert max(top.values()) == pytest.approx(value)  # greedy: the best is the chosen one
        assert top[token] == pytest.approx(value)
    streamed = [c["logprobs"] for c in by_index(events)[0]]
    assert [t for s in streamed for t in s["tokens"]] == lp["tokens"]
    assert [o for s in streamed for o in s["text_offset"]] == lp["text_offset"]


def test_n_with_a_seed_is_reproducible_and_choice_j_uses_seed_plus_j(served):
    body = {"model": MODEL, "prompt": ["Hello", "The cache"], "max_tokens": 6, "n": 3}
    body |= {"temperature": 1.0, "seed": 1234, "ignore_eos": True, "return_token_ids": True}

    async def go():
        async with client(served.app()) as c:
            first, again = await asyncio.gather(
                c.post("/v1/completions", json=body), c.post("/v1/completions", json=body)
            )
            alone = await c.post(
                "/v1/completions", json={**body, "prompt": "The cache", "n": 1, "seed": 1236}
            )
            return first.json(), again.json(), alone.json()

    first, again, alone = run(go())
    toks = [c["token_ids"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == list(range(6))
    assert toks == [c["token_ids"] for c in again["choices"]]
    assert len({tuple(t) for t in toks[:3]}) > 1, "choices of one prompt should differ"
    # choice index i*n + j belongs to prompt i and sample j (seed 1234 + j)
    cache_ids = served.reference.tokenize("The cache")
    assert all(c["prompt_token_ids"] == cache_ids for c in first["choices"][3:])
    assert alone["choices"][0]["token_ids"] == toks[5]
    assert first["usage"]["prompt_tokens"] == len(cache_ids) + len(
        served.reference.tokenize("Hello")
    )
    assert first["usage"]["completion_tokens"] == 36


def test_stop_strings_end_the_text_and_report_stop_reason(served):
    free = served.reference.generate(["The model and the cache"], greedy(12))[0]
    stop = free.text[4:7]
    body = {"model": MODEL, "prompt": "The model and the cache", "max_tokens": 12}
    body |= {"temperature": 0, "ignore_eos": True, "stop": stop}

    async def go():
        async with client(served.app()) as c:
            return (await c.post("/v1/completions", json=body)).json()

    c = run(go())["choices"][0]
    assert c["text"] == free.text[: free.text.index(stop)]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == stop


# ---- /v1/chat/completions ----

MESSAGES = [
    {"role": "system", "content": "You are a small model."},
    {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "x"}]},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Tell me about the cache."},
]


def test_chat_applies_the_template_and_matches_the_engine(served):
    conversation = [dict(m) for m in MESSAGES]
    conversation[1]["content"] = "Hello\nx"  # text parts are joined with newlines
    ids = served.reference.tokenizer.apply_chat_template(conversation)
    exp = served.reference.generate([ids], greedy(6, logprobs=2))[0]
    body = {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 6, "temperature": 0}
    body |= {"ignore_eos": True, "return_token_ids": True, "logprobs": True, "top_logprobs": 2}

    async def go():
        async with client(served.app()) as c:
            whole = await c.post("/v1/chat/completions", json=body)
            stream = await c.post(
                "/v1/chat/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )
            return whole.json(), sse(stream.text)

    r, events = run(go())
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion"
    assert r["prompt_token_ids"] == ids
    (choice,) = r["choices"]
    assert choice["message"] == {"role": "assistant", "content": exp.text}
    assert choice["token_ids"] == exp.token_ids and choice["finish_reason"] == "length"
    assert r["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 6,
        "total_tokens": len(ids) + 6,
    }
    content = choice["logprobs"]["content"]
    assert len(content) == 6
    for entry, want in zip(content, exp.logprobs):
        assert entry["logprob"] == pytest.approx(want.logprob, abs=1e-5)
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy

    # stream: role chunk (with the prompt ids), content deltas, finish, usage, [DONE]
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["prompt_token_ids"] == ids
    chunks = by_index(events)[0]
    assert "".join(c["delta"].get("content", "") for c in chunks) == exp.text
    assert [t for c in chunks[1:] for t in c["token_ids"]] == exp.token_ids
    assert [e for c in chunks[1:] for e in c["logprobs"]["content"]] == content
    assert chunks[-1]["finish_reason"] == "length"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == r["usage"]


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(served):
    words = ["the cache"]
    while True:  # a conversation that leaves a few tokens of room
        messages = [{"role": "user", "content": " ".join(words)}]
        ids = served.reference.tokenizer.apply_chat_template(messages)
        if len(ids) >= MAX_MODEL_LEN - 5:
            break
        words.append("the cache")
    body = {"model": MODEL, "messages": messages, "temperature": 0, "ignore_eos": True}
    body |= {"stream": True, "return_token_ids": True}

    async def go():
        async with client(served.app()) as c:
            return sse((await c.post("/v1/chat/completions", json=body)).text)

    chunks = by_index(run(go()))[0]
    assert chunks[-1]["finish_reason"] == "length"
    assert sum(len(c.get("token_ids", [])) for c in chunks) == MAX_MODEL_LEN - len(ids)


def test_the_official_client(served):
    exp = served.reference.generate(["Hello"], greedy(4))[0]
    ids = served.reference.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    chat_exp = served.reference.generate([ids], greedy(4))[0]
    extra = {"ignore_eos": True}

    async def go():
        async with client(served.app()) as http:
            api = openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="x", http_client=http)
            models = await api.models.list()
            done = await api.completions.create(
                model=MODEL, prompt="Hello", max_tokens=4, temperature=0, extra_body=extra
            )
            parts = []
            async for chunk in await api.completions.create(
                model=MODEL,
                prompt="Hello",
                max_tokens=4,
                temperature=0,
                stream=True,
                extra_body=extra,
            ):
                parts += [c.text for c in chunk.choices]
            chat = await api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                temperature=0,
                extra_body=extra,
            )
            deltas, usage = [], None
            async for chunk in await api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra,
            ):
                deltas += [c.delta.content or "" for c in chunk.choices]
                usage = chunk.usage or usage
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                await api.completions.create(model="nope", prompt="Hello", max_tokens=2)
            with pytest.raises(openai.BadRequestError, match="temperature"):
                await api.completions.create(model=MODEL, prompt="Hello", temperature=-1)
            return models, done, parts, chat, deltas, usage

    models, done, parts, chat, deltas, usage = run(go())
    assert [(m.id, m.owned_by) for m in models.data] == [(MODEL, "pdserve")]
    assert models.data[0].max_model_len == MAX_MODEL_LEN
    assert done.choices[0].text == exp.text == "".join(parts)
    assert done.usage.completion_tokens == 4
    assert chat.choices[0].message.content == chat_exp.text == "".join(deltas)
    assert chat.choices[0].message.role == "assistant"
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == 4


# ---- other routes ----


def test_models_health_metrics_and_unknown_routes(served):
    async def go():
        async with client(served.app()) as c:
            out = {p: await c.get(p) for p in ("/v1/models", "/health", "/metrics", "/v2/x")}
            out["put"] = await c.put("/v1/completions", json={})
            out["get"] = await c.get("/v1/chat/completions")
            served.health[0] = False
            try:
                out["down"] = await c.get("/health")
            finally:
                served.health[0] = True
            return out

    out = run(go())
    card = out["/v1/models"].json()["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "pdserve"
    assert card["max_model_len"] == MAX_MODEL_LEN and isinstance(card["created"], int)
    assert out["/health"].status_code == 200
    assert out["/health"].json() == {"status": "ok", "decode": {"live": 1}}
    assert out["down"].status_code == 503 and out["down"].json()["status"] == "unavailable"
    assert out["/metrics"].headers["content-type"].startswith("text/plain; version=0.0.4")
    assert out["/metrics"].text.startswith("pdserve_engine_steps_total ")
    assert out["/v2/x"].status_code == 404 and "/v2/x" in error_of(out["/v2/x"])["message"]
    for key in ("put", "get"):
        assert out[key].status_code == 405 and "not allowed" in error_of(out[key])["message"]
    assert out["put"].headers["allow"] == "POST"
