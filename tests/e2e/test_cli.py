"""`pdserve up / status / scale / down` as a user runs them: separate processes, a Ray head that
`up` starts and `down` stops. Runs before test_cluster.py, which starts its own Ray."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _pdserve(*args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"pdserve {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_up_status_scale_down(tiny_model):
    import ray

    if ray.is_initialized():
        pytest.skip("needs a machine without a Ray cluster in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        out = _pdserve("up", "--model", tiny_model, "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        assert f"{url}/v1" in out and "prefill/decode" in out
        with urllib.request.urlopen(url + "/v1/models", timeout=60) as r:
            (model,) = [m["id"] for m in json.loads(r.read())["data"]]  # the directory's name
        body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 4}).encode()
        req = urllib.request.Request(
            url + "/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 4

        status = _pdserve("status")
        assert "RUNNING" in status
        rows = [line.split()[0] for line in status.splitlines()[2:] if "kernels:" not in line]
        assert sorted(rows) == ["decode", "prefill"]  # one replica each
        assert "prefill kernels:" in status and "decode kernels:" in status

        assert "prefill 2, decode 1" in _pdserve("scale", "--prefill", "2")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
    finally:
        out = _pdserve("down")
    assert "stopped the local Ray head" in out
