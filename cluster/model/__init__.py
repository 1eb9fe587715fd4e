"""The served architectures (DeepSeek-V3: MLA, MoE with MXFP4 experts; GPT-OSS: GQA with
sinks and sliding windows, MoE with biased MXFP4 experts) and weight loading."""

from pdserve.cluster.model.attention_metadata import AttentionMetadata
from pdserve.cluster.model.causal_lm import CausalLM, build
from pdserve.cluster.model.deepseek_v3 import DeepseekV3ForCausalLM
from pdserve.cluster.model.gpt_oss import GptOssForCausalLM
from pdserve.cluster.model.weights import load_weights

__all__ = [
    "AttentionMetadata",
    "CausalLM",
    "DeepseekV3ForCausalLM",
    "GptOssForCausalLM",
    "build",
    "load_weights",
]
