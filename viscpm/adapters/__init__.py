"""Language adapters: LoRA fine-tuning of VisCPM for a new language with `peft`, `datasets` and `Trainer`.

The MpM recipe: the visual skills are learnt in one language, and a little data in a new language aligns the
answers' language. Here that is a small LoRA adapter per language on CPM-Bee's projections (optionally with the
query tokens and the mapping trained in full), saved as a standard peft folder (``adapter_config.json`` +
``adapter_model.safetensors`` + a model card naming the base model and the language) and switched at run time.

Chat::

    data = load_conversations("llava_de.jsonl")                              # LLaVA conversation rows
    processor = AutoProcessor.from_pretrained("viscpm-chat-hf")
    train = prepare_chat_dataset(data, processor, image_folder="images/")   # one example per answer turn
    model = AutoModelForImageTextToText.from_pretrained("viscpm-chat-hf")
    train_language_adapter(model, train, "adapter-de", language="de", data_collator=ChatAdapterCollator(processor))

Text only (the "multilingual alignment" stage, no image): :func:`prepare_text_dataset` instead. Paint:
:func:`prepare_paint_dataset`, :func:`add_paint_adapter`, :func:`train_paint_adapter`. Loading:
:func:`load_language_adapters`, or ``VisCPMChat.from_pretrained(base, adapter=path)``.

The modules: ``data`` (rows, prompts, the one preparation path, collators), ``chat`` (Chat / CPM-Bee adapters:
config, add, save, load), ``paint`` (Paint adapters), ``trainer`` (arguments, the output folder's rules, the train
functions and what the training scripts share) and ``stages`` (the MpM recipe's stages as presets: what each trains,
on which data, :func:`apply_stage`, :func:`train_stage`); ``trl`` (TRL's ``SFTTrainer`` for VisCPM-Chat, with
the ``train`` extra; not imported here). Large data: ``load_rows(..., streaming=True)``, and Paint's text-feature
cache (:func:`text_feature_cache`).
"""

from .chat import (
    ADAPTER_ENTRIES,
    LORA_TARGET_MODULES,
    MAPPING_MODULES,
    QUERY_MODULE,
    adapter_folder_writer,
    add_language_adapter,
    language_adapter_config,
    load_language_adapters,
    lora_target_pattern,
    save_language_adapter,
)
from .data import (
    ASSISTANT_ROLES,
    HUMAN_ROLES,
    CAPTION_QUESTION,
    AdapterError,
    BadDataError,
    ChatAdapterCollator,
    PaintAdapterCollator,
    chat_training_prompt,
    collate_text_features,
    conversation_turns,
    is_streaming,
    load_conversations,
    load_rows,
    paint_caption_prompt,
    prepare_caption_chat_dataset,
    prepare_chat_dataset,
    prepare_examples,
    prepare_paint_dataset,
    prepare_text_dataset,
    text_training_prompt,
)
from .paint import (
    UNET_CROSS_ATTENTION_TARGETS,
    PaintAdapterModel,
    TextFeatureCache,
    add_paint_adapter,
    cache_text_features,
    load_paint_adapter,
    load_text_features,
    save_paint_adapter,
    text_feature_cache,
)
from .stages import (
    STAGE_RECORD,
    STAGES,
    PaintStageModel,
    StagePreset,
    apply_stage,
    prepare_stage,
    prepare_stage_dataset,
    stage_collator,
    train_stage,
)
from .trainer import (
    AdapterArguments,
    AdapterTrainingArguments,
    DataArguments,
    PaintCheckpointCallback,
    adapter_argument_parser,
    check_output_dir,
    run_training_script,
    train_language_adapter,
    train_paint_adapter,
)

__all__ = [
    "ADAPTER_ENTRIES",
    "ASSISTANT_ROLES",
    "AdapterArguments",
    "AdapterError",
    "AdapterTrainingArguments",
    "BadDataError",
    "CAPTION_QUESTION",
    "ChatAdapterCollator",
    "DataArguments",
    "HUMAN_ROLES",
    "LORA_TARGET_MODULES",
    "MAPPING_MODULES",
    "PaintAdapterCollator",
    "PaintAdapterModel",
    "PaintCheckpointCallback",
    "PaintStageModel",
    "QUERY_MODULE",
    "STAGES",
    "STAGE_RECORD",
    "StagePreset",
    "TextFeatureCache",
    "UNET_CROSS_ATTENTION_TARGETS",
    "adapter_argument_parser",
    "adapter_folder_writer",
    "apply_stage",
    "cache_text_features",
    "add_language_adapter",
    "add_paint_adapter",
    "chat_training_prompt",
    "check_output_dir",
    "collate_text_features",
    "conversation_turns",
    "is_streaming",
    "language_adapter_config",
    "load_conversations",
    "load_language_adapters",
    "load_paint_adapter",
    "load_rows",
    "load_text_features",
    "lora_target_pattern",
    "paint_caption_prompt",
    "prepare_caption_chat_dataset",
    "prepare_chat_dataset",
    "prepare_examples",
    "prepare_paint_dataset",
    "prepare_stage",
    "prepare_stage_dataset",
    "prepare_text_dataset",
    "run_training_script",
    "save_language_adapter",
    "save_paint_adapter",
    "stage_collator",
    "text_feature_cache",
    "text_training_prompt",
    "train_language_adapter",
    "train_paint_adapter",
    "train_stage",
]
