"""Chat / CPM-Bee language adapters: the LoRA config, adding it, saving it (with a model card), loading and switching.

A language adapter is LoRA on CPM-Bee's projections (optionally with the query tokens and the mapping trained in full)
saved as a standard peft folder: ``adapter_config.json`` + ``adapter_model.safetensors`` + a ``README.md`` whose
metadata names the base model and the language. The same code serves CPM-Bee alone and the Paint text encoder.
:func:`adapter_folder_writer` is how every adapter folder is written: all at once, never half.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from torch import nn

from ..conversion.common import follow_umask

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""CPM-Bee's projections (plain ``nn.Linear``): attention q/k/v/out and the gated FFN."""

QUERY_MODULE = "vision_model.embeddings.position_embedding.query"
"""Where the query tokens are trained. ``query`` is a bare parameter, which peft cannot save as a module; the query
tokens enter the model only as ``query + position_embedding.query.weight[2:2 + n]``, so training that position table
(a module peft can save) gives exactly the same gradients and the same set of functions as training ``query``."""

MAPPING_MODULES = ("mapping.0", "mapping.2")
"""The two linear layers of the vision-to-CPM-Bee mapping (wrapped one by one: the model indexes ``mapping[0]``)."""

ADAPTER_ENTRIES = ("adapter_config.json", "text_encoder", "adapter_model.safetensors", "adapter_model.bin", "unet",
                   "README.md")
"""What an adapter folder holds: a Chat adapter's flat peft files, a Paint adapter's ``text_encoder/`` and ``unet/``
peft folders, and the model card. The first two are the markers loaders go by: they are removed first and put in
place last, so a folder that has one holds a complete adapter."""
_MARKERS = ADAPTER_ENTRIES[:2]
STAGING_PREFIX = ".adapter-"
"""Names of the hidden folders an adapter is staged in (left behind only by a hard kill)."""


def lora_target_pattern(target_modules: Sequence[str] = LORA_TARGET_MODULES) -> str:
    """A peft ``target_modules`` regex for CPM-Bee's projections only, wherever CPM-Bee sits (``language_model.`` in
    Chat, the root of `CpmBeeForCausalLM`, ``model.`` in the Paint text encoder); never the vision encoder."""
    unknown = sorted(set(target_modules) - set(LORA_TARGET_MODULES))
    if unknown or not target_modules:
        raise ValueError(f"target_modules must be among {LORA_TARGET_MODULES}, got {list(target_modules)}")
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"(?:.*\.)?model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"


def language_adapter_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    train_query: bool = False,
    train_mapping: bool = False,
    **kwargs,
):
    """The `peft.LoraConfig` of a language adapter: LoRA on CPM-Bee's projections; with ``train_query`` /
    ``train_mapping`` the query tokens (see :data:`QUERY_MODULE`) and the mapping are trained in full and saved in
    the adapter (``modules_to_save``), so the adapter holds everything it changed."""
    from peft import LoraConfig

    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    if train_query:
        modules_to_save.append(QUERY_MODULE)
    if train_mapping:
        modules_to_save.extend(MAPPING_MODULES)
    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_target_pattern(target_modules),
        modules_to_save=modules_to_save or None, bias="none", **kwargs,
    )


def add_language_adapter(model: nn.Module, config=None, adapter_name: str = "default", **config_kwargs):
    """Wrap ``model`` (VisCPM-Chat, CPM-Bee or the Paint text encoder) in a `peft.PeftModel` with a new, trainable
    language adapter; every base weight is frozen. ``config`` defaults to :func:`language_adapter_config`."""
    from peft import PeftModel, get_peft_model

    config = config if config is not None else language_adapter_config(**config_kwargs)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        model.set_adapter(adapter_name)
        return model
    return get_peft_model(model, config, adapter_name=adapter_name)


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------


def write_card(folder: Path, base_model: str | None, language: str | None, what: str) -> None:
    """Model card metadata: base model, language, tags (peft's own card is kept and extended)."""
    from huggingface_hub import ModelCard, ModelCardData

    readme = folder / "README.md"
    card = ModelCard.load(readme) if readme.exists() else None
    data = card.data if card is not None and card.data is not None else ModelCardData()
    body = card.text if card is not None else ""
    if base_model:
        data.base_model = base_model
    if language:
        data.language = [language]
    data.library_name = "peft"
    tags = [tag for tag in (data.tags or []) if not (base_model and tag.startswith("base_model:"))]
    if base_model:
        tags.append(f"base_model:adapter:{base_model}")  # peft tags the local path it was trained from
    data.tags = sorted(set(tags + ["viscpm", "lora", "language-adapter"]))
    intro = (f"\n# {what} language adapter ({language or 'unspecified language'})\n\nA LoRA adapter of "
             f"`{base_model or 'VisCPM'}` trained with `viscpm.adapters` so that the model answers in this language. "
             "Load it with `VisCPMChat.from_pretrained(base, adapter=path)` (Paint: `VisCPMPaint.from_pretrained(base, "
             "adapter=path)`) or `peft.PeftModel.from_pretrained(model, path)`.\n")
    text = body if "language adapter" in body else intro + body
    ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(readme)


def write_peft_folder(model, folder: str | os.PathLike, language: str | None = None, base_model: str | None = None,
                      adapter_name: str | None = None, what: str = "VisCPM") -> Path:
    """Write one adapter of a `PeftModel` into ``folder`` as a flat peft folder with its model card; ``base_model``
    (e.g. a Hub id) replaces the local path peft records. Not atomic: see :func:`save_language_adapter`."""
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    if base_model:
        config.base_model_name_or_path = base_model
    folder = Path(folder)
    model.save_pretrained(folder, selected_adapters=[adapter_name], safe_serialization=True,
                          save_embedding_layers=False)
    if adapter_name != "default":  # peft puts a named adapter in a subfolder of that name
        for path in (folder / adapter_name).iterdir():
            os.replace(path, folder / path.name)
        (folder / adapter_name).rmdir()
    write_card(folder, base_model or config.base_model_name_or_path, language, what)
    return folder


@contextlib.contextmanager
def adapter_folder_writer(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder inside ``output_dir``; once it is written, its entries replace the adapter in
    ``output_dir`` (other things there, e.g. ``checkpoints/``, stay).

    The old adapter's markers (:data:`ADAPTER_ENTRIES`) leave first and the new ones arrive last, each by one rename,
    so at no moment does ``output_dir`` hold an adapter that is partly old, partly new or half written. On any
    failure (a full disk, Ctrl-C) ``output_dir`` keeps its old adapter and the staging folder is removed. Files get
    the modes the umask gives (peft's safetensors would otherwise be readable by their owner only).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "new-", dir=output_dir))
    try:
        yield staging
        for path in staging.rglob("*"):
            follow_umask(path)
        _swap_in(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, output_dir: Path) -> None:
    """Move the old adapter entries of ``output_dir`` aside (markers first) and the staged ones in (markers last);
    on failure, undo what was done."""
    new = sorted((path.name for path in staging.iterdir()), key=lambda name: name in _MARKERS)
    old = [name for name in dict.fromkeys((*ADAPTER_ENTRIES, *new))
           if os.path.lexists(output_dir / name)]
    aside = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "old-", dir=output_dir))
    moved, placed = [], []
    try:
        for name in old:
            os.replace(output_dir / name, aside / name)
            moved.append(name)
        for name in new:
            os.replace(staging / name, output_dir / name)
            placed.append(name)
    except BaseException:
        for name in reversed(placed):
            os.replace(output_dir / name, staging / name)
        for name in reversed(moved):
            os.replace(aside / name, output_dir / name)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_language_adapter(model, output_dir: str | os.PathLike, language: str | None = None,
                          base_model: str | None = None, adapter_name: str | None = None, what: str = "VisCPM") -> Path:
    """Save one adapter of a `PeftModel` as a standard, flat peft folder (``adapter_config.json``,
    ``adapter_model.safetensors``, ``README.md`` whose metadata names ``base_model`` and ``language``), replacing
    the adapter ``output_dir`` held, all at once (see :func:`adapter_folder_writer`); other things in ``output_dir``
    (e.g. training checkpoints) stay."""
    with adapter_folder_writer(output_dir) as staging:
        write_peft_folder(model, staging, language=language, base_model=base_model, adapter_name=adapter_name,
                          what=what)
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Loading and switching
# ---------------------------------------------------------------------------------------------------------------------


def _language_of(path: str) -> str | None:
    readme = Path(path) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    language = ModelCard.load(readme).data.language
    return language[0] if isinstance(language, list) and language else language


def load_language_adapters(model: nn.Module, adapters: str | os.PathLike | Sequence | Mapping,
                           is_trainable: bool = False, **kwargs):
    """Load one or several adapters onto ``model`` and return the `peft.PeftModel` (the first adapter active).

    ``adapters`` is a folder or Hub repo (adapter name ``"default"``), a list of them (named after the language in
    their model card, else ``"adapter_<i>"``) or a ``{name: folder_or_repo}`` dict. Switch with
    ``model.set_adapter(name)``; ``with model.disable_adapter():`` runs the base model."""
    from peft import PeftModel

    if isinstance(adapters, (str, os.PathLike)):
        named = {"default": str(adapters)}
    elif isinstance(adapters, Mapping):
        named = {str(k): str(v) for k, v in adapters.items()}
    else:
        named = {}
        for i, path in enumerate(adapters):
            name = _language_of(str(path)) or f"adapter_{i}"
            named[name if name not in named else f"{name}_{i}"] = str(path)
    if not named:
        raise ValueError("no adapter given")
    for name, path in named.items():
        local = Path(path).expanduser()
        if local.exists() and not (local / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{local} is not a peft adapter folder (no adapter_config.json)")
    first, *rest = named.items()
    if isinstance(model, PeftModel):
        model.load_adapter(first[1], adapter_name=first[0], is_trainable=is_trainable, **kwargs)
    else:
        model = PeftModel.from_pretrained(model, first[1], adapter_name=first[0], is_trainable=is_trainable, **kwargs)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name, is_trainable=is_trainable, **kwargs)
    model.set_adapter(first[0])
    return model
