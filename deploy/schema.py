"""The deployment YAML schema: the ``args`` of ``deploy.app:build_app`` (pydantic lives here only).

One model and one KV block size serve both pools, so a prefill and a decode replica can never
disagree on them; checks that need the checkpoint (heads and experts splitting over TP) run in
the builder.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from pdserve.cluster.faults import ENV as FAULTS_ENV
from pdserve.cluster.faults import POINTS
from pdserve.deploy.api_keys import check_key
from pdserve.kernels.registry import OPS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    path: str | None = Field(None, description="Checkpoint directory in Hugging Face format.")
    preset: str | None = Field(
        None,
        description="Make a random checkpoint of this shape (tiny, deepseek-v2-lite, "
        "deepseek-v3-4l, deepseek-v3, gpt-oss-tiny, gpt-oss-20b, gpt-oss-120b) at `path`, or in "
        "~/.cache/pdserve/models, if none is there yet.",
    )
    name: str | None = Field(
        None, description="Model id clients send; default: the directory name."
    )
    dtype: Literal["auto", "bfloat16", "float32", "float64"] = Field(
        "auto",
        description="Weights and KV dtype; auto is bfloat16 on GPU, float32 on CPU. float64 is "
        "slow but batch-invariant in practice: for tests comparing batched runs token for token.",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Prompt + output tokens at most; default: the model's maximum."
    )
    block_size: int = Field(64, ge=1, le=1024, description="Tokens per KV block, on both pools.")
    seed: int = Field(0, description="Seed of each replica's sampler for unseeded requests.")
    random_weights_seed: int | None = Field(
        None,
        description="Draw the weights at load from this seed, on each rank's device, instead "
        "of reading safetensors: benchmarks of models too large for a disk (`pdserve "
        "make-model --config-only` writes the config and tokenizer this needs). On CPU the "
        "values are those `make-model --mxfp4` writes for the seed; a GPU draws its own, the "
        "same on every GPU of its model (a draw depends on the SM count): pools drawn on "
        "different devices are refused at first contact.",
    )

    @model_validator(mode="after")
    def _path_or_preset(self) -> ModelSpec:
        if self.path is None and self.preset is None:
            raise ValueError("model needs a `path`, a `preset`, or both")
        return self


class AutoscalingSpec(_Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(..., ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must persist this long to add.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Idle this long to remove.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling min_replicas {self.min_replicas} > max_replicas {self.max_replicas}"
            )
        return self


class PoolSpec(_Strict):
    num_replicas: int | None = Field(
        None, ge=1, description="Fixed replica count (default 1); exclusive with autoscaling."
    )
    autoscaling_config: AutoscalingSpec | None = Field(
        None, description="Scale this pool on load, independently of the other pool."
    )
    tp: int = Field(
        1,
        ge=1,
        description="Tensor-parallel ranks per replica, one process each. The pools may differ: "
        "every rank keeps the whole KV cache, so any prefill group fills any decode group.",
    )
    gpus_per_rank: float | None = Field(
        None, ge=0, description="GPUs per rank; default 1 when the Ray cluster has GPUs, else 0."
    )
    cpus_per_rank: float = Field(1.0, gt=0, description="CPUs per rank (and its torch threads).")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type to place this pool on, e.g. H100 or H200."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per rank, to pin a worker group."
    )
    max_num_seqs: int = Field(256, ge=1, description="Requests in a replica's running batch.")
    max_num_batched_tokens: int = Field(
        8192, ge=16, description="Tokens per forward pass (decodes + prefill chunks)."
    )
    long_prefill_token_threshold: int = Field(
        0, ge=0, description="Cap one prompt's chunk per step so prompts share steps (0: off)."
    )
    kv_cache_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="Share of free GPU memory, after weights, for the KV cache."
    )
    kv_cache_cpu_bytes: int = Field(
        256 << 20, ge=1 << 20, description="KV cache size when the pool runs on CPU."
    )
    num_kv_blocks: int | None = Field(None, ge=1, description="Fixed KV block count (tests).")
    prefix_caching: bool = Field(
        True,
        description="Keep the KV of full blocks after a request ends and reuse it for any later "
        "prompt that starts with the same tokens (evicted, least recently used first, only when "
        "blocks are needed).",
    )
    kernels: dict[str, str] = Field(
        default_factory=dict, description=f"Kernel backend per op, overriding the registry: {OPS}."
    )
    max_consecutive_failures: int = Field(
        16,
        ge=0,
        description="A replica whose last N requests all failed on its side, over 30 s or more, "
        "fails Serve's health check, so Serve replaces it instead of routing more requests into "
        "it (0: never). One failed step of a large batch does not trip it.",
    )
    cuda_graphs: bool = Field(
        True,
        description="Replay decode steps from CUDA graphs captured per batch-size bucket at "
        "start-up (GPU decode and colocated pools), and steps with prefill chunks from graphs "
        "captured per decode-row and token bucket (GPU prefill and colocated pools).",
    )
    cuda_graph_max_batch: int = Field(
        128, ge=1, description="Largest decode batch captured; larger steps run eagerly."
    )
    cuda_graph_max_tokens: int = Field(
        2048,
        ge=0,
        description="Most context tokens (prefill chunks with their cached prefixes) of a step "
        "replayed from a graph; larger steps, and those whose graph start-up timed no faster "
        "than eager, run eagerly (0: steps with prefill chunks always run eagerly).",
    )
    plan_ahead: bool = Field(
        True,
        description="Plan and launch each decode step while the one before replays its CUDA "
        "graph, its input tokens taken on the GPU from that step's samples (false: plan every "
        "step after the tokens before it are back).",
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests Serve routes to one replica at once."
    )
    max_waiting: int = Field(
        0,
        ge=0,
        description="Requests a replica queues beyond its running batch before it answers 503 "
        "(0: 4 x max_num_seqs); nothing is accepted that cannot be held.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Serve queues for the pool when every replica is busy "
        "(then 503 at once); default 4 x max_ongoing_requests.",
    )
    prefill_timeout_s: float = Field(
        30.0, gt=0, description="Decode pool: a prefill call slower than this fails and is retried."
    )
    kv_transfer_timeout_s: float = Field(
        10.0, gt=0, description="Decode pool: a KV transfer slower than this fails and is retried."
    )
    prefill_retries: int = Field(
        1, ge=0, description="Decode pool: more prefill attempts after a failed one (fresh blocks)."
    )
    local_prefill_fallback: bool = Field(
        True,
        description="Decode pool: prefill locally when every prefill attempt failed (else 503).",
    )
    direct_line: bool = Field(
        True,
        description="Prefill pool: decode replicas call it over a direct TCP line instead of "
        "through Ray Serve (two Serve hops off every first token); used with kv_transport nccl.",
    )

    @model_validator(mode="after")
    def _replicas(self) -> PoolSpec:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give a pool num_replicas or autoscaling_config, not both")
        if (
            self.tp > 1
            and self.gpus_per_rank not in (None, 0)
            and self.gpus_per_rank != int(self.gpus_per_rank)
        ):
            raise ValueError(
                f"tp {self.tp} needs whole GPUs per rank (NCCL), "
                f"got gpus_per_rank {self.gpus_per_rank}"
            )
        return self

    @field_validator("kernels")
    @classmethod
    def _known_ops(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(OPS))
        if unknown:
            raise ValueError(f"kernel overrides name unknown ops {unknown}; ops are {list(OPS)}")
        return v


def _api_key(key: SecretStr) -> SecretStr:
    check_key(key.get_secret_value(), "the API key")
    return key


class IngressSpec(_Strict):
    host: str = Field("127.0.0.1", description="HTTP host `pdserve up` binds Serve's proxy to.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port for `pdserve up`.")
    num_replicas: int = Field(1, ge=1, description="Ingress replicas (tokenize, format, stream).")
    max_ongoing_requests: int = Field(
        2048,
        ge=1,
        description="Requests (streams included) one ingress replica holds at once; Serve's "
        "default of 5 would cap the whole cluster at 5 requests in flight per ingress replica.",
    )
    api_keys: list[Annotated[SecretStr, AfterValidator(_api_key)]] = Field(
        default_factory=list,
        description="Keys a request must carry (`Authorization: Bearer <key>` or `x-api-key`); "
        "every route but /health is closed without one, and /health then shows only ok or not. "
        "Visible ASCII without commas. Keys in PDSERVE_API_KEYS (comma-separated) in the ingress "
        "replicas' environment count too, and keep keys out of the config. Empty: open.",
    )
    prompt_special_tokens: bool = Field(
        True,
        description="Whether special-token text in a /v1/completions text prompt (e.g. "
        "`<｜end▁of▁sentence｜>`) is that special token, as in vLLM, or plain text (false: for "
        "apps that put untrusted text into raw prompts). Token-id prompts can name any token "
        "either way; chat messages are always plain text.",
    )
    max_body_bytes: int = Field(
        16 << 20, ge=1024, description="Larger request bodies get 413 before they are read."
    )
    max_choices: int = Field(
        256, ge=1, description="Completions (prompts x n) one request may ask for at most."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _masked(cls, v: object) -> object:
        """Keys as SecretStr before anything looks at them: an error prints what it checked."""
        if isinstance(v, list | tuple):
            return [SecretStr(k) if isinstance(k, str) else k for k in v]
        return SecretStr(v) if isinstance(v, str) else v


class AppSpec(_Strict):
    name: str = Field("pdserve", description="Serve application name; also keys the registry.")
    model: ModelSpec = Field(..., description="The one model both pools serve.")
    prefill: PoolSpec | None = Field(
        default_factory=PoolSpec,
        description="The prefill pool; null for colocated mode (decode replicas prefill).",
    )
    decode: PoolSpec = Field(default_factory=PoolSpec, description="The decode pool.")
    kv_transport: Literal["auto", "nccl", "object_store"] = Field(
        "auto",
        description="How KV moves from prefill to decode: object_store (Ray's), or nccl (point "
        "to point through torch.distributed; gloo when the pools run on CPU); auto: nccl when "
        "both pools hold whole GPUs per rank, else object_store (NCCL cannot join two ranks "
        "that share one GPU).",
    )
    ingress: IngressSpec = Field(default_factory=IngressSpec, description="The HTTP front.")
    faults: dict[str, float] = Field(
        default_factory=dict,
        description=f"Injected failure rates per point {POINTS} (testing only; the environment "
        f"variable {FAULTS_ENV} overrides it where a replica starts).",
    )

    @field_validator("faults")
    @classmethod
    def _fault_points(cls, v: dict[str, float]) -> dict[str, float]:
        for point, rate in v.items():
            if point not in POINTS:
                raise ValueError(f"unknown fault point {point!r}; points are {list(POINTS)}")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate {rate} for {point} is outside [0, 1]")
        return v

    @property
    def colocated(self) -> bool:
        return self.prefill is None

    @model_validator(mode="after")
    def _transport(self) -> AppSpec:
        if self.colocated and self.kv_transport == "nccl":
            raise ValueError("kv_transport nccl needs a prefill pool; colocated mode moves no KV")
        return self
