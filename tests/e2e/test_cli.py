"""`pdserve up / status / scale / down` as a user runs them: separate processes, a Ray head that
`up` starts and `down` stops, on a HOME of the test's own (where `up` records its head). Runs
before test_cluster.py, which starts its own Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pdserve.deploy.local_head import HeadRecord, _process_table

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME of its own: ``up`` records its head in HOME/.pdserve/head.json. Leaves no head.
    A Ray cluster of this process (other tests') is no concern: ``up`` starts a head of its
    own, on ports of its own, and ``down`` stops that head's processes alone."""
    monkeypatch.setenv("HOME", str(tmp_path))
    # a user's shell: not the address or the token mode this process's own ray.init exported
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    yield tmp_path
    if (tmp_path / ".pdserve" / "head.json").exists():
        _pdserve("down", check=False)


def _pdserve(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "pdserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, f"pdserve {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _record(home: Path) -> HeadRecord:
    return HeadRecord(**json.loads((home / ".pdserve" / "head.json").read_text()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(url: str, model: str, tokens: int = 4) -> dict:
    body = json.dumps({"model": Path(model).name, "prompt": "hi", "max_tokens": tokens}).encode()
    req = urllib.request.Request(
        url + "/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_up_status_scale_down_up_again(home, tiny_model):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    up = ("up", "--model", tiny_model, "--port", str(port))
    out = _pdserve(*up).stdout
    assert f"{url}/v1" in out and "prefill/decode" in out and "started a local Ray head" in out
    with urllib.request.urlopen(url + "/v1/models", timeout=60) as r:
        (model,) = [m["id"] for m in json.loads(r.read())["data"]]
    assert model == Path(tiny_model).name  # the directory's name
    assert _complete(url, tiny_model)["usage"]["completion_tokens"] == 4

    status = _pdserve("status").stdout
    assert "RUNNING" in status
    rows = [line.split()[0] for line in status.splitlines()[2:] if "kernels:" not in line]
    assert sorted(rows) == ["decode", "prefill"]  # one replica each
    assert "prefill kernels:" in status and "decode kernels:" in status
    assert "prefill 2, decode 1" in _pdserve("scale", "--prefill", "2").stdout
    assert _complete(url, tiny_model)["usage"]["completion_tokens"] == 4

    first = _record(home)
    assert first.processes()
    assert "stopped the local Ray head" in _pdserve("down").stdout
    assert first.processes() == [] and not (home / ".pdserve" / "head.json").exists()
    status = _pdserve("status", check=False)
    assert status.returncode == 2 and "no Ray cluster is running here" in status.stderr

    # up again on the same machine: a new head, serving
    assert "started a local Ray head" in _pdserve(*up).stdout
    assert _complete(url, tiny_model)["usage"]["completion_tokens"] == 4
    # a head left half dead (its raylet and workers killed, its GCS still running, as a crash
    # can leave it): the next `up` says so, clears what is left and starts a new one
    second = _record(home)
    table = {pid: args for pid, args in _ps().items() if pid in second.processes()}
    for pid, args in table.items():
        if "gcs_server" not in args:
            os.kill(pid, signal.SIGKILL)
    assert any("gcs_server" in _ps().get(pid, "") for pid in second.processes())
    out = _pdserve(*up).stdout
    assert "does not answer: its raylet stopped" in out and "started a local Ray head" in out
    assert second.processes() == []
    assert _complete(url, tiny_model)["usage"]["completion_tokens"] == 4
    third = _record(home)
    _pdserve("down")
    assert third.processes() == []


def test_up_killed_by_sigterm_leaves_nothing_then_up(home, tiny_model):
    port = _free_port()
    up = [sys.executable, "-P", "-m", "pdserve", "up", "--model", tiny_model, "--port", str(port)]
    proc = subprocess.Popen(up, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "started a local Ray head" in proc.stdout.readline()
        record = _record(home)
        assert record.processes()
        time.sleep(2)  # into the deployment
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "stopped the Ray head this `pdserve up` started" in err
    assert record.processes() == [] and not (home / ".pdserve" / "head.json").exists()

    assert "started a local Ray head" in _pdserve(*up[4:]).stdout
    assert _complete(f"http://127.0.0.1:{port}", tiny_model)["usage"]["completion_tokens"] == 4
    _pdserve("down")


def test_up_at_an_address_where_nothing_answers_fails_at_once(home):
    proc = _pdserve("up", "--address", f"127.0.0.1:{_free_port()}", check=False, timeout=60)
    assert proc.returncode == 2 and "no Ray cluster answers at 127.0.0.1:" in proc.stderr
    assert "nothing listens" in proc.stderr
    assert not (home / ".pdserve" / "head.json").exists()


def _ps() -> dict[int, str]:
    return {pid: args for pid, (_, _, args) in _process_table().items()}
