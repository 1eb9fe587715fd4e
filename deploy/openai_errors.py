"""OpenAI-style error bodies, and the HTTP status each project error maps to.

Every error the ingress answers has the body ``{"error": {"message", "type", "param", "code"}}``.
Errors raised in a decode replica reach the ingress re-raised by Ray as a class deriving from
both ``RayTaskError`` and the original class, whose ``str`` is a traceback; the original
exception (``.cause``) supplies the message.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from pdserve.cluster.errors import ModelNotFoundError, OverloadedError, RequestError, WorkerError

log = logging.getLogger(__name__)


class PayloadTooLargeError(RequestError):
    """The request body is larger than the ingress accepts (HTTP 413)."""

    status = 413


class AuthenticationError(RequestError):
    """A missing, malformed or wrong API key (HTTP 401, code ``invalid_api_key``)."""

    status = 401
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012 - read only


class RouteError(RequestError):
    """No such route (404) or method (405); raised for Starlette's HTTP exceptions."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ErrorReply:
    """An error as the client sees it: status, OpenAI-style body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def message(self) -> str:
        return self.body["error"]["message"]


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _original(exc: BaseException) -> BaseException:
    """The user-level exception inside Ray's wrapper (``RayTaskError.cause``), if any."""
    for _ in range(8):  # a chain of actor calls nests wrappers
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc


def error_reply(exc: BaseException) -> ErrorReply:
    """Map an exception to its reply. Request errors keep their status (4xx) and name the
    problem; overload is 503 with Retry-After; anything else is 500 and logged."""
    inner = _original(exc)
    if isinstance(exc, ModelNotFoundError) or isinstance(inner, ModelNotFoundError):
        return ErrorReply(
            404, error_body(str(inner), "invalid_request_error", "model", "model_not_found")
        )
    if isinstance(exc, RequestError) or isinstance(inner, RequestError):
        status = getattr(inner, "status", 400)
        param = getattr(inner, "param", None)
        code = getattr(inner, "code", None)
        body = error_body(
            str(inner), "invalid_request_error", param, code if isinstance(code, str) else None
        )
        headers = getattr(inner, "headers", None)
        return ErrorReply(status, body, dict(headers) if isinstance(headers, dict) else {})
    if isinstance(exc, OverloadedError) or isinstance(inner, OverloadedError):
        retry = getattr(inner, "retry_after_s", 1.0)
        retry_s = max(1, math.ceil(retry)) if isinstance(retry, int | float) else 1
        body = error_body(str(inner) or "the server is overloaded", OverloadedError.error_type)
        return ErrorReply(503, body, {"Retry-After": str(retry_s)})
    if isinstance(exc, WorkerError) or isinstance(inner, WorkerError):
        log.error("request failed in a worker: %s", inner, exc_info=exc)
        return ErrorReply(500, error_body(f"worker error: {inner}", WorkerError.error_type))
    log.error("unexpected error serving a request", exc_info=exc)
    message = f"internal error: {type(inner).__name__}: {inner}"
    return ErrorReply(500, error_body(message, WorkerError.error_type))
