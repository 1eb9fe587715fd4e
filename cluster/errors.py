"""Errors that cross process boundaries and map to HTTP statuses at the ingress.

Ray re-raises a replica's exception in the caller as a class deriving from both RayTaskError and
the original class, so ``except RequestError`` works across deployments.
"""

from __future__ import annotations


class RequestError(ValueError):
    """The request itself is bad (HTTP 400); the message names the problem."""

    status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(RequestError):
    status = 404
    error_type = "model_not_found"


class OverloadedError(RuntimeError):
    """No room for the request right now (HTTP 503 with Retry-After); try again shortly."""

    status = 503
    error_type = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WorkerError(RuntimeError):
    """A worker failed to serve the request (HTTP 500); the cluster keeps serving others."""

    status = 500
    error_type = "internal_error"


class KVLayoutMismatch(WorkerError):
    """A prefill and a decode replica disagree on the KV layout: a deployment error."""


class PrefixEvicted(RuntimeError):
    """Cached KV blocks a decode replica counted on for a prompt's prefix were evicted before
    its reservation took them: the attempt is retried, counting again."""
