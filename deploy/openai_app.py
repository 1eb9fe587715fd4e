"""The ASGI app (Starlette) that puts an OpenAIServer on HTTP.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``, ``GET /openapi.json``. With API keys configured, every
route but /health needs one (401 otherwise, before the body is read; see ``deploy.api_keys``).
Unknown routes get 404 and wrong methods 405, both as OpenAI-style JSON errors; bodies over
``max_body_bytes`` get 413 before they are read whole.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from pdserve.deploy.api_keys import APIKeyGuard, APIKeys
from pdserve.deploy.openai_errors import PayloadTooLargeError, RouteError
from pdserve.deploy.openai_responses import encode
from pdserve.deploy.openai_server import OpenAIServer
from pdserve.deploy.openapi_document import openapi_document
from pdserve.deploy.reply import JSONReply, Reply, StreamReply, error_json
from pdserve.deploy.sse import EventStreamResponse


def build_app(server: OpenAIServer) -> Starlette:
    limit = server.settings.max_body_bytes
    keys = APIKeys(server.settings.api_keys)
    openapi = JSONReply(200, encode(openapi_document(server.settings, server.vocab_size)))

    def post(handler: Callable[[bytes], Awaitable[Reply]]) -> Callable:
        async def endpoint(request: Request):
            try:
                body = await _read_body(request, limit)
            except PayloadTooLargeError as e:
                return _json(error_json(e))
            except ClientDisconnect:
                return Response(status_code=400)  # nobody is left to read it
            return _respond(await handler(body))

        return endpoint

    def get(handler: Callable[[], Awaitable[Reply]]) -> Callable:
        async def endpoint(request: Request):
            return _respond(await handler())

        return endpoint

    async def health(request: Request):
        # open to load balancers; the detail only for a caller with a key (or keys off)
        return _respond(await server.health(detail=keys.authenticate(request.headers) is None))

    async def openapi_json(request: Request):
        return _json(openapi)

    routes = [
        Route("/v1/completions", post(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", post(server.chat_completions), methods=["POST"]),
        Route("/v1/models", get(server.models), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", get(server.metrics), methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(APIKeyGuard, keys=keys)],
        exception_handlers={HTTPException: _http_error},
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, or PayloadTooLargeError as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"the request body has {declared} bytes; the limit is {limit} bytes"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _respond(reply: Reply):
    if isinstance(reply, StreamReply):
        return EventStreamResponse(reply.events)
    return _json(reply)


def _json(reply: JSONReply) -> Response:
    return Response(
        reply.body, status_code=reply.status, headers=reply.headers, media_type=reply.media_type
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405, in the OpenAI error shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    else:
        message = exc.detail
    reply = error_json(RouteError(message, exc.status_code))
    return Response(
        reply.body,
        status_code=reply.status,
        headers={**reply.headers, **(exc.headers or {})},
        media_type=reply.media_type,
    )
