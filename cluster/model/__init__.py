"""The DeepSeek-V3 architecture: MLA attention, MoE with MXFP4 experts, weight loading."""

from pdserve.cluster.model.attention_metadata import AttentionMetadata
from pdserve.cluster.model.deepseek_v3 import DeepseekV3ForCausalLM
from pdserve.cluster.model.weights import load_weights

__all__ = ["AttentionMetadata", "DeepseekV3ForCausalLM", "load_weights"]
