"""viscpm: VisCPM and CPM-Bee as Hugging Face models.

Importing the package registers every model type with the transformers Auto classes, so that
`AutoConfig`, `AutoModel`, `AutoModelForCausalLM`, `AutoModelForImageTextToText`, `AutoTokenizer`,
`AutoImageProcessor` and `AutoProcessor` load converted folders (and `pipeline("image-text-to-text")`
runs VisCPM-Chat).
"""

import logging

# diffusers imports bitsandbytes whenever it is installed (the `quantization` extra). On CPUs with AVX512-BF16,
# bitsandbytes then warns at import that an optional Hub kernel package is missing and falls back to its own CPU
# kernel: a line on stderr before every command's output, about something the user did not ask for.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)

from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .modeling import (  # noqa: E402
    CpmBeeConfig,
    CpmBeeForCausalLM,
    CpmBeeModel,
    CpmBeeTokenizer,
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMChatProcessor,
    VisCPMImageProcessor,
    VisCPMPaintPipeline,
    VisCPMPaintPipelineOutput,
    VisCPMPaintTextEncoder,
    VisCPMPaintTextEncoderConfig,
    VisCPMVisionConfig,
    VisCPMVisionModel,
)
from .modeling.generation_cpmbee import cpmbee_beam_search  # noqa: E402
from .chat import ChatResponse, VisCPMChat  # noqa: E402
from .paint import VisCPMPaint  # noqa: E402

__version__ = "0.1.0.dev0"


def _register() -> None:
    AutoConfig.register(CpmBeeConfig.model_type, CpmBeeConfig, exist_ok=True)
    AutoModel.register(CpmBeeConfig, CpmBeeModel, exist_ok=True)
    AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM, exist_ok=True)
    AutoTokenizer.register(CpmBeeConfig, tokenizer_class=CpmBeeTokenizer, exist_ok=True)

    AutoConfig.register(VisCPMVisionConfig.model_type, VisCPMVisionConfig, exist_ok=True)
    AutoConfig.register(VisCPMChatConfig.model_type, VisCPMChatConfig, exist_ok=True)
    AutoModel.register(VisCPMVisionConfig, VisCPMVisionModel, exist_ok=True)
    AutoModel.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(VisCPMChatConfig, tokenizer_class=CpmBeeTokenizer, exist_ok=True)
    AutoImageProcessor.register(
        VisCPMChatConfig,
        image_processor_classes={"pil": VisCPMImageProcessor, "torchvision": VisCPMImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(VisCPMChatConfig, VisCPMChatProcessor, exist_ok=True)

    AutoConfig.register(VisCPMPaintTextEncoderConfig.model_type, VisCPMPaintTextEncoderConfig, exist_ok=True)
    AutoModel.register(VisCPMPaintTextEncoderConfig, VisCPMPaintTextEncoder, exist_ok=True)


_register()

__all__ = [
    "ChatResponse",
    "CpmBeeConfig",
    "CpmBeeForCausalLM",
    "CpmBeeModel",
    "CpmBeeTokenizer",
    "VisCPMChat",
    "VisCPMChatConfig",
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatProcessor",
    "VisCPMImageProcessor",
    "VisCPMPaint",
    "VisCPMPaintPipeline",
    "VisCPMPaintPipelineOutput",
    "VisCPMPaintTextEncoder",
    "VisCPMPaintTextEncoderConfig",
    "VisCPMVisionConfig",
    "VisCPMVisionModel",
    "cpmbee_beam_search",
    "__version__",
]
