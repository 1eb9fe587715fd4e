"""Deploying, scaling and reading a pdserve application on a running Ray cluster.

Apps are deployed declaratively (a Serve config naming ``deploy.app:build_app``), so scaling a
pool only changes the ``deployments`` overrides: Serve then adds or drains replicas in place and
the others keep serving, with their models loaded.
"""

from __future__ import annotations

import asyncio
import copy
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

IMPORT_PATH = "pdserve.deploy.app:build_app"
POOL_DEPLOYMENTS = {"prefill": "Prefill", "decode": "Decode"}


def load_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(app args, http options) from a Serve config file, or from a bare args file."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if "applications" in raw:
        apps = raw["applications"]
        if len(apps) != 1 or apps[0].get("import_path") != IMPORT_PATH:
            raise ValueError(f"{path}: expected one application with import_path {IMPORT_PATH}")
        return dict(apps[0].get("args") or {}), dict(raw.get("http_options") or {})
    return raw, {}


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def deploy(args: dict[str, Any], http: dict[str, Any], overrides: list[dict] | None = None) -> str:
    """Start Serve's proxy (if it is not up) and deploy the app; returns the app name."""
    name = args.get("name", "pdserve")
    serve.start(http_options=http)
    have = _client().http_config
    want = (http.get("host", have.host), int(http.get("port", have.port)))
    if (have.host, have.port) != want:  # Serve keeps the options it started with
        raise ValueError(
            f"Serve on this cluster already listens on {have.host}:{have.port}, not "
            f"{want[0]}:{want[1]}: deploy there (--port {have.port}), or `pdserve down` first"
        )
    app = {"name": name, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}
    if overrides:
        app["deployments"] = overrides
    _client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    return name


def deployed_config(name: str) -> dict[str, Any]:
    details = _client().get_serve_details()
    app = details.get("applications", {}).get(name)
    if app is None or not app.get("deployed_app_config"):
        raise ValueError(f"no pdserve application named {name!r} is deployed")
    return copy.deepcopy(app["deployed_app_config"])


def scale(name: str, replicas: dict[str, int]) -> dict[str, Any]:
    """Set fixed replica counts per pool ({"prefill": 2, "decode": 1}) in place."""
    cfg = deployed_config(name)
    colocated = (cfg.get("args") or {}).get("prefill", {}) is None
    overrides = {d["name"]: d for d in cfg.get("deployments") or []}
    for pool, n in replicas.items():
        if n < 1:
            raise ValueError(f"--{pool} must be >= 1, got {n}")
        if pool == "prefill" and colocated:
            raise ValueError("this app is colocated: it has no prefill pool to scale")
        dep = POOL_DEPLOYMENTS[pool]
        overrides[dep] = {"name": dep, "num_replicas": n, "autoscaling_config": None}
    cfg["deployments"] = list(overrides.values())
    _client().deploy_apps(ServeDeploySchema.model_validate({"applications": [cfg]}))
    return cfg


def wait_running(name: str, timeout_s: float = 600.0) -> None:
    """Until Serve reports the app RUNNING; raises with Serve's message if it fails."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None:
            if app.status == "RUNNING":
                return
            if app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"deploying {name} failed: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"{name} not running after {timeout_s:.0f}s")


def wait_healthy(url: str, timeout_s: float = 600.0) -> None:
    """Until GET {url}/health answers 200 (both pools have a live replica)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health not 200 after {timeout_s:.0f}s")


def replica_stats(name: str) -> list:
    from pdserve.cluster.replica_registry import ClusterView

    return asyncio.run(ClusterView(name).snapshot())


def replica_counts(name: str) -> dict[str, int]:
    """Running replicas per pool, as Serve counts them."""
    app = serve.status().applications.get(name)
    out = {}
    for pool, dep in POOL_DEPLOYMENTS.items():
        d = app.deployments.get(dep) if app else None
        out[pool] = 0 if d is None else d.replica_states.get("RUNNING", 0)
    return out
