"""viscpm: VisCPM-Chat, VisCPM-Paint and CPM-Bee as Hugging Face models.

Importing the package registers every model type with the transformers Auto classes (see `viscpm.auto`), so
`AutoConfig`, `AutoModel`, `AutoModelForCausalLM`, `AutoModelForImageTextToText`, `AutoTokenizer`,
`AutoImageProcessor` and `AutoProcessor` load converted folders and `pipeline("image-text-to-text")` runs
VisCPM-Chat. The public names below are imported when first used, so ``import viscpm`` stays cheap.
"""

import importlib
import logging

# diffusers imports bitsandbytes whenever it is installed (the `quantization` extra). On CPUs with AVX512-BF16,
# bitsandbytes then warns at import that an optional Hub kernel package is missing and falls back to its own CPU
# kernel: a line on stderr before every command's output, about something the user did not ask for.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)

from .auto import register  # noqa: E402

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "ChatResponse": "chat",
    "ChatSession": "chat",
    "VisCPMChat": "chat",
    "VisCPMPaint": "paint",
    "CpmBeeConfig": "modeling",
    "CpmBeeForCausalLM": "modeling",
    "CpmBeeModel": "modeling",
    "CpmBeeTokenizer": "modeling",
    "VisCPMChatConfig": "modeling",
    "VisCPMChatForConditionalGeneration": "modeling",
    "VisCPMChatProcessor": "modeling",
    "VisCPMImageProcessor": "modeling",
    "VisCPMPaintPipeline": "modeling",
    "VisCPMPaintPipelineOutput": "modeling",
    "VisCPMPaintTextEncoder": "modeling",
    "VisCPMPaintTextEncoderConfig": "modeling",
    "VisCPMVisionConfig": "modeling",
    "VisCPMVisionModel": "modeling",
    "cpmbee_beam_search": "modeling.generation_cpmbee",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'viscpm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


register()
