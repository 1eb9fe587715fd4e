"""The local head's record finds exactly the processes of its head (its group's Ray processes,
descendants that left the group, orphans naming its temp folder) and `stop` ends them all and
nothing else; a record that cannot be read is ignored. No Ray here: stand-in processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pdserve.deploy import local_head
from pdserve.deploy.local_head import HeadRecord

SLEEP = "import time; time.sleep(600)"
# a stand-in worker: leaves its parent's group (as Ray's workers do), then sleeps
FORK = (
    "import os, subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(600)']); "
    "time.sleep(600)"
)


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setattr(local_head, "STATE", tmp_path / "head.json")
    return tmp_path / "head.json"


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)


def _children(pid: int) -> list[int]:
    table = local_head._process_table()
    return [p for p, (ppid, _, _) in table.items() if ppid == pid]


def test_stop_ends_the_heads_processes_and_nothing_else(tmp_path, state):
    temp = str(tmp_path / "46379")
    leader = _spawn(FORK, "ray-stand-in")  # its session's group: the record's pgid
    orphan = _spawn(SLEEP, f"--session-dir={temp}/session_1")  # a group of its own
    stranger = _spawn(SLEEP, f"--session-dir={temp}0/session_1")  # another head's folder
    try:
        deadline = time.monotonic() + 30
        while not _children(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        (worker,) = _children(leader.pid)
        record = HeadRecord(pgid=leader.pid, temp_dir=temp, address="127.0.0.1:1")
        record.write()
        assert HeadRecord.read() == record
        assert set(record.processes()) == {leader.pid, worker, orphan.pid}

        assert set(local_head.stop(record)) == {leader.pid, worker, orphan.pid}
        assert record.processes() == [] and not state.exists()
        assert stranger.poll() is None  # untouched
    finally:
        for p in (leader, orphan, stranger):
            p.kill()
            p.wait()


def test_a_record_that_cannot_be_read_is_ignored(state):
    assert HeadRecord.read() is None
    state.write_text("{not json")
    assert HeadRecord.read() is None
    state.write_text('{"pgid": 1}')  # no temp folder
    assert HeadRecord.read() is None


def test_alive_names_what_is_missing(tmp_path):
    record = HeadRecord(pgid=2**22 + 7, temp_dir=str(tmp_path / "1"), address="127.0.0.1:1")
    assert record.alive() == "its gcs_server and raylet stopped"


def test_probe_of_an_address_nothing_listens_at(state):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert local_head.probe(f"127.0.0.1:{port}") == f"nothing listens at 127.0.0.1:{port}"
    with pytest.raises(ValueError, match="no Ray cluster answers at 127.0.0.1"):
        local_head.join(f"127.0.0.1:{port}")


def test_a_heads_ports_are_distinct():
    """A head's GCS, client-server and dashboard ports are picked while all are held: Ray
    refuses to start when two of its components are given one port."""
    for _ in range(20):
        ports = local_head._free_ports(3)
        assert len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)


def test_a_start_refused_for_a_taken_port_is_tried_again(monkeypatch):
    """Ray's message when two of its components get one port, or another process took one:
    the start goes again with new ports, three times at most; other failures are not retried."""
    seen = (
        "Ray component client_server is trying to use a port number 48891 that is used by "
        "other components."
    )
    assert local_head.PORT_TAKEN.search(seen.lower())
    assert not local_head.PORT_TAKEN.search("permission denied: /tmp/pdserve-0")
    calls = []

    def refused_twice():
        calls.append(1)
        if len(calls) < 3:
            raise local_head._PortTaken(seen)
        return HeadRecord(pgid=1, temp_dir="/tmp/x", address="127.0.0.1:1")

    monkeypatch.setattr(local_head, "_start_head_once", refused_twice)
    assert local_head.start_head().address == "127.0.0.1:1" and len(calls) == 3

    def always_refused():
        raise local_head._PortTaken(seen)

    monkeypatch.setattr(local_head, "_start_head_once", always_refused)
    with pytest.raises(RuntimeError, match="used by other components"):
        local_head.start_head()

    def broken():
        calls.append(1)
        raise RuntimeError("ray start failed: no such option")

    calls.clear()
    monkeypatch.setattr(local_head, "_start_head_once", broken)
    with pytest.raises(RuntimeError, match="no such option"):
        local_head.start_head()
    assert len(calls) == 1
