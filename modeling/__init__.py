"""Model definitions. Each file imports only torch/transformers/diffusers (and PIL/numpy for images) and its
siblings through flat relative imports, so the same files ship to the Hub as remote code."""

from .configuration_cpmbee import CpmBeeConfig
from .configuration_viscpm_chat import VisCPMChatConfig, VisCPMVisionConfig
from .image_processing_viscpm import VisCPMImageProcessor
from .modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel, CpmBeePreTrainedModel
from .modeling_viscpm_chat import VisCPMChatForConditionalGeneration, VisCPMVisionModel, find_image_bound
from .modeling_viscpm_paint import VisCPMPaintTextEncoder, VisCPMPaintTextEncoderConfig
from .pipeline_viscpm_paint import VisCPMPaintPipeline, VisCPMPaintPipelineOutput
from .processing_viscpm_chat import VisCPMChatProcessor
from .tokenization_cpmbee import CpmBeeTokenizer

__all__ = [
    "CpmBeeConfig",
    "CpmBeeForCausalLM",
    "CpmBeeModel",
    "CpmBeePreTrainedModel",
    "CpmBeeTokenizer",
    "VisCPMChatConfig",
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatProcessor",
    "VisCPMImageProcessor",
    "VisCPMPaintPipeline",
    "VisCPMPaintPipelineOutput",
    "VisCPMPaintTextEncoder",
    "VisCPMPaintTextEncoderConfig",
    "VisCPMVisionConfig",
    "VisCPMVisionModel",
    "find_image_bound",
]
