"""Registration of viscpm's classes with the transformers Auto classes, without loading the model code.

``import viscpm`` calls :func:`register`: afterwards ``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``,
``AutoModelForImageTextToText``, ``AutoTokenizer``, ``AutoImageProcessor`` and ``AutoProcessor`` load converted
folders, and ``pipeline("image-text-to-text")`` runs VisCPM-Chat. Only the configs are imported for it (they
need nothing but ``transformers.PretrainedConfig``). Every other class is registered as a :class:`DeferredClass`
that imports its module on first use and then puts the real class into the Auto mappings, so the model code,
torchvision (behind transformers' image processing) and diffusers load only when a model is used: the command
line's ``--help`` and usage errors cost little more than ``import torch``.

``AutoImageProcessor`` and ``AutoProcessor`` live in modules that import torchvision; the real classes go into
their mappings when transformers loads those modules (an import hook), which is before anyone can call them
and after the costly imports they share have been paid. In the same way ``VisCPMPaintPipeline`` becomes an
attribute of ``diffusers`` when diffusers loads ``DiffusionPipeline``, so that
``DiffusionPipeline.from_pretrained`` loads converted Paint folders.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from .modeling.configuration_cpmbee import CpmBeeConfig
from .modeling.configuration_viscpm_chat import VisCPMChatConfig, VisCPMVisionConfig
from .modeling.configuration_viscpm_paint import VisCPMPaintTextEncoderConfig

__all__ = ["DeferredClass", "register"]

REGISTRY = (
    # (Auto class, config class, module under viscpm.modeling, class name)
    ("AutoModel", CpmBeeConfig, "modeling_cpmbee", "CpmBeeModel"),
    ("AutoModelForCausalLM", CpmBeeConfig, "modeling_cpmbee", "CpmBeeForCausalLM"),
    ("AutoTokenizer", CpmBeeConfig, "tokenization_cpmbee", "CpmBeeTokenizer"),
    ("AutoModel", VisCPMVisionConfig, "modeling_viscpm_chat", "VisCPMVisionModel"),
    ("AutoModel", VisCPMChatConfig, "modeling_viscpm_chat", "VisCPMChatForConditionalGeneration"),
    ("AutoModelForImageTextToText", VisCPMChatConfig, "modeling_viscpm_chat", "VisCPMChatForConditionalGeneration"),
    ("AutoTokenizer", VisCPMChatConfig, "tokenization_cpmbee", "CpmBeeTokenizer"),
    ("AutoImageProcessor", VisCPMChatConfig, "image_processing_viscpm", "VisCPMImageProcessor"),
    ("AutoProcessor", VisCPMChatConfig, "processing_viscpm_chat", "VisCPMChatProcessor"),
    ("AutoModel", VisCPMPaintTextEncoderConfig, "modeling_viscpm_paint", "VisCPMPaintTextEncoder"),
)
"""What ``import viscpm`` registers."""

_HOOKED = {  # Auto class -> the transformers module that defines it, when importing that module is costly
    "AutoImageProcessor": "transformers.models.auto.image_processing_auto",
    "AutoProcessor": "transformers.models.auto.processing_auto",
}


class DeferredClass:
    """Stands in for a class in the Auto mappings until first used: any attribute (``from_pretrained``,
    ``from_config``, ...) or call imports ``viscpm.modeling.<module>``, registers the real class in place of this
    one and forwards to it. ``__name__``, ``__module__`` and ``config_class`` answer without importing anything,
    which is all transformers reads of a registered class before using it."""

    def __init__(self, module: str, name: str, config_class: type | None):
        self.__name__ = self.__qualname__ = name
        self.__module__ = f"viscpm.modeling.{module}"
        if config_class is not None:
            self.config_class = config_class

    def resolve(self) -> type:
        cls = _real_class(self.__module__.rsplit(".", 1)[1], self.__name__)
        for auto_name, config_class, _, name in REGISTRY:
            if name == self.__name__:
                _register_one(auto_name, config_class, cls)
        return cls

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.resolve(), attr)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __instancecheck__(self, instance) -> bool:
        return isinstance(instance, self.resolve())

    def __subclasscheck__(self, subclass) -> bool:
        return issubclass(subclass, self.resolve())

    def __repr__(self) -> str:
        return f"<deferred class '{self.__module__}.{self.__name__}'>"


def _register_one(auto_name: str, config_class: type, cls) -> None:
    """Put ``cls`` (a class, or a `DeferredClass` for models and tokenizers) into ``auto_name``'s mapping."""
    import transformers

    if auto_name == "AutoTokenizer":
        transformers.AutoTokenizer.register(config_class, tokenizer_class=cls, exist_ok=True)
    elif auto_name == "AutoImageProcessor":
        transformers.AutoImageProcessor.register(
            config_class, image_processor_classes={"pil": cls, "torchvision": cls}, exist_ok=True
        )
    else:
        getattr(transformers, auto_name).register(config_class, cls, exist_ok=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback()`` right after the module ``name`` has been executed (once), whoever imports it."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            self.callback()

        spec.loader.exec_module = exec_then_register
        return spec


def _real_class(module: str, name: str) -> type:
    return getattr(importlib.import_module(f"viscpm.modeling.{module}"), name)


def _after_import(module_name: str, callback) -> None:
    """``callback()`` now if ``module_name`` is loaded, else right after it is."""
    if module_name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(module_name, callback))


_PIPELINE_MODULE = "viscpm.modeling.pipeline_viscpm_paint"


def _pipeline_to_diffusers() -> None:
    """``diffusers.VisCPMPaintPipeline``, where `DiffusionPipeline.from_pretrained` looks up a folder's
    ``model_index.json`` ``_class_name``: converted Paint folders load with the generic class too."""
    import diffusers

    diffusers.VisCPMPaintPipeline = sys.modules[_PIPELINE_MODULE].VisCPMPaintPipeline


def _diffusers_loaded() -> None:
    module = sys.modules.get(_PIPELINE_MODULE)
    if module is None:
        importlib.import_module(_PIPELINE_MODULE)  # its own import hook then calls _pipeline_to_diffusers
    elif hasattr(module, "VisCPMPaintPipeline"):
        _pipeline_to_diffusers()
    # else: the pipeline module is being imported (it is what loaded diffusers); its hook registers it once done


def register() -> None:
    """Register every class of :data:`REGISTRY` (idempotent), and the Paint pipeline with diffusers."""
    from transformers import AutoConfig

    for config_class in (CpmBeeConfig, VisCPMVisionConfig, VisCPMChatConfig, VisCPMPaintTextEncoderConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    stand_ins: dict[str, DeferredClass] = {}
    hooked: dict[str, list] = {}
    for auto_name, config_class, module, name in REGISTRY:
        if auto_name in _HOOKED:
            hooked.setdefault(_HOOKED[auto_name], []).append((auto_name, config_class, module, name))
            continue
        model_config = config_class if module.startswith("modeling_") else None
        _register_one(auto_name, config_class, stand_ins.setdefault(name, DeferredClass(module, name, model_config)))
    for module_name, entries in hooked.items():
        def register_entries(entries=entries):
            for auto_name, config_class, module, name in entries:
                _register_one(auto_name, config_class, _real_class(module, name))

        _after_import(module_name, register_entries)
    # DiffusionPipeline is defined there: whoever uses it has loaded the costly part of diffusers already.
    _after_import(_PIPELINE_MODULE, _pipeline_to_diffusers)
    _after_import("diffusers.pipelines.pipeline_utils", _diffusers_loaded)
