"""viscpm: VisCPM and CPM-Bee as Hugging Face models.

Importing the package registers every model type with the transformers Auto classes, so that
`AutoConfig`, `AutoModel`, `AutoModelForCausalLM`, `AutoModelForImageTextToText`, `AutoTokenizer`,
`AutoImageProcessor` and `AutoProcessor` load converted folders (and `pipeline("image-text-to-text")`
runs VisCPM-Chat).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .modeling import (
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
from .modeling.generation_cpmbee import cpmbee_beam_search
from .chat import ChatResponse, VisCPMChat
from .paint import VisCPMPaint

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
