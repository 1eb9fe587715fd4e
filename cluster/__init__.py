"""What every process agrees on: configs, requests and messages, the model, the KV layout, the
engine both workers run."""

from cluster.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from cluster.engine import LLMEngine
from cluster.request_output import RequestOutput
from cluster.sampling_params import SamplingParams

__all__ = [
    "CacheConfig",
    "EngineConfig",
    "LLMEngine",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
