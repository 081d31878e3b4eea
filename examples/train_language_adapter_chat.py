#!/usr/bin/env python
"""Train a VisCPM-Chat language adapter (LoRA) for a new language.

    python examples/train_language_adapter_chat.py --model viscpm-chat-hf --data llava_de.jsonl \\
        --image-folder images/ --language de --output-dir adapters/viscpm-chat-de \\
        [--lora-r 16 --lora-alpha 32 --lora-dropout 0.05] [--train-query] [--train-mapping] [--text-only] \\
        [--per-device-train-batch-size 4 --gradient-accumulation-steps 8 --learning-rate 2e-4 --max-steps N] \\
        [--bf16] [--gradient-checkpointing] [--resume [CHECKPOINT] | --overwrite]

`--data` is LLaVA conversation rows (`{"image": path, "conversations": [{"from": "human", ...}, {"from": "gpt",
...}]}`) in JSON / JSONL / parquet files, a folder `datasets` can load, or a Hub dataset id; image paths are relative
to `--image-folder`. Every answer of a conversation is one example (the earlier turns are its context, as `chat()`
builds it); the loss is on the answers only. `--text-only` trains CPM-Bee alone on text rows (`text`, or
`instruction`/`input`/`output`, or image-less conversations): the MpM "multilingual alignment" stage.

The options are `AdapterArguments`, `DataArguments` (`viscpm.adapters`), the ones below and every `TrainingArguments`
field (`--help` lists them all); a JSON file holding them can stand for all of them. The adapter is written to
`--output-dir` as a standard peft folder (README.md names the base model and the language); checkpoints go to its
`checkpoints/`. A folder that is not empty needs `--resume` (continue its run) or `--overwrite` (a new run). Use it
with `VisCPMChat.from_pretrained("viscpm-chat-hf", adapter="adapters/viscpm-chat-de")`. Several GPUs: the same command
under `torchrun --nproc-per-node N` or `accelerate launch` (add `--deepspeed ds_config.json` for DeepSpeed).

Exit status: 0 on success, 1 on a data or training error (one line on stderr), 2 on a usage error, 130 on Ctrl-C.
"""

import sys
from dataclasses import dataclass, field

from viscpm import adapters


@dataclass
class ChatArguments:
    """What only Chat adapters have."""

    conversations_column: str = field(default="conversations", metadata={"help": "Column holding the conversations."})
    text_only: bool = field(default=False, metadata={"help": "Text rows, no image (the alignment stage)."})
    train_query: bool = field(default=False, metadata={"help": "Also train the query tokens (saved in the adapter)."})
    train_mapping: bool = field(default=False, metadata={"help": "Also train the mapping (saved in the adapter)."})

    def __post_init__(self):
        if self.text_only and (self.train_query or self.train_mapping):
            raise ValueError("--train-query/--train-mapping need images: not with --text-only")


def train(chat_args: ChatArguments, model_args: adapters.AdapterArguments, data_args: adapters.DataArguments,
          training_args: adapters.AdapterTrainingArguments) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    columns = {} if chat_args.text_only else {"image_column": data_args.image_column,
                                              "conversations_column": chat_args.conversations_column}
    with training_args.main_process_first(desc="preparing the data"):
        rows = adapters.load_rows(data_args.source, columns, data_args.image_folder, split=data_args.split,
                                  streaming=data_args.streaming)
        processor = AutoProcessor.from_pretrained(model_args.model)
        if chat_args.text_only:
            train_data = adapters.prepare_text_dataset(rows, processor.tokenizer, **data_args.prepare_kwargs())
        else:
            train_data = adapters.prepare_chat_dataset(
                rows, processor, image_folder=data_args.image_folder, image_column=data_args.image_column,
                conversations_column=chat_args.conversations_column, check_images=data_args.check_images,
                **data_args.prepare_kwargs())
    print(adapters.data.count_line(train_data), file=sys.stderr)

    load = {} if model_args.dtype is None else {"dtype": getattr(torch, model_args.dtype)}
    model = AutoModelForImageTextToText.from_pretrained(model_args.model, **load)
    model = adapters.add_language_adapter(model, adapters.language_adapter_config(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules, train_query=chat_args.train_query,
        train_mapping=chat_args.train_mapping))
    adapters.train_language_adapter(
        model, train_data, data_collator=adapters.ChatAdapterCollator(processor), language=model_args.language,
        base_model=model_args.base_model or model_args.model, training_args=training_args,
        resume_from_checkpoint=model_args.resume, overwrite=model_args.overwrite)


ARGUMENTS = (ChatArguments, adapters.AdapterArguments, adapters.DataArguments, adapters.AdapterTrainingArguments)
DEFAULTS = {}


def main(argv: list[str] | None = None) -> int:
    return adapters.run_training_script(train, ARGUMENTS, argv, DEFAULTS, prog="train_language_adapter_chat.py",
                                        description="Train a VisCPM-Chat language adapter (LoRA).")


if __name__ == "__main__":
    sys.exit(main())
