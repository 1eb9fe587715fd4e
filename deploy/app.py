"""The app builder: YAML args -> a Serve application of Ingress -> Decode (-> Prefill).

``serve run deploy/configs/<name>.yaml`` and ``pdserve up`` both land here, through the
import path ``deploy.app:build_app``. This is the only code that calls
``serve.deployment(...).bind(...)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from pdserve.cluster.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.cluster.replica import WorkerSpec
from pdserve.cluster.replica_registry import get_registry
from pdserve.decode_worker.server import DecodeServer
from pdserve.deploy.ingress import Ingress
from pdserve.deploy.ingress_settings import IngressSettings
from pdserve.deploy.prefill_autoscaling import PREFILL_POLICY
from pdserve.deploy.prefix_router import DECODE_SLACK, PREFILL_SLACK, ROUTER_CLASS
from pdserve.deploy.schema import AppSpec, ModelSpec, PoolSpec
from pdserve.prefill_worker.server import PrefillServer

log = logging.getLogger(__name__)

MODEL_CACHE = Path.home() / ".cache" / "pdserve" / "models"
REPLICA_CPUS = 0.25  # the replica process of a TP group, which schedules but holds no weights


def resolve_model(spec: ModelSpec) -> Path:
    """The checkpoint directory, made from the preset first if it is not there yet."""
    path = Path(spec.path).expanduser() if spec.path else MODEL_CACHE / str(spec.preset)
    # a preset's directory made for weights drawn at load holds no weights to read
    bare = spec.random_weights_seed is None and not any(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or (bare and spec.preset is not None):
        if spec.preset is None:
            raise ValueError(f"no checkpoint at {str(path)!r} and no preset to make one")
        from pdserve.cluster.checkpoint_maker import make_model

        log.info("making a %s checkpoint at %s", spec.preset, path)
        make_model(path, spec.preset, seed=spec.seed, weights=spec.random_weights_seed is None)
    return path


def weights_digest(path: Path, random_seed: int | None = None) -> str:
    """Identifies a checkpoint cheaply: its config and the names and sizes of its shards, or
    the seed its weights are drawn from."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    if random_seed is not None:
        h.update(f"random:{random_seed}".encode())
        return h.hexdigest()[:16]
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _check_tp(pool: str, tp: int, cfg: ModelConfig) -> None:
    for what, n in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("intermediate_size", cfg.intermediate_size),
        ("moe_intermediate_size", cfg.moe_intermediate_size),
    ):
        if n % tp:
            raise ValueError(f"{pool}.tp = {tp} does not divide the model's {what} = {n}")
    # an expert shard off the 32-element MXFP4 blocks is held in whole blocks (MXFP4Experts)


def _gpus(pool: PoolSpec, cluster_gpus: float) -> float:
    if pool.gpus_per_rank is not None:
        return pool.gpus_per_rank
    return 1.0 if cluster_gpus > 0 else 0.0


def kv_transport(spec: AppSpec, gpus: dict[str, float]) -> str:
    """The transport ``auto`` stands for: NCCL where both pools hold whole GPUs, else Ray's
    object store. Ranks holding a fraction of a GPU may share one device with the other pool's,
    and NCCL cannot join two ranks on one device (each transfer would fail and decode fall back
    to prefilling locally), so ``nccl`` with fractional GPUs is refused."""
    if spec.colocated:
        return spec.kv_transport if spec.kv_transport != "auto" else "object_store"
    on_gpus = gpus["prefill"] > 0 and gpus["decode"] > 0
    shared = on_gpus and min(gpus["prefill"], gpus["decode"]) < 1
    if spec.kv_transport == "nccl" and shared:
        raise ValueError(
            f"kv_transport nccl needs whole GPUs per rank (gpus_per_rank prefill "
            f"{gpus['prefill']}, decode {gpus['decode']}): NCCL cannot join two ranks on one "
            "device; use object_store or auto"
        )
    if spec.kv_transport != "auto":
        return spec.kv_transport
    return "nccl" if on_gpus and not shared else "object_store"


def _engine_config(
    spec: AppSpec, pool: PoolSpec, role: str, path: Path, gpus: float, rank_actors: bool
) -> EngineConfig:
    return EngineConfig(
        model=str(path),
        dtype=spec.model.dtype,
        device="cuda" if gpus > 0 else "cpu",
        seed=spec.model.seed,
        random_weights_seed=spec.model.random_weights_seed,
        role=role,
        kernel_overrides=dict(pool.kernels),
        decode_graphs="auto" if pool.cuda_graphs else "off",
        kv_message_timeout_s=pool.kv_transfer_timeout_s,  # a stuck pair is freed as soon
        decode_graph_max_batch=pool.cuda_graph_max_batch,
        mixed_graphs="auto" if pool.cuda_graphs else "off",
        mixed_graph_max_tokens=pool.cuda_graph_max_tokens,
        plan_ahead=pool.plan_ahead,
        tp=pool.tp,
        rank_actors=rank_actors,
        gpus_per_rank=gpus,
        cpus_per_rank=pool.cpus_per_rank,
        cache=CacheConfig(
            block_size=spec.model.block_size,
            num_blocks=pool.num_kv_blocks,
            gpu_memory_fraction=pool.kv_cache_memory_fraction,
            cpu_kv_bytes=pool.kv_cache_cpu_bytes,
            prefix_caching=pool.prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=pool.max_num_seqs,
            max_num_batched_tokens=pool.max_num_batched_tokens,
            max_model_len=spec.model.max_model_len,
            long_prefill_token_threshold=pool.long_prefill_token_threshold,
            max_waiting=pool.max_waiting,
        ),
    )


def _deployment_options(
    pool: PoolSpec, name: str, gpus: float, rank_actors: bool = False
) -> dict[str, Any]:
    rank: dict[str, float] = {"CPU": pool.cpus_per_rank, **pool.resources}
    ongoing = pool.max_ongoing_requests or 2 * pool.max_num_seqs
    if gpus > 0:
        rank["GPU"] = gpus
    if pool.accelerator_type:
        rank[f"accelerator_type:{pool.accelerator_type}"] = 0.001
    opts: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": ongoing,
        "max_queued_requests": pool.max_queued_requests or 4 * ongoing,
        "graceful_shutdown_timeout_s": 120,  # scale-down lets streams finish
        "health_check_period_s": 5,
    }
    if pool.autoscaling_config is not None:
        opts["autoscaling_config"] = pool.autoscaling_config.model_dump()
        if name == "Prefill":  # calls on its direct line count as load too
            opts["autoscaling_config"]["policy"] = {"policy_function": PREFILL_POLICY}
    else:
        opts["num_replicas"] = pool.num_replicas or 1
    if pool.tp == 1 and not rank_actors:
        opts["ray_actor_options"] = {
            "num_cpus": rank.pop("CPU"),
            "num_gpus": rank.pop("GPU", 0),
            "resources": rank,
        }
    else:  # bundle 0 for the replica, one bundle per rank; ranks of a replica share a node
        opts["ray_actor_options"] = {"num_cpus": REPLICA_CPUS}
        opts["placement_group_bundles"] = [{"CPU": REPLICA_CPUS}] + [dict(rank)] * pool.tp
        opts["placement_group_strategy"] = "STRICT_PACK" if gpus > 0 else "PACK"
    return opts


def generation(spec: AppSpec) -> str:
    """Same args, same generation: scaling (Serve's deployment overrides) keeps it, so replicas
    are not restarted; any change of the args makes a new one."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _router(spec: AppSpec, slack: int) -> RequestRouterConfig:
    """Serve routes each pool's requests to the replica that got the prompt's prefix before
    (``deploy/prefix_router.py``)."""
    kwargs = {"block_size": spec.model.block_size, "slack": slack}
    return RequestRouterConfig(request_router_class=ROUTER_CLASS, request_router_kwargs=kwargs)


def build_app(args: dict[str, Any]) -> serve.Application:
    spec = AppSpec.model_validate(args)
    gen = generation(spec)
    path = resolve_model(spec.model)
    cfg = ModelConfig.from_dir(path)
    pools = {"decode": spec.decode} | ({} if spec.colocated else {"prefill": spec.prefill})
    for name, pool in pools.items():
        _check_tp(name, pool.tp, cfg)
    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    gpus = {name: _gpus(pool, cluster_gpus) for name, pool in pools.items()}
    transport = kv_transport(spec, gpus)
    # decode pulls KV from prefill ranks directly: over the prefill replica's line, or else from
    # rank actors it can call (a rank actor costs each prompt a few ms)
    prefill_actors = transport == "nccl" and not spec.colocated and not spec.prefill.direct_line
    digest = weights_digest(path, spec.model.random_weights_seed)
    max_len = spec.model.max_model_len or cfg.max_position_embeddings

    def worker(pool_name: str, role: str) -> WorkerSpec:
        pool = pools[pool_name]
        actors = prefill_actors and pool_name == "prefill"
        engine = _engine_config(spec, pool, role, path, gpus[pool_name], actors)
        return WorkerSpec(
            spec.name,
            pool_name,
            engine,
            transport,
            digest,
            gen,
            faults=dict(spec.faults),
            prefill_timeout_s=pool.prefill_timeout_s,
            kv_transfer_timeout_s=pool.kv_transfer_timeout_s,
            prefill_retries=pool.prefill_retries,
            local_prefill_fallback=pool.local_prefill_fallback,
            max_consecutive_failures=pool.max_consecutive_failures,
            direct_line=pool.direct_line,
        )

    prefill = None
    if not spec.colocated:
        prefill = (
            serve.deployment(PrefillServer)
            .options(
                **_deployment_options(
                    spec.prefill,
                    "Prefill",
                    gpus["prefill"],
                    prefill_actors,
                ),
                request_router_config=_router(spec, PREFILL_SLACK),
            )
            .bind(worker("prefill", "prefill"))
        )
    role = "colocated" if spec.colocated else "decode"
    decode = (
        serve.deployment(DecodeServer)
        .options(
            **_deployment_options(spec.decode, "Decode", gpus["decode"]),
            request_router_config=_router(spec, DECODE_SLACK),
        )
        .bind(worker("decode", role), prefill)
    )
    settings = IngressSettings(
        served_model_name=spec.model.name or path.name,
        model_path=str(path),
        max_model_len=max_len,
        max_body_bytes=spec.ingress.max_body_bytes,
        max_choices=spec.ingress.max_choices,
        prompt_special_tokens=spec.ingress.prompt_special_tokens,
        api_keys=tuple(k.get_secret_value() for k in spec.ingress.api_keys),
    )
    ingress = (
        serve.deployment(Ingress)
        .options(
            name="Ingress",
            num_replicas=spec.ingress.num_replicas,
            max_ongoing_requests=spec.ingress.max_ongoing_requests,
            ray_actor_options={"num_cpus": 0.5},
        )
        .bind(decode, settings, spec.name)
    )
    if ray.is_initialized():
        registry = get_registry(spec.name)
        ray.get(registry.set_app_args.remote(spec.model_dump(mode="json"), gen))
    return ingress
