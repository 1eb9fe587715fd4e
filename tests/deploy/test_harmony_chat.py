"""Chat completions of a model that answers in harmony (GPT-OSS's format): the final channel's
text is the message's content, the analysis channel's its reasoning_content, streamed or not;
/v1/completions keeps the raw text. The checkpoint is the tiny one with a harmony tokenizer."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SchedulerConfig
from pdserve.cluster.async_engine import AsyncEngine
from pdserve.cluster.detokenizer import IncrementalDetokenizer
from pdserve.cluster.harmony import HarmonyParser, HarmonyTokens
from pdserve.cluster.messages import GenerateRequest
from pdserve.cluster.request_output import RequestOutput
from pdserve.cluster.tokenizer import Tokenizer
from pdserve.cluster.tokenizer_trainer import train_tokenizer
from tests.deploy.conftest import MODEL, client, run, sse

MAX_MODEL_LEN = 512  # harmony's system message alone is over 100 tokens of this vocabulary

THINKING = "The user wants 6 x 7. 数据 🙂"
ANSWER = "It is 42."
REPLY = (
    f"<|channel|>analysis<|message|>{THINKING}<|end|>"
    f"<|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>"
)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "6 x 7?"}], "max_tokens": 64}


@pytest.fixture(scope="module")
def harmony_model(tiny_model, tmp_path_factory) -> str:
    """The tiny checkpoint with a harmony tokenizer of its vocabulary size."""
    path = tmp_path_factory.mktemp("tiny-harmony") / "model"
    shutil.copytree(tiny_model, path)
    size = len(Tokenizer(tiny_model).hf)
    assert train_tokenizer(path, vocab_size=size, style="harmony") == size
    return str(path)


@pytest.fixture(scope="module")
def reply(harmony_model) -> list[int]:
    return Tokenizer(harmony_model).encode(REPLY, add_special_tokens=False)


def scripted(tokenizer: Tokenizer, ids: list[int]):
    """A decode pool whose model writes ``ids``: one output per token, with the text the
    engine's detokenizer makes of them."""

    async def generate(req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        skip = req.sampling.skip_special_tokens
        detok = IncrementalDetokenizer(tokenizer, req.prompt_token_ids, skip_special_tokens=skip)
        for k, t in enumerate(ids):
            last = k == len(ids) - 1
            detok.add(t)
            yield RequestOutput(
                request_id=req.request_id,
                token_ids=[t],
                text=detok.take(finished=last),
                finished=last,
                finish_reason="stop" if last else None,
                num_prompt_tokens=len(req.prompt_token_ids),
                num_output_tokens=k + 1,
                prompt_token_ids=req.prompt_token_ids if k == 0 else None,
            )

    return generate


def harmony_app(served, harmony_model: str, generate):
    """The ingress app over ``generate``, serving the harmony checkpoint."""
    return served.app(generate, model_path=harmony_model, max_model_len=MAX_MODEL_LEN)


def test_chat_splits_the_reply_into_content_and_reasoning(served, harmony_model, reply):
    tok = Tokenizer(harmony_model)
    app = harmony_app(served, harmony_model, scripted(tok, reply))
    body = {**BODY, "return_token_ids": True}

    async def go():
        async with client(app) as c:
            whole = await c.post("/v1/chat/completions", json=body)
            stream = await c.post(
                "/v1/chat/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )
            raw = await c.post("/v1/completions", json={**body, "prompt": "6 x 7?"})
            return whole.json(), sse(stream.text), raw.json()

    r, events, raw = run(go())
    prompt = tok.apply_chat_template(BODY["messages"])
    assert r["prompt_token_ids"] == prompt
    (choice,) = r["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": ANSWER,
        "reasoning_content": THINKING,
    }
    assert choice["token_ids"] == reply and choice["finish_reason"] == "stop"
    usage = {"prompt_tokens": len(prompt), "completion_tokens": len(reply)}
    assert r["usage"] == {**usage, "total_tokens": len(prompt) + len(reply)}

    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["delta"] for e in events[1:-2] for c in e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THINKING
    assert "".join(d.get("content", "") for d in deltas) == ANSWER
    assert all(set(d) <= {"content", "reasoning_content"} for d in deltas)
    thinking = [k for k, d in enumerate(deltas) if d.get("reasoning_content")]
    answering = [k for k, d in enumerate(deltas) if d.get("content")]
    assert max(thinking) < min(answering)
    assert [t for e in events[1:-2] for c in e["choices"] for t in c["token_ids"]] == reply
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"] == r["usage"] and events[-1] == "[DONE]"

    # /v1/completions: the engine's text, header words and all
    assert raw["choices"][0]["text"] == tok.decode(reply) != ANSWER
    assert raw["choices"][0]["text"].startswith("analysis" + THINKING)


def test_a_reply_without_reasoning_has_no_reasoning_field(served, harmony_model):
    tok = Tokenizer(harmony_model)
    ids = tok.encode(f"<|channel|>final<|message|>{ANSWER}<|return|>", add_special_tokens=False)
    app = harmony_app(served, harmony_model, scripted(tok, ids))

    async def go():
        async with client(app) as c:
            whole = await c.post("/v1/chat/completions", json=BODY)
            stream = await c.post("/v1/chat/completions", json={**BODY, "stream": True})
            return whole.json(), sse(stream.text)

    r, events = run(go())
    assert r["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    deltas = [c["delta"] for e in events[:-1] for c in e["choices"]]
    assert all("reasoning_content" not in d for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == ANSWER


def test_a_request_keeping_special_tokens_gets_the_raw_text(served, harmony_model, reply):
    tok = Tokenizer(harmony_model)
    app = harmony_app(served, harmony_model, scripted(tok, reply))
    body = {**BODY, "skip_special_tokens": False}

    async def go():
        async with client(app) as c:
            return (await c.post("/v1/chat/completions", json=body)).json()

    assert run(go())["choices"][0]["message"] == {"role": "assistant", "content": REPLY}


def test_a_live_engine_on_a_harmony_checkpoint(served, harmony_model):
    """Random weights follow no format: whatever they write reaches the client split as the
    parser splits it, the same streamed or not, and usage counts every token."""
    config = EngineConfig(
        model=harmony_model,
        dtype="float64",
        device="cpu",
        cache=CacheConfig(block_size=16, num_blocks=64),
        scheduler=SchedulerConfig(max_model_len=MAX_MODEL_LEN),
    )
    engine = AsyncEngine(LLMEngine(config), name="harmony-test-engine")

    def generate(req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        def add(e: LLMEngine) -> None:
            e.add_request(req.prompt_token_ids, req.sampling, req.request_id)

        return engine.stream(req.request_id, add)

    try:
        app = harmony_app(served, harmony_model, generate)
        body = {**BODY, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        body["return_token_ids"] = True

        async def go():
            async with client(app) as c:
                whole = await c.post("/v1/chat/completions", json=body)
                stream = await c.post("/v1/chat/completions", json={**body, "stream": True})
                return whole.json(), sse(stream.text)

        r, events = run(go())
    finally:
        engine.shutdown()
    tok = Tokenizer(harmony_model)
    (choice,) = r["choices"]
    ids = choice["token_ids"]
    assert len(ids) == 24 == r["usage"]["completion_tokens"]
    content, reasoning = HarmonyParser(tok, HarmonyTokens.of(tok)).feed(ids, finished=True)
    assert choice["message"]["content"] == content
    assert choice["message"].get("reasoning_content", "") == reasoning
    deltas = [c["delta"] for e in events[1:-1] for c in e["choices"]]
    assert "".join(d.get("content", "") for d in deltas) == content
    assert "".join(d.get("reasoning_content", "") for d in deltas) == reasoning
    assert [t for e in events[1:-1] for c in e["choices"] for t in c["token_ids"]] == ids


def test_reasoning_effort_reaches_the_chat_template(served, harmony_model, reply):
    """OpenAI's ``reasoning_effort`` is rendered into harmony's system message; a value
    outside low/medium/high is a 400 naming it."""
    tok = Tokenizer(harmony_model)
    app = harmony_app(served, harmony_model, scripted(tok, reply))

    async def go():
        async with client(app) as c:
            out = []
            for effort in ("high", None, "extreme"):
                body = {**BODY, "return_token_ids": True}
                if effort:
                    body["reasoning_effort"] = effort
                out.append(await c.post("/v1/chat/completions", json=body))
            return out

    high, default, bad = run(go())
    prompt = tok.decode(high.json()["prompt_token_ids"], skip_special_tokens=False)
    assert "Reasoning: high" in prompt
    default_prompt = tok.decode(default.json()["prompt_token_ids"], skip_special_tokens=False)
    assert "Reasoning: medium" in default_prompt
    assert bad.status_code == 400 and "reasoning_effort" in bad.text
