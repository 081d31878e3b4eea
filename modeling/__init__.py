"""Model definitions. Each file imports only torch/transformers/diffusers (and PIL/numpy for images) and its
siblings through flat relative imports, so the same files ship to the Hub as remote code.

The names below are imported when first used: the package import itself loads nothing heavy.
"""

import importlib

_EXPORTS = {
    "CpmBeeConfig": "configuration_cpmbee",
    "VisCPMChatConfig": "configuration_viscpm_chat",
    "VisCPMVisionConfig": "configuration_viscpm_chat",
    "VisCPMPaintTextEncoderConfig": "configuration_viscpm_paint",
    "VisCPMImageProcessor": "image_processing_viscpm",
    "CpmBeeForCausalLM": "modeling_cpmbee",
    "CpmBeeModel": "modeling_cpmbee",
    "CpmBeePreTrainedModel": "modeling_cpmbee",
    "VisCPMChatForConditionalGeneration": "modeling_viscpm_chat",
    "VisCPMVisionModel": "modeling_viscpm_chat",
    "find_image_bound": "modeling_viscpm_chat",
    "VisCPMPaintTextEncoder": "modeling_viscpm_paint",
    "VisCPMPaintPipeline": "pipeline_viscpm_paint",
    "VisCPMPaintPipelineOutput": "pipeline_viscpm_paint",
    "VisCPMChatProcessor": "processing_viscpm_chat",
    "CpmBeeTokenizer": "tokenization_cpmbee",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
