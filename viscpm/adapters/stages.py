"""The MpM training recipe as stage presets: what each stage trains, on which data, with which optimizer.

The paper (MpM, VisCPM) trains in stages; each preset here names one:

=================  =========================================================  ====================  ==================
stage              trains (full mode)                                          data                  optimizer, lr
=================  =========================================================  ====================  ==================
``chat-align``     Chat's vision encoder, query tokens and mapping; CPM-Bee    image-caption rows    Adam, 1e-5
                   frozen (Chat stage 1)
``chat-instruct``  every Chat weight (Chat stage 2; LoRA: CPM-Bee LoRA +       LLaVA conversations   Adam, 1e-5
                   query + mapping)                                                                  (LoRA: 2e-4)
``paint-align``    Paint's UNet cross-attention and ``trans_block`` (the       (image, caption) rows AdamW, 1e-4
                   bridge CPM-Bee -> UNet); CPM-Bee frozen
``text-align``     CPM-Bee alone (LoRA by default in the recipe)               text rows             Adam, 1e-5
                                                                                                     (LoRA: 2e-4)
=================  =========================================================  ====================  ==================

Modes: ``full`` trains everything the preset allows, ``partial`` a named subset of it (``modules``: part names such
as ``query`` / ``mapping`` / ``vision``, or module paths inside them such as ``vision_model.layers.0``), ``lora`` a
peft LoRA adapter (the Chat / CPM-Bee language adapter of :mod:`~viscpm.adapters.chat`; for ``chat-instruct`` the
query tokens and the mapping are trained in full next to it). ``chat-align`` and ``paint-align`` keep CPM-Bee frozen
and train small parts in full, so they have no LoRA mode. "Adam" is `Trainer`'s ``adamw_torch`` with no weight decay
(the same update); the recipe gives no learning rate for stage 2 and the text stage, so 1e-5 (full) and the adapters'
2e-4 (LoRA) are this package's choices.

:func:`apply_stage` freezes a model and unfreezes what a stage trains; :func:`prepare_stage` also adds LoRA and wraps
Paint for `Trainer`; :func:`prepare_stage_dataset` / :func:`stage_collator` give a stage its examples; and
:func:`train_stage` trains with `Trainer`, writing a model folder (full / partial: ``from_pretrained`` of the same
class loads it) or a peft folder (LoRA), plus ``training_stage.json``, the record that ties the folder and its
checkpoints to one stage so that a resume from another stage, or into another run's folder, is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from .chat import adapter_folder_writer, add_language_adapter, language_adapter_config, write_peft_folder
from .data import (
    CAPTION_QUESTION,
    AdapterError,
    BadDataError,
    ChatAdapterCollator,
    PaintAdapterCollator,
    is_streaming,
    load_rows,
    prepare_caption_chat_dataset,
    prepare_chat_dataset,
    prepare_paint_dataset,
    prepare_text_dataset,
    row_columns,
)
from .paint import PaintAdapterModel
from .trainer import AdapterArguments, _require, _train, _training_args, check_output_dir, fsdp_requested, seed_run

logger = logging.getLogger(__name__)

STAGE_RECORD = "training_stage.json"
"""The file in a stage's output folder (and in each of its checkpoints) that says which stage, mode and parts the
run trains, and which entries its final output consists of."""
MODES = ("full", "partial", "lora")


@dataclass(frozen=True)
class StagePreset:
    """One stage of the recipe: the model it takes, the parts it trains, its data and its optimizer defaults."""

    name: str
    model: Literal["chat", "paint", "text"]
    parts: tuple[str, ...]
    data: Literal["captions", "conversations", "paint", "text"]
    learning_rate: float
    optim: str = "adamw_torch"
    weight_decay: float = 0.0
    lora_parts: tuple[str, ...] | None = None
    """Parts trained in full next to a LoRA adapter (``None``: the stage has no LoRA mode)."""
    lora_learning_rate: float = 2e-4
    description: str = ""

    def defaults(self, mode: str = "full") -> dict:
        """The `TrainingArguments` values the recipe gives this stage in ``mode``."""
        lr = self.lora_learning_rate if mode == "lora" else self.learning_rate
        return {"learning_rate": lr, "optim": self.optim, "weight_decay": self.weight_decay}


STAGES: dict[str, StagePreset] = {
    preset.name: preset for preset in (
        StagePreset("chat-align", "chat", ("vision", "query", "mapping"), "captions", 1e-5,
                    description="Chat stage 1: vision encoder + query tokens + mapping on English image-caption "
                                "pairs, CPM-Bee frozen"),
        StagePreset("chat-instruct", "chat", ("vision", "query", "mapping", "llm"), "conversations", 1e-5,
                    lora_parts=("query", "mapping"),
                    description="Chat stage 2: every weight (or LoRA) on instruction conversations"),
        StagePreset("paint-align", "paint", ("trans_block", "cross_attention"), "paint", 1e-4, weight_decay=1e-2,
                    description="Paint: the UNet's cross-attention and trans_block on image-caption pairs, CPM-Bee "
                                "frozen"),
        StagePreset("text-align", "text", ("llm",), "text", 1e-5, lora_parts=(),
                    description="Text alignment: CPM-Bee alone on text rows"),
    )
}
"""The presets by name (see the module docstring for the table)."""

DATA_FORMATS = {
    "captions": 'image-caption rows ({"image": ..., "caption": ...})',
    "conversations": 'LLaVA conversation rows ({"image": ..., "conversations": [...]})',
    "paint": 'image-caption rows ({"image": ..., "caption": ...})',
    "text": "text rows (text, instruction/input/output, or image-less conversations)",
}


def get_stage(stage: str | StagePreset) -> StagePreset:
    """The preset named ``stage`` (an `AdapterError` listing the presets for an unknown name)."""
    if isinstance(stage, StagePreset):
        return stage
    if stage not in STAGES:
        raise AdapterError(f"unknown stage {stage!r}: pick one of {', '.join(STAGES)}")
    return STAGES[stage]


# ---------------------------------------------------------------------------------------------------------------------
# Parts and trainable sets
# ---------------------------------------------------------------------------------------------------------------------


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency of the adapters
        return False
    return isinstance(model, PeftModel)


def _model_kind(model) -> str:
    """``chat`` (VisCPM-Chat), ``cpmbee`` (CPM-Bee alone) or ``paint`` (a Paint pipeline or its training model)."""
    from ..modeling.modeling_cpmbee import CpmBeeForCausalLM
    from ..modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

    base = model.get_base_model() if _is_peft(model) else model
    if isinstance(base, VisCPMChatForConditionalGeneration):
        return "chat"
    if isinstance(base, CpmBeeForCausalLM):
        return "cpmbee"
    if hasattr(base, "text_encoder") and hasattr(base, "unet"):
        return "paint"
    raise AdapterError(f"cannot train a {type(base).__name__} in stages: give a VisCPMChatForConditionalGeneration, "
                       "a CpmBeeForCausalLM or a VisCPMPaintPipeline")


def _named_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """Every parameter under its training name (a Paint pipeline's as ``text_encoder.*`` / ``unet.*`` / ``vae.*``)."""
    if isinstance(model, nn.Module):
        return list(model.named_parameters())
    parts = [part for part in ("text_encoder", "unet", "vae") if getattr(model, part, None) is not None]
    return [(f"{part}.{name}", param) for part in parts for name, param in getattr(model, part).named_parameters()]


def model_parts(model) -> dict[str, list[str]]:
    """The parameter names of each trainable part of ``model``: Chat ``vision`` / ``query`` / ``mapping`` / ``llm``;
    CPM-Bee ``llm``; Paint ``trans_block`` (the text encoder's projection + layer norm) / ``cross_attention`` (the
    UNet's ``attn2``) / ``llm`` / ``unet`` (the rest of it). Weights a forward pass never uses (Chat's last vision
    layer's image outputs) belong to no part."""
    kind = _model_kind(model)
    names = [name for name, _ in _named_parameters(model)]
    parts: dict[str, list[str]] = {}

    def add(part, keep):
        parts[part] = [name for name in names if keep(name)]

    if kind == "chat":
        unused = {id(p) for p in model.vision_model.unused_without_image_outputs()}
        used = {name for name, p in model.named_parameters() if id(p) not in unused}
        add("vision", lambda n: n.startswith("vision_model.") and n in used)
        add("query", lambda n: n == "query")
        add("mapping", lambda n: n.startswith("mapping."))
        add("llm", lambda n: n.startswith("language_model."))
    elif kind == "cpmbee":
        add("llm", lambda n: True)
    else:
        add("trans_block", lambda n: n.startswith(("text_encoder.projection.", "text_encoder.layer_norm.")))
        add("cross_attention", lambda n: n.startswith("unet.") and ".attn2." in n)
        add("llm", lambda n: n.startswith("text_encoder.model."))
        add("unet", lambda n: n.startswith("unet.") and ".attn2." not in n)
    return parts


def _check_model_for(preset: StagePreset, model) -> str:
    kind = _model_kind(model)
    wanted = {"chat": ("chat",), "paint": ("paint",), "text": ("chat", "cpmbee")}[preset.model]
    if kind not in wanted:
        takes = {"chat": "a VisCPMChatForConditionalGeneration", "paint": "a VisCPMPaintPipeline",
                 "text": "a VisCPMChatForConditionalGeneration or a CpmBeeForCausalLM"}[preset.model]
        raise AdapterError(f"{preset.name} trains {takes}, not a {kind} model: pick the stage for this model")
    return kind


def _selected(preset: StagePreset, parts: dict[str, list[str]], mode: str, modules: Sequence[str] | None) -> list[str]:
    """The parameter names ``mode`` / ``modules`` select within what ``preset`` trains."""
    allowed = {name for part in preset.parts for name in parts.get(part, ())}
    if mode == "full":
        if modules:
            raise ValueError(f"mode='full' trains all of {preset.name} ({', '.join(preset.parts)}); name a subset "
                             "with mode='partial'")
        chosen = sorted(allowed)
    else:
        if not modules:
            raise AdapterError(f"mode='partial' trains the parts named in modules, and none were given: name some of "
                               f"{', '.join(preset.parts)} (or module paths inside them)")
        chosen = set()
        for module in modules:
            if module in parts:
                names = set(parts[module])
            else:
                prefix = module.rstrip(".")
                names = {name for part in parts.values() for name in part
                         if name == prefix or name.startswith(prefix + ".")}
            if not names:
                raise AdapterError(f"{preset.name}: {module!r} names no weight of this model; name one of "
                                   f"{', '.join(preset.parts)} or a module path inside them")
            outside = sorted(names - allowed)
            if outside:
                raise AdapterError(f"{preset.name} keeps {module!r} frozen (e.g. {outside[0]}): it trains "
                                   f"{', '.join(preset.parts)} only; pick another stage to train it")
            chosen |= names
        chosen = sorted(chosen)
    if not chosen:
        raise AdapterError(f"{preset.name} ({mode}) would train nothing: this model has no weight in "
                           f"{', '.join(preset.parts)}")
    return chosen


def _base(model):
    return model.get_base_model() if _is_peft(model) else model


def apply_stage(model, stage: str, mode: str = "full", modules: list[str] | None = None) -> list[str]:
    """Freeze ``model`` and unfreeze what ``stage`` trains; return the names of the trainable parameters.

    ``model`` is a `VisCPMChatForConditionalGeneration`, a `CpmBeeForCausalLM` or a `VisCPMPaintPipeline` (names
    then ``text_encoder.*`` / ``unet.*``, as in :class:`PaintStageModel`). ``mode="full"`` trains every part of the
    preset (``chat-align``: the vision encoder, the query tokens and the mapping, the whole language model frozen);
    ``"partial"`` the ``modules`` named (parts or module paths inside the preset's parts); ``"lora"`` needs the
    `PeftModel` that :func:`prepare_stage` builds (its trainable set is returned as it is). A preset that would train
    nothing, a module it keeps frozen and a model it does not take are an `AdapterError` that says so.
    """
    preset = get_stage(stage)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    kind = _check_model_for(preset, model)
    if mode == "lora":
        if preset.lora_parts is None:
            raise AdapterError(f"{preset.name} has no LoRA mode: it trains {', '.join(preset.parts)} in full with "
                               "CPM-Bee frozen; use mode='full' or 'partial'")
        if not _is_peft(model):
            raise AdapterError("mode='lora' wraps the model in a peft PeftModel: use prepare_stage() or "
                               "train_stage(), which return it")
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise AdapterError(f"{preset.name} (lora) would train nothing: the PeftModel has no trainable adapter")
        return trainable
    if _is_peft(model):
        raise AdapterError(f"mode={mode!r} trains the base model's own weights, and this is a PeftModel: pass the base "
                           "model (or merge_and_unload() the adapter first)")
    chosen = _selected(preset, model_parts(model), mode, modules)
    keep = set(chosen)
    for name, param in _named_parameters(model):
        param.requires_grad_(name in keep)
    logger.info("%s (%s) on a %s model: %d parameter tensors trainable", preset.name, mode, kind, len(chosen))
    return chosen


class PaintStageModel(PaintAdapterModel):
    """What `Trainer` trains for a Paint stage: the Paint objective of :class:`PaintAdapterModel` over a pipeline's
    own parts, trained in place. Its state (checkpoints, resuming) is the trainable weights only, so the frozen
    CPM-Bee and VAE are not copied into every checkpoint; ``pipeline`` is the pipeline the final folder is saved
    from."""

    def __init__(self, pipeline):
        from diffusers import DDPMScheduler

        super().__init__(pipeline.text_encoder, pipeline.unet, pipeline.vae,
                         DDPMScheduler.from_config(pipeline.scheduler.config))  # the original trains with DDPM noising
        self.pipeline = pipeline

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        state = nn.Module.state_dict(self, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + name for name, param in self.named_parameters() if param.requires_grad}
        for key in [key for key in state if key.startswith(prefix) and key not in keep]:
            del state[key]
        return state


def prepare_stage(model, stage: str, mode: str = "full", modules: list[str] | None = None, lora_config=None,
                  **lora_kwargs):
    """``(training model, trainable names)`` for ``stage``: :func:`apply_stage` for full / partial training (a Paint
    pipeline comes back as its :class:`PaintStageModel`); for ``mode="lora"`` the model wrapped in a `PeftModel`
    with a language adapter (``lora_config``: a peft config, or a dict of
    :func:`~viscpm.adapters.chat.language_adapter_config` options, as ``lora_kwargs`` are), the preset's
    ``lora_parts`` (or ``modules``, a subset of them) trained in full next to it."""
    preset = get_stage(stage)
    if isinstance(model, PaintAdapterModel) and not isinstance(model, PaintStageModel):
        raise AdapterError("this is a Paint language adapter model (train it with train_paint_adapter): stages take "
                           "the VisCPMPaintPipeline itself")
    if isinstance(lora_config, dict):
        lora_config, lora_kwargs = None, {**lora_config, **lora_kwargs}
    if mode == "lora" and preset.lora_parts is not None and not _is_peft(model):
        _check_model_for(preset, model)
        extra = preset.lora_parts if modules is None else tuple(modules)
        unknown = sorted(set(extra) - set(preset.lora_parts))
        if unknown:
            raise AdapterError(f"{preset.name} (lora) trains only {list(preset.lora_parts) or 'no part'} in full next "
                               f"to the adapter, not {unknown}")
        if _model_kind(model) != "chat":
            extra = ()
        if lora_config is None:
            lora_config = language_adapter_config(train_query="query" in extra, train_mapping="mapping" in extra,
                                                  **lora_kwargs)
        model = add_language_adapter(model, lora_config)
    names = apply_stage(model, preset.name, mode, None if mode == "lora" else modules)
    if _model_kind(model) == "paint" and not isinstance(model, PaintAdapterModel):
        model = PaintStageModel(model)
    return model, names


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def prepare_stage_dataset(stage: str, rows, processor, image_folder: str | os.PathLike | None = None,
                          image_column: str = "image", caption_column: str = "caption",
                          conversations_column: str = "conversations", question: str = CAPTION_QUESTION,
                          check_images: bool = True, **prepare_kwargs):
    """The training examples of ``stage`` from raw ``rows`` (anything :func:`~viscpm.adapters.data.load_rows` reads):
    ``chat-align`` image-caption rows (:func:`prepare_caption_chat_dataset`, the caption answers ``question``),
    ``chat-instruct`` LLaVA conversations, ``paint-align`` (image, caption) rows, ``text-align`` text rows.
    ``processor`` is the Chat processor (Paint: the pipeline's tokenizer; text: a tokenizer or Chat processor).
    Rows of another stage's format are a `BadDataError` that names the stage they fit."""
    preset = get_stage(stage)
    rows = load_rows(rows, what=preset.name)
    columns = set(row_columns(rows))
    has_captions, has_conversations = caption_column in columns, conversations_column in columns
    expected = DATA_FORMATS[preset.data]
    if preset.data in ("captions", "paint") and not has_captions:
        hint = (": these are LLaVA conversations, which chat-instruct takes" if has_conversations else
                f" (name it with caption_column / --caption-column; the rows have {sorted(columns)})")
        raise BadDataError(f"{preset.name} takes {expected}; the rows have no {caption_column!r} column{hint}")
    if preset.data == "conversations" and not has_conversations:
        hint = (": image-caption rows are for chat-align (Chat stage 1)" if has_captions else
                f" (name it with conversations_column / --conversations-column; the rows have {sorted(columns)})")
        raise BadDataError(f"{preset.name} takes {expected}; the rows have no {conversations_column!r} column{hint}")
    if preset.data == "text" and image_column in columns and (has_captions or has_conversations):
        raise BadDataError(f"text-align trains CPM-Bee on text alone, and these rows have images ({image_column!r}): "
                           "use chat-align / chat-instruct / paint-align for them, or drop the image column")
    tokenizer = getattr(processor, "tokenizer", processor)
    images = dict(image_folder=image_folder, image_column=image_column, check_images=check_images)
    if preset.data == "captions":
        return prepare_caption_chat_dataset(rows, processor, caption_column=caption_column, question=question,
                                            **images, **prepare_kwargs)
    if preset.data == "conversations":
        return prepare_chat_dataset(rows, processor, conversations_column=conversations_column, **images,
                                    **prepare_kwargs)
    if preset.data == "paint":
        return prepare_paint_dataset(rows, tokenizer, caption_column=caption_column, **images, **prepare_kwargs)
    return prepare_text_dataset(rows, tokenizer, **prepare_kwargs)


def stage_collator(stage: str, processor, resolution: int = 512, random_flip: bool = False):
    """The collator of ``stage``'s examples: :class:`ChatAdapterCollator` (Chat, text), :class:`PaintAdapterCollator`
    (Paint: ``processor`` is the tokenizer; images centre-cropped to ``resolution``)."""
    preset = get_stage(stage)
    if preset.model == "paint":
        return PaintAdapterCollator(getattr(processor, "tokenizer", processor), resolution, random_flip)
    return ChatAdapterCollator(processor)


def _check_examples(preset: StagePreset, dataset) -> None:
    """Refuse raw rows, an empty dataset, or examples of another stage's layout, before anything is trained."""
    if dataset is None or (not is_streaming(dataset) and len(dataset) == 0):  # a stream: checked when prepared
        raise BadDataError(f"no {preset.name} training examples: the dataset is empty")
    columns = set(getattr(dataset, "column_names", None) or ())
    if "input_ids" not in columns:
        raise BadDataError(f"{preset.name} trains on prepared examples, and the dataset has columns "
                           f"{sorted(columns)}: prepare {DATA_FORMATS[preset.data]} with prepare_stage_dataset()")
    image, labels = "image_start" in columns, "labels" in columns
    fits = {"captions": image and labels, "conversations": image and labels, "text": labels and not image,
            "paint": not labels and ("image_path" in columns or "image_bytes" in columns)}[preset.data]
    if not fits:
        kind = "Paint caption" if not labels else "Chat image" if image else "text-only"
        raise BadDataError(f"{preset.name} takes examples of {DATA_FORMATS[preset.data]}, and these are "
                           f"{kind} examples: prepare the right rows with prepare_stage_dataset({preset.name!r}, ...)")


# ---------------------------------------------------------------------------------------------------------------------
# The output folder's record
# ---------------------------------------------------------------------------------------------------------------------


def read_stage_record(folder: str | os.PathLike) -> dict | None:
    """The ``training_stage.json`` of an output folder or checkpoint, or None when there is none."""
    path = Path(folder).expanduser() / STAGE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"{path} is corrupt ({error}): give another --output-dir") from None
    if not isinstance(record, dict) or "stage" not in record:
        raise AdapterError(f"{path} is not a stage record: give another --output-dir")
    return record


def _same_run(record: dict, wanted: dict) -> bool:
    return all(record.get(key) == wanted[key] for key in ("stage", "mode", "modules"))


def _describe(record: dict) -> str:
    modules = f" {record['modules']}" if record.get("modules") else ""
    return f"{record.get('stage')} ({record.get('mode')}{modules})"


def _write_record(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{STAGE_RECORD}.tmp"
    temporary.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, folder / STAGE_RECORD)


def check_stage_output(output_dir: str | os.PathLike, wanted: dict, resume: str | bool | None = None,
                       overwrite: bool = False) -> tuple[str | None, list[str]]:
    """Check ``output_dir`` against the run ``wanted`` (``{"stage", "mode", "modules"}``), changing nothing.

    On top of :func:`~viscpm.adapters.trainer.check_output_dir`'s rules: a resume continues a run of the same stage,
    mode and parts only (the checkpoint's record says which); ``overwrite`` replaces only a run of the same stage
    (another stage's result, which may be the model this run starts from, is never replaced). Returns ``(checkpoint
    to resume or None, the old run's output entries)``."""
    output_dir = Path(output_dir).expanduser()
    record = read_stage_record(output_dir) if output_dir.is_dir() else None
    old_outputs = list(record.get("outputs", ())) if record else []
    if record and (resume or overwrite) and not (_same_run(record, wanted) if resume else
                                                 record["stage"] == wanted["stage"]):
        raise AdapterError(f"{output_dir} holds a {_describe(record)} run, not {_describe(wanted)}: "
                           + ("resume a run with its own stage and settings, or " if resume else "")
                           + "give another --output-dir (nothing was changed)")
    owned = [*old_outputs, STAGE_RECORD] if record else []
    checkpoint = check_output_dir(output_dir, resume, overwrite, owned)
    if checkpoint:
        saved = read_stage_record(checkpoint)
        if saved is None:
            raise AdapterError(f"{checkpoint} is not a checkpoint of a stage run (no {STAGE_RECORD}): resume it with "
                               "the function that wrote it, or start a new run")
        if not _same_run(saved, wanted):
            raise AdapterError(f"{checkpoint} is a checkpoint of a {_describe(saved)} run, not {_describe(wanted)}: "
                               "resume with the same stage and settings, or start a new run in another --output-dir")
    return checkpoint, old_outputs


class StageRecordCallback(TrainerCallback):
    """Writes the run's ``training_stage.json`` into ``output_dir`` when a new run begins (after every process has
    checked the folder: DDP has synchronised them by then) and into every checkpoint, so that a resume can tell which
    run it was."""

    def __init__(self, record: dict, output_dir: Path | None = None):
        self.record, self.output_dir = record, output_dir

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save and self.output_dir is not None:
            _write_record(self.output_dir, self.record)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            _write_record(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.record)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def train_stage(
    model,
    train_dataset,
    stage: str,
    output_dir: str | os.PathLike | None = None,
    mode: str = "full",
    modules: list[str] | None = None,
    data_collator: Callable | None = None,
    processor=None,
    lora_config=None,
    language: str | None = None,
    base_model: str | None = None,
    training_args: TrainingArguments | None = None,
    resume_from_checkpoint: str | bool | None = None,
    overwrite: bool = False,
    callbacks: list | None = None,
    **training_overrides,
):
    """Train one stage of the MpM recipe with `Trainer` and write the result to ``output_dir``.

    ``model``: a Chat / CPM-Bee model or a `VisCPMPaintPipeline` (base weights: :func:`prepare_stage` sets what is
    trained). ``train_dataset``: :func:`prepare_stage_dataset`'s examples for the stage; ``data_collator`` defaults
    to :func:`stage_collator` of ``processor``. ``training_args`` (an `AdapterTrainingArguments`) or ``output_dir``
    plus `TrainingArguments` overrides on top of the stage's defaults (:meth:`StagePreset.defaults`).

    The output folder follows :func:`~viscpm.adapters.trainer.check_output_dir` and :func:`check_stage_output`:
    checkpoints in ``checkpoints/``, resume from the run's last checkpoint (``resume_from_checkpoint=True``) or a
    given one, the result written by the main process all at once, only if every trained weight stayed finite. Full /
    partial: a model folder (``save_pretrained``, safetensors; Paint: the whole pipeline) with ``processor`` saved in
    it when given; LoRA: a peft folder. ``training_stage.json`` records the run. Returns ``(trained model,
    train_output)``.
    """
    preset = get_stage(stage)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check_examples(preset, train_dataset)
    wanted = {"stage": preset.name, "mode": mode, "modules": sorted(modules) if modules else None}
    if training_args is None:
        training_overrides = {**preset.defaults(mode), **training_overrides}
    args = _training_args(output_dir, training_args, training_overrides)
    _check_engines(preset, mode, args)
    output = Path(args.output_dir).expanduser()
    _refuse_own_source(model, output)
    checkpoint, old_outputs = check_stage_output(output, wanted, resume_from_checkpoint, overwrite)
    if _is_peft(model) and mode != "lora":
        raise AdapterError(f"mode={mode!r} trains the base model's own weights, and this is a PeftModel: pass the "
                           "base model, or mode='lora'")
    pipeline = model if _model_kind(model) == "paint" and not isinstance(model, nn.Module) else None
    seed_run(args)  # before the LoRA weights are drawn: --seed makes them the same in every run and process
    model, names = prepare_stage(model, preset.name, mode, modules, lora_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("%s (%s): training %d of %d parameters (%.3f%%)", preset.name, mode, trainable, total,
                100 * trainable / max(total, 1))
    if data_collator is None:
        _require(processor is not None, "give data_collator, or processor to build the stage's collator")
        data_collator = stage_collator(preset.name, processor)
    record = {**wanted, "trainable_parameters": trainable, "outputs": []}
    def save(folder: Path):
        with adapter_folder_writer(folder) as staging:
            if mode == "lora":
                write_peft_folder(model, staging, language=language, base_model=base_model,
                                  what=f"VisCPM {preset.name}")
            elif isinstance(model, PaintStageModel):
                (pipeline or model.pipeline).save_pretrained(staging, safe_serialization=True)
            else:
                model.save_pretrained(staging)
                if processor is not None:
                    processor.save_pretrained(staging)
            outputs = sorted({*(path.name for path in staging.iterdir()), STAGE_RECORD})
            _write_record(staging, {**record, "outputs": outputs})
        for stale in sorted(set(old_outputs) - set(outputs) - {STAGE_RECORD}):  # the old run's leftovers
            path = folder / stale
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif os.path.lexists(path):
                path.unlink()

    owned = [*old_outputs, STAGE_RECORD] if old_outputs or (output / STAGE_RECORD).is_file() else []
    recorder = StageRecordCallback(record, None if checkpoint else output)  # a resumed run keeps its record
    return _train(model, train_dataset, save, args, checkpoint, overwrite, owned=owned, data_collator=data_collator,
                  callbacks=[recorder, *(callbacks or [])])


def _check_engines(preset: StagePreset, mode: str, args: TrainingArguments) -> None:
    """The final folder is saved from the unsharded model: refuse the engines that shard it."""
    if preset.model == "paint" and (args.deepspeed or fsdp_requested(args)):
        raise AdapterError("Paint stages train on one device or under torchrun (DDP): drop --deepspeed / --fsdp")
    if mode != "lora" and fsdp_requested(args):
        raise AdapterError(f"{preset.name} ({mode}) saves the unsharded model: run it under torchrun (DDP) or "
                           "DeepSpeed ZeRO-1/2, not FSDP")
    if mode != "lora" and args.deepspeed:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise AdapterError(f"{preset.name} ({mode}) saves the unsharded model: use DeepSpeed ZeRO-1/2, not ZeRO-3")


def _refuse_own_source(model, output: Path) -> None:
    """A run never writes into the folder its model was loaded from."""
    base = _base(model)
    source = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(base, "name_or_path", None)
    if not source and hasattr(base, "text_encoder"):
        source = getattr(base.text_encoder.config, "_name_or_path", None)
        source = str(Path(source).parent) if source else None
    if source and Path(source).expanduser().exists() and Path(source).expanduser().resolve() == output.resolve():
        raise AdapterError(f"--output-dir {output} is the folder the model was loaded from: give another --output-dir")


# ---------------------------------------------------------------------------------------------------------------------
# The training script's arguments
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class StageModelArguments(AdapterArguments):
    """:class:`~viscpm.adapters.trainer.AdapterArguments` for a stage: ``--language`` is optional (a LoRA folder's
    model card names it when given)."""

    language: str | None = field(default=None, metadata={"help": "Language code for a LoRA folder's model card."})


@dataclass
class StageArguments:
    """Which stage, how much of it, and the stage's data columns."""

    stage: str = field(metadata={"help": f"The recipe's stage: one of {', '.join(STAGES)}."})
    mode: str = field(default="full", metadata={"help": "full, partial (with --modules) or lora."})
    modules: list[str] | None = field(default=None, metadata={
        "help": "mode=partial: the parts to train (e.g. query mapping) or module paths inside them."})
    caption_column: str = field(default="caption", metadata={"help": "Column holding the captions."})
    conversations_column: str = field(default="conversations", metadata={"help": "Column holding conversations."})
    question: str = field(default=CAPTION_QUESTION, metadata={"help": "chat-align: the question each caption "
                                                                        "answers."})
    resolution: int = field(default=512, metadata={"help": "paint-align: image side (pixels) to train at."})
    text_feature_cache: str | None = field(default=None, metadata={
        "help": "paint-align: a folder for CPM-Bee's text features, computed once (built on the first run, reused "
                "while model and data match, rebuilt when they change); training then never runs CPM-Bee."})

    def wanted(self) -> dict:
        """The run these arguments ask for, as :func:`check_stage_output` takes it."""
        return {"stage": self.stage, "mode": self.mode, "modules": sorted(self.modules) if self.modules else None}

    def __post_init__(self):
        _require(self.stage in STAGES, f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        _require(self.mode in MODES, f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _require(self.mode == "partial" or not self.modules or self.mode == "lora",
                 "--modules goes with --mode partial (or lora: the parts trained in full next to the adapter)")
        _require(self.mode != "partial" or bool(self.modules), "--mode partial needs --modules")
        _require(self.resolution >= 8, f"--resolution must be at least 8, got {self.resolution}")
        _require(self.text_feature_cache is None or (self.stage == "paint-align" and self.mode != "lora"),
                 "--text-feature-cache stands for a frozen CPM-Bee: it goes with --stage paint-align (mode full or "
                 "partial)")


def stage_defaults(argv: Sequence[str]) -> dict:
    """The recipe's `TrainingArguments` defaults for the ``--stage`` / ``--mode`` in ``argv`` (or in the JSON file
    that is its only argument), for :func:`~viscpm.adapters.trainer.run_training_script`; {} when unknown."""
    values: dict = {}
    if len(argv) == 1 and str(argv[0]).endswith(".json"):
        try:
            values = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        values = values if isinstance(values, dict) else {}
    else:
        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        parser.add_argument("--stage")
        parser.add_argument("--mode")
        known, _ = parser.parse_known_args(list(argv))
        values = {key: value for key, value in vars(known).items() if value is not None}
    preset = STAGES.get(values.get("stage"))
    return preset.defaults(values.get("mode", "full")) if preset else {}


__all__ = [
    "DATA_FORMATS",
    "MODES",
    "STAGES",
    "STAGE_RECORD",
    "PaintStageModel",
    "StageArguments",
    "StageModelArguments",
    "StagePreset",
    "apply_stage",
    "check_stage_output",
    "get_stage",
    "model_parts",
    "prepare_stage",
    "prepare_stage_dataset",
    "read_stage_record",
    "stage_collator",
    "stage_defaults",
    "train_stage",
]
