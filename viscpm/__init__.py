"""viscpm: VisCPM and CPM-Bee as Hugging Face models.

Importing the package registers the model types with the transformers Auto* classes, so that
`AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and `AutoTokenizer` load converted folders.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .modeling import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeModel, CpmBeeTokenizer

__version__ = "0.1.0.dev0"


def _register() -> None:
    AutoConfig.register(CpmBeeConfig.model_type, CpmBeeConfig, exist_ok=True)
    AutoModel.register(CpmBeeConfig, CpmBeeModel, exist_ok=True)
    AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM, exist_ok=True)
    AutoTokenizer.register(CpmBeeConfig, tokenizer_class=CpmBeeTokenizer, exist_ok=True)


_register()

__all__ = ["CpmBeeConfig", "CpmBeeForCausalLM", "CpmBeeModel", "CpmBeeTokenizer", "__version__"]
