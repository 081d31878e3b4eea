"""Model definitions. Each file imports only torch/transformers/diffusers and its siblings (flat relative
imports), so the same files ship to the Hub as remote code."""

from .configuration_cpmbee import CpmBeeConfig
from .modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel, CpmBeePreTrainedModel
from .tokenization_cpmbee import CpmBeeTokenizer

__all__ = ["CpmBeeConfig", "CpmBeeForCausalLM", "CpmBeeModel", "CpmBeePreTrainedModel", "CpmBeeTokenizer"]
