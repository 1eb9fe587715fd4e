"""The Ingress deployment: the OpenAI API on Serve's HTTP proxy, in front of the Decode pool.

    client --HTTP--> Serve proxy --> Ingress (this) --DeploymentHandle, streaming--> Decode

The app builder binds it (it is the only code that calls ``serve.deployment``)::

    serve.deployment(Ingress).options(...).bind(decode_handle, settings, app_name)

API keys in ``PDSERVE_API_KEYS`` (comma-separated) in the replica's environment join those of
the settings (the YAML's ``ingress.api_keys``); with none, the endpoint is open.

HTTP goes through the same Starlette app the tests drive (``deploy.openai_app.build_app``),
built on the replica after the constructor (Serve's late-bound ``__serve_build_asgi_app__``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from pdserve.cluster.errors import OverloadedError
from pdserve.cluster.messages import GenerateRequest
from pdserve.cluster.request_output import RequestOutput
from pdserve.deploy.api_keys import ENV
from pdserve.deploy.ingress_settings import IngressSettings
from pdserve.deploy.openai_app import build_app
from pdserve.deploy.openai_server import OpenAIServer

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

__all__ = ["Ingress", "IngressSettings"]

log = logging.getLogger(__name__)


@serve.ingress()
class Ingress:
    """One ingress replica. ``decode`` is the Decode deployment's handle; ``app_name`` is the
    Serve application, whose replicas ``ClusterView`` reports on for /health and /metrics."""

    def __init__(self, decode: DeploymentHandle, settings: IngressSettings, app_name: str) -> None:
        from pdserve.cluster.replica_registry import ClusterView  # imports Ray's replica state

        configured = len(settings.api_keys)
        settings = settings.with_env_keys(os.environ)
        log.info(  # how many, never which
            "API keys: %d from the app config, %d from %s%s",
            configured,
            len(settings.api_keys) - configured,
            ENV,
            "" if settings.api_keys else "; the endpoint is open",
        )
        self._decode = decode
        self._cluster = ClusterView(app_name)
        self.server = OpenAIServer(
            settings, self.generate, self._cluster.health, self._cluster.metrics_text
        )

    def __serve_build_asgi_app__(self):
        return build_app(self.server)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """``req``'s deltas from a Decode replica that Serve picks. Serve's own back-pressure
        (queue full, no replica up) becomes OverloadedError (503). Closing this iterator before
        the last output cancels the call, and with it the request on the decode side."""
        response = self._decode.options(stream=True).generate.remote(req)
        done = False
        try:
            async for out in response:
                yield out
            done = True
        except (BackPressureError, DeploymentUnavailableError) as e:
            raise OverloadedError(f"no decode replica can take the request now: {e}") from e
        finally:
            if not done:
                response.cancel()
