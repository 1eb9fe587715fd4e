"""The OpenAPI 3.1 document served at ``GET /openapi.json``: the two POST routes and
``/v1/models``.

Bodies are described by JSON Schema that msgspec derives from the very Structs that decode
requests and encode responses, so the types cannot drift from the code; on top of that go the
value ranges the server checks itself (``n``, ``max_tokens``, ``temperature``, the prompt's
shapes and token ids). What no schema can say, e.g. that a prompt plus ``max_tokens`` must fit
the context, is a 400 naming the problem.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.cluster.sampling_params import MAX_LOGPROBS
from pdserve.deploy.ingress_settings import IngressSettings
from pdserve.deploy.openai_protocol import (
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    REASONING_EFFORTS,
    ROLES,
    ChatCompletionRequest,
    CompletionRequest,
)
from pdserve.deploy.openai_responses import ChatCompletion, Completion, ModelList

_REF = "#/components/schemas/{name}"
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "description": "What is wrong, and where."},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERRORS = {
    "400": "The request is malformed or asks for something this server cannot do.",
    "404": "No such model.",
    "413": "The request body is larger than the server accepts.",
    "500": "A worker failed while serving the request.",
    "503": "Overloaded or no replica live: retry after the Retry-After header's seconds.",
}


def openapi_document(settings: IngressSettings, vocab: int) -> dict[str, Any]:
    """The document for a server with ``settings`` and a vocabulary of ``vocab`` token ids."""
    (completion, chat, *_), schemas = msgspec.json.schema_components(
        [CompletionRequest, ChatCompletionRequest, Completion, ChatCompletion, ModelList],
        ref_template=_REF,
    )
    _narrow_common(schemas["CompletionRequest"], settings, vocab)
    _narrow_common(schemas["ChatCompletionRequest"], settings, vocab)
    _narrow_completion(schemas["CompletionRequest"], vocab)
    _narrow_chat(schemas["ChatCompletionRequest"], schemas["ChatMessage"])
    schemas["Error"] = _ERROR
    errors = dict(_ERRORS)
    if settings.api_keys:
        errors["401"] = "No API key, or not a valid one."
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "pdserve",
            "version": "1",
            "description": f"OpenAI-compatible API serving {settings.served_model_name!r}; "
            "unknown request fields are ignored.",
        },
        "paths": {
            "/v1/completions": {"post": _post("Completions", "CompletionRequest", "Completion")},
            "/v1/chat/completions": {
                "post": _post("Chat completions", "ChatCompletionRequest", "ChatCompletion")
            },
            "/v1/models": {
                "get": {
                    "summary": "The model this server serves",
                    "responses": {
                        "200": _json("The model list.", "ModelList"),
                        **({"401": _json(errors["401"], "Error")} if settings.api_keys else {}),
                    },
                }
            },
        },
        "components": {"schemas": schemas},
    }
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        responses.update((code, _json(text, "Error")) for code, text in errors.items())
    if settings.api_keys:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        doc["security"] = [{"bearer": []}, {"apiKey": []}]
    return doc


def _json(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(name=schema)}}},
    }


def _post(summary: str, request: str, response: str) -> dict[str, Any]:
    ok = _json("The whole response, or with stream=true server-sent events.", response)
    # before OpenAPI 3.2 (itemSchema) an event stream's `schema` describes one event
    ok["content"]["text/event-stream"] = {
        "schema": {
            "type": "object",
            "description": f"One server-sent event: `data: <{response} chunk>`, and last "
            "`data: [DONE]`",
            "properties": {
                "data": {"type": "string", "description": "A JSON chunk, or [DONE]"},
                "event": {"type": "string"},
            },
            "required": ["data"],
        }
    }
    return {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(name=request)}}},
        },
        "responses": {"200": ok},
    }


def _set(schema: dict[str, Any], name: str, value: dict[str, Any]) -> None:
    """Replace property ``name``'s schema, keeping JSON null allowed where it was."""
    props = schema["properties"]
    nullable = any(b.get("type") == "null" for b in props[name].get("anyOf", []))
    props[name] = {"anyOf": [value, {"type": "null"}], "default": None} if nullable else value


def _int(lo: int, hi: int | None = None) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo} | ({"maximum": hi} if hi is not None else {})


def _narrow_common(schema: dict[str, Any], settings: IngressSettings, vocab: int) -> None:
    stop = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    _set(schema, "model", {"type": "string", "enum": [settings.served_model_name]})
    _set(schema, "n", _int(1, settings.max_n))
    _set(schema, "temperature", {"type": "number", "minimum": 0})
    _set(schema, "top_p", {"type": "number", "exclusiveMinimum": 0, "maximum": 1})
    _set(schema, "top_k", _int(-1))
    _set(schema, "stop", {"anyOf": [stop, {"type": "array", "items": stop, "maxItems": MAX_STOP}]})
    ids = {"type": "array", "items": _int(0, vocab - 1), "maxItems": MAX_STOP_TOKEN_IDS}
    _set(schema, "stop_token_ids", ids)
    _set(schema, "max_tokens", _int(1, settings.max_model_len - 1))


def _narrow_completion(schema: dict[str, Any], vocab: int) -> None:
    ids = {"type": "array", "items": _int(0, vocab - 1), "minItems": 1}
    text = {"type": "string", "minLength": 1}
    batch = {"type": "array", "items": {"anyOf": [text, ids]}, "minItems": 1}
    _set(schema, "prompt", {"anyOf": [text, ids, batch]})
    _set(schema, "logprobs", _int(0, MAX_LOGPROBS))


def _narrow_chat(schema: dict[str, Any], message: dict[str, Any]) -> None:
    schema["properties"]["messages"]["minItems"] = 1
    _set(schema, "max_completion_tokens", schema["properties"]["max_tokens"]["anyOf"][0])
    _set(schema, "top_logprobs", _int(0, MAX_LOGPROBS))
    _set(schema, "reasoning_effort", {"type": "string", "enum": list(REASONING_EFFORTS)})
    _set(message, "role", {"type": "string", "enum": list(ROLES)})
