"""A real OpenAI server on a free port: the repo's ASGI app over the live tiny-model engine of
``tests/deploy/conftest.py`` (no Ray), under uvicorn in a background thread."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from tests.deploy.conftest import MODEL, served  # noqa: F401 - the live engine fixture

__all__ = ["MODEL", "served"]


@pytest.fixture(scope="session")
def server_url(served) -> str:  # noqa: F811 - the fixture imported above
    """``http://127.0.0.1:<port>``, serving ``MODEL`` until the session ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        served.app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
