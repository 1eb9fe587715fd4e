"""The OpenAPI document at /openapi.json, and schemathesis fuzzing the API from it on the real
tiny-model engine: schema-valid and schema-violating requests alike never get a 5xx, and every
reply matches what the document promises (statuses, content types, response schemas)."""

from __future__ import annotations

from collections import Counter

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.deploy.conftest import MAX_MODEL_LEN, MODEL, client, run

TIMEOUT_S = 30  # any one request
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
]


def test_the_document_describes_the_routes_and_the_servers_limits(served):
    async def go():
        async with client(served.app()) as c:
            return (await c.get("/openapi.json")).json()

    doc = run(go())
    assert set(doc["paths"]) == {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    schemas = doc["components"]["schemas"]
    completion = schemas["CompletionRequest"]
    assert completion["required"] == ["model", "prompt"]
    props = completion["properties"]
    assert props["model"] == {"type": "string", "enum": [MODEL]}
    n = props["n"]["anyOf"][0]
    assert n["minimum"] == 1 and n["maximum"] == served.settings.max_n
    assert props["max_tokens"]["anyOf"][0]["maximum"] == MAX_MODEL_LEN - 1
    vocab = served.reference.tokenizer.vocab_size
    ids = props["prompt"]["anyOf"][1]
    assert ids["items"]["maximum"] == vocab - 1 and ids["minItems"] == 1
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["minItems"] == 1 and chat["logprobs"]["anyOf"][0]["type"] == "boolean"
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    responses = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert set(responses) == {"200", "400", "404", "413", "500", "503"}  # 401 only with keys
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "security" not in doc


def test_fuzz_the_api_from_its_openapi_document(served):
    # few choices per request, so that valid requests finish fast on the real engine
    schema = schemathesis.openapi.from_asgi("/openapi.json", served.app(max_choices=4))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 3
    cases = st.one_of(
        op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode
    )
    seen = Counter()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def one(case):
        response = case.call_and_validate(checks=CHECKS, timeout=TIMEOUT_S)
        seen[case.meta.generation.mode.value, response.status_code] += 1

    one()
    assert seen[GenerationMode.POSITIVE.value, 200] > 0, seen  # valid requests were served
    assert any(mode == "negative" and 400 <= code < 500 for mode, code in seen), seen


def test_fuzz_streamed_replies_match_the_documented_events(served):
    """Streams every time (the fuzzing above reaches one only by chance): each server-sent
    event matches the document's event schema."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", served.app(max_choices=4))
    for path, body in (
        ("/v1/completions", {"prompt": "properties", "ignore_eos": None}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        body = {**body, "model": MODEL, "stream": True, "max_tokens": 3}
        case = schema[path]["POST"].Case(body=body, media_type="application/json")
        response = case.call_and_validate(checks=CHECKS, timeout=TIMEOUT_S)
        assert response.status_code == 200
        assert response.headers["content-type"][0].startswith("text/event-stream")
