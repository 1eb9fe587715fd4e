"""Connecting to Ray, or starting a local head that outlives the CLI, and stopping it again."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import ray

STATE = Path.home() / ".pdserve" / "state.json"
ROOT = Path(__file__).resolve().parents[1]
SERVE_FAST_PATH = "RAY_SERVE_THROUGHPUT_OPTIMIZED"  # read by every Ray process at Serve's import


def logical_cpus() -> int:
    # a tiny CPU model needs little real CPU; logical CPUs let every replica be placed
    return max(os.cpu_count() or 1, 8)


def _env() -> dict[str, str]:
    """Ray workers must import the project, installed or not. Serve runs throughput-optimized
    unless the caller's environment says otherwise: gRPC between deployments and user code on
    each replica's main event loop (on CPU it cut the two Ray hops of a disaggregated request
    from 3.96 + 5.03 ms to 2.27 + 2.71 ms; BENCHMARKS.md)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault(SERVE_FAST_PATH, "1")
    return env


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address``, or a local one; start a local head if there is none.
    Returns whether this call started it."""
    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]
    if address:
        ray.init(address=address, logging_level="ERROR")
        return False
    try:
        ray.init(address="auto", logging_level="ERROR")
        return False
    except ConnectionError:
        pass
    cmd = ["ray", "start", "--head", f"--num-cpus={logical_cpus()}", "--disable-usage-stats"]
    cmd.append("--include-dashboard=false")
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps({"started_ray": True}))
    ray.init(address="auto", logging_level="ERROR")
    return True


def connect_existing(address: str | None) -> None:
    try:
        ray.init(address=address or "auto", logging_level="ERROR")
    except ConnectionError as e:
        raise ValueError("no Ray cluster is running here; start one with `pdserve up`") from e


def stop_if_started() -> bool:
    """Stop the local head ``connect`` started, if it did."""
    if not STATE.is_file() or not json.loads(STATE.read_text()).get("started_ray"):
        return False
    ray.shutdown()
    subprocess.run(["ray", "stop", "--force"], check=False, stdout=subprocess.DEVNULL)
    STATE.unlink()
    return True
