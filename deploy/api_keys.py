"""API keys for the HTTP endpoint: where they come from, how a request proves one, and the ASGI
guard that turns away requests without one.

Keys come from the YAML (``ingress.api_keys``) and from ``PDSERVE_API_KEYS`` (comma-separated)
in the ingress replica's environment; no keys means the endpoint is open. A request sends
``Authorization: Bearer <key>`` (what OpenAI clients send) or ``x-api-key: <key>``. Every
route but ``GET /health`` needs a valid key; /health answers load balancers without one, but
then says only ok or not. Keys are never logged, and no error message repeats one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import Response

from pdserve.deploy.openai_errors import AuthenticationError
from pdserve.deploy.reply import error_json

ENV = "PDSERVE_API_KEYS"
OPEN_PATHS = frozenset({"/health"})  # probed by load balancers: no key needed


def check_key(key: object, where: str) -> None:
    """Raise ValueError if ``key`` cannot be a key. The message names ``where``, never the key:
    keys are visible ASCII without commas (the environment variable's separator)."""
    if not isinstance(key, str):
        raise ValueError(f"{where} must be a string, got {type(key).__name__}")
    if not key:
        raise ValueError(f"{where} is empty")
    if not all("!" <= c <= "~" and c != "," for c in key):
        raise ValueError(
            f"{where} may hold only visible ASCII characters other than ',' "
            "(no spaces, no control characters)"
        )


def keys_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The keys in ``PDSERVE_API_KEYS``: comma-separated, blanks around them and empty entries
    ignored."""
    keys = tuple(k.strip() for k in environ.get(ENV, "").split(",") if k.strip())
    for i, key in enumerate(keys):
        check_key(key, f"{ENV} entry {i}")
    return keys


def _digest(value: bytes) -> bytes:
    # equal-length digests: comparing them reveals nothing of a key's length either
    return hashlib.sha256(value).digest()


class APIKeys:
    """The configured keys (as digests) and the check of a request's headers against them."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(k.encode()) for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"APIKeys({len(self)} keys)"

    def matches(self, candidate: str) -> bool:
        """Whether ``candidate`` is one of the keys, in time that does not depend on which key
        (if any) it matches: every key is compared, with no early exit."""
        # header values are latin-1 decoded by Starlette: back to the bytes that were sent
        digest = _digest(candidate.encode("latin-1", "replace"))
        found = False
        for key in self._digests:
            found |= hmac.compare_digest(digest, key)
        return found

    def authenticate(self, headers: Headers) -> AuthenticationError | None:
        """None when the keys are off or ``headers`` carry a valid key, else the error for a
        missing, malformed or wrong one."""
        if not self.enabled:
            return None
        candidates = []
        authorization = headers.get("authorization")
        if authorization is not None:
            parts = authorization.split(None, 1)
            if len(parts) == 2 and parts[0].lower() == "bearer":
                candidates.append(parts[1].strip())
        api_key = headers.get("x-api-key")
        if api_key is not None and api_key.strip():
            candidates.append(api_key.strip())
        if not candidates:
            if authorization is not None:
                return AuthenticationError(
                    "the Authorization header must be 'Bearer <API key>'; no API key was found"
                )
            return AuthenticationError(
                "this server needs an API key: send 'Authorization: Bearer <API key>' "
                "(or an 'x-api-key' header)"
            )
        valid = [self.matches(c) for c in candidates]  # all of them, so no early exit
        if any(valid):
            return None
        return AuthenticationError("the API key is not valid")


class APIKeyGuard:
    """ASGI middleware: answers 401 to an HTTP request without a valid key, before routing and
    before reading the body, except on OPEN_PATHS."""

    def __init__(self, app: Any, keys: APIKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.keys.enabled and _route(scope) not in OPEN_PATHS:
            error = self.keys.authenticate(Headers(scope=scope))
            if error is not None:
                reply = error_json(error)
                response = Response(
                    reply.body, reply.status, reply.headers, media_type=reply.media_type
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route(scope: dict[str, Any]) -> str:
    """The path the router matches: without the mount point (Serve's route prefix), if any."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path
