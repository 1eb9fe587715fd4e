"""What every process agrees on: configs, requests and messages, the model, the KV layout, the
engine both workers run."""

from pdserve.cluster.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.cluster.engine import LLMEngine
from pdserve.cluster.request_output import RequestOutput
from pdserve.cluster.sampling_params import SamplingParams

__all__ = [
    "CacheConfig",
    "EngineConfig",
    "LLMEngine",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
