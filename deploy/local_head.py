"""The Ray cluster a CLI command talks to: a given address, checked within seconds, or the local
head that ``pdserve up`` starts (and ``pdserve down`` stops), which outlives the command.

A head that ``up`` starts gets a temp folder and ports of its own and runs in a process session
of its own: its GCS, raylet and agents share one process group, and its workers (replicas
among them, each in a group of its own) are the raylet's descendants and name the temp folder
on their command lines. ``up`` records the group and the folder before the head starts;
``down``, an interrupted ``up`` and any later ``up`` that finds the recorded head no longer
answering stop exactly those processes (SIGTERM, then SIGKILL), and no other Ray cluster on the
machine. An address that does not answer is reported by a probe with a deadline: nothing waits
on Ray's own reconnect loops.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pdserve

log = logging.getLogger(__name__)

STATE = Path.home() / ".pdserve" / "head.json"
# each head's Ray temp folder is TEMP_ROOT/<its GCS port>, which names it in its processes'
# command lines; Ray's sockets live under it and a socket path is at most 107 bytes: keep it short
TEMP_ROOT = Path("/tmp") / f"pdserve-{os.getuid()}"
# the folder that holds the pdserve package (a source tree's root, or site-packages)
PACKAGE_PARENT = Path(pdserve.__file__).resolve().parents[1]
SERVE_FAST_PATH = "RAY_SERVE_THROUGHPUT_OPTIMIZED"  # read by every Ray process at Serve's import
AUTH_MODE = "RAY_AUTH_MODE"  # Ray's token authentication: "token" or "disabled"
PROBE_TIMEOUT_S = 30.0  # a live cluster answers a fresh driver in a few seconds
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0  # Ray's GCS and raylet take seconds to exit on SIGTERM (SIGKILL after)


def logical_cpus() -> int:
    # a tiny CPU model needs little real CPU; logical CPUs let every replica be placed
    return max(os.cpu_count() or 1, 8)


def worker_env() -> dict[str, str]:
    """The environment of the head's processes. Ray workers must import the project, installed
    or not. Serve runs throughput-optimized unless the caller's environment says otherwise:
    gRPC between deployments and user code on each replica's main event loop (on CPU it cut the
    two Ray hops of a disaggregated request from 3.96 + 5.03 ms to 2.27 + 2.71 ms)."""
    env = dict(os.environ)
    if not _installed():  # a source tree: its root, which also exposes the rooms' folders
        paths = (str(PACKAGE_PARENT), env.get("PYTHONPATH", ""))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault(SERVE_FAST_PATH, "1")
    return env


def head_env() -> dict[str, str]:
    """The environment ``ray start`` gets: the workers', and Ray's token authentication off
    unless the caller's environment turns it on. A driver given an explicit address never turns
    it on by itself (Ray >= 2.60), so a head started with it would refuse ``status``, ``scale``
    and ``down`` from a shell without the variable."""
    env = worker_env()
    env.setdefault(AUTH_MODE, "disabled")
    return env


def _installed() -> bool:
    """Whether pdserve is installed (editable or not) where every Ray worker finds it."""
    try:
        importlib.metadata.distribution("pdserve")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@dataclass(frozen=True)
class HeadRecord:
    """What ``up`` wrote when it started a head (``~/.pdserve/head.json``)."""

    pgid: int  # the process group of every process of the head
    temp_dir: str  # Ray's temp folder of the head: its logs and its address file
    address: str = ""  # the GCS address, once the head is up

    @classmethod
    def read(cls) -> HeadRecord | None:
        try:
            return cls(**json.loads(STATE.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            log.warning("ignoring %s: %s", STATE, e)
            return None

    def write(self) -> None:
        STATE.parent.mkdir(parents=True, exist_ok=True)
        STATE.write_text(json.dumps(asdict(self)))

    def alive(self) -> str | None:
        """None if the head's GCS and raylet both run, else what is missing (then no driver
        can join it: with the raylet gone one would wait for it)."""
        table = _process_table()
        args = [table[pid][2] for pid in self.processes(table)]
        missing = [p for p in ("gcs_server", "raylet") if not any(p in a for a in args)]
        return f"its {' and '.join(missing)} stopped" if missing else None

    def processes(self, table: dict[int, tuple[int, int, str]] | None = None) -> list[int]:
        """The head's live processes: its process group's Ray processes, anything naming its
        temp folder, and their descendants (in ``table``, else in a fresh ``ps``)."""
        table = _process_table() if table is None else table
        own = {
            pid
            for pid, (ppid, pgid, args) in table.items()
            if (pgid == self.pgid and "ray" in args) or _names(args, self.temp_dir)
        }
        grown = True
        while grown:
            more = {pid for pid, (ppid, _, _) in table.items() if ppid in own} - own
            own |= more
            grown = bool(more)
        own.discard(os.getpid())
        return sorted(own)


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, command line) of every live process the user can see (zombies,
    which are gone but for their exit status, left out)."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,pgid=,stat=,args="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, pgid, stat, *args = line.split(None, 4)
        if not stat.startswith("Z"):
            table[int(pid)] = (int(ppid), int(pgid), args[0] if args else "")
    return table


def _names(args: str, folder: str) -> bool:
    """Whether a command line names ``folder`` or a path in it."""
    return re.search(re.escape(folder) + r"(/|\s|$)", args) is not None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket is held until all are bound, so the system cannot
    hand out one port twice (one at a time, a closed socket's port could come back at once)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.socket())
            socks[-1].bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(address: str, timeout_s: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a fresh driver joins the cluster at ``address`` within ``timeout_s``, else why
    not. Run in a child process so that nothing here can wait longer than the deadline."""
    if address != "auto" and not _listening(address):
        return f"nothing listens at {address}"
    code = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); ray.shutdown()"
    try:
        proc = subprocess.run(
            [sys.executable, "-P", "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=worker_env(),
        )
    except subprocess.TimeoutExpired:
        return f"a driver could not join it within {timeout_s:.0f}s"
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"ray.init exited with {proc.returncode}"
    return None


def _init(address: str) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)


def join(address: str) -> None:
    """Connect this process to the cluster at ``address`` (or "auto"), or raise ValueError
    saying why it cannot, within ``PROBE_TIMEOUT_S``."""
    why = probe(address)
    if why is not None:
        raise ValueError(
            f"no Ray cluster answers at {address}: {why}. Give the address of a running "
            "cluster, or leave --address out to use the local head `pdserve up` starts"
        )
    _init(address)


class _PortTaken(RuntimeError):
    """Ray refused a port picked for it: another process took it between the pick and the
    start (the ports are free when picked, not reserved)."""


PORT_TAKEN = re.compile(r"port.*(already in use|used by other components)|address already in use")
START_ATTEMPTS = 3


def start_head() -> HeadRecord:
    """Start a local head in a session of its own; returns its record (written before the
    head starts, so that an interrupted start can still be cleaned up). A start that Ray
    refuses for a port taken meanwhile is tried again with other ports."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_head_once()
        except _PortTaken as e:
            if attempt == START_ATTEMPTS:
                raise RuntimeError(str(e)) from None
            log.info("Ray head start found a port taken; again with other ports: %s", e)
    raise AssertionError("unreachable")


def _start_head_once() -> HeadRecord:
    gcs_port, client_port, dashboard_port = _free_ports(3)
    temp_dir = TEMP_ROOT / str(gcs_port)
    _forget_stopped_heads()
    cmd = [
        sys.executable,  # Ray's CLI of this interpreter: a venv need not be on PATH
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        f"--port={gcs_port}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={logical_cpus()}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(
        cmd,
        env=head_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, out of reach of the terminal's Ctrl-C
    )
    record = HeadRecord(pgid=proc.pid, temp_dir=str(temp_dir))
    record.write()
    try:
        _, err = proc.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop(record)
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish in {START_TIMEOUT_S:.0f}s") from None
    except BaseException:  # interrupted: what started so far goes
        stop(record)
        raise
    if proc.returncode != 0:
        stop(record)
        error = _PortTaken if PORT_TAKEN.search(err.lower()) else RuntimeError
        raise error(f"`{' '.join(cmd)}` failed:\n{err.strip()}")
    address = (temp_dir / "ray_current_cluster").read_text().strip()
    record = HeadRecord(pgid=record.pgid, temp_dir=record.temp_dir, address=address)
    record.write()
    return record


def _forget_stopped_heads() -> None:
    """Remove the temp folders (logs, sockets) of earlier heads that no process names."""
    if not TEMP_ROOT.is_dir():
        return
    lines = [args for _, _, args in _process_table().values()]
    for folder in TEMP_ROOT.iterdir():
        if folder.is_dir() and not any(_names(args, str(folder)) for args in lines):
            shutil.rmtree(folder, ignore_errors=True)


def stop(record: HeadRecord) -> list[int]:
    """Stop every process of the head ``record`` names and forget it; returns the pids stopped.
    SIGTERM first, SIGKILL for what is left after ``STOP_GRACE_S``; each round looks again, for
    workers the raylet started meanwhile."""
    stopped: set[int] = set()
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        while (pids := record.processes()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            stopped.update(pids)
            time.sleep(0.2)
        if not pids:
            break
    if pids:
        log.warning("processes of the Ray head in %s still alive: %s", record.temp_dir, pids)
    STATE.unlink(missing_ok=True)
    return sorted(stopped)


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else the local head ``up`` started
    before, else start one. Returns whether this call started a head."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        join(address)
        return False
    record = HeadRecord.read()
    if record is not None:
        why = (record.alive() or probe(record.address)) if record.address else "never started"
        if why is None:
            _init(record.address)
            return False
        print(
            f"the Ray head pdserve started before ({record.address or record.temp_dir}) "
            f"does not answer: {why}; stopping what is left of it and starting a new one"
        )
        stop(record)
    record = start_head()
    try:
        _init(record.address)
    except BaseException:
        stop(record)
        raise
    return True


def connect_existing(address: str | None) -> None:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else the local head ``up`` started,
    for ``status`` and ``scale``; ValueError within seconds if none answers."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        join(address)
        return
    record = HeadRecord.read()
    if record is None:
        raise ValueError(
            "no Ray cluster is running here: `pdserve up` starts one; --address names another"
        )
    why = record.alive() if record.address else "it never started"
    if why is not None:
        raise ValueError(
            f"the Ray head pdserve started ({record.address or record.temp_dir}) does not "
            f"answer: {why}. `pdserve down` clears it; `pdserve up` starts a new one"
        )
    join(record.address)
