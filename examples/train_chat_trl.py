#!/usr/bin/env python
"""Fine-tune VisCPM-Chat with TRL's `SFTTrainer` on a JSONL file of chats.

    python examples/train_chat_trl.py --model viscpm-chat-hf --data chats.jsonl --output-dir runs/sft \\
        [--max-steps 100] [--learning-rate 1e-5] [--batch-size 4] [--bf16]

Each line of the data file is `{"images": ["cat.png"], "messages": [{"role": "user", "content": "What is it?"},
{"role": "assistant", "content": "A cat."}, ...]}` (TRL's vision-language format; image paths relative to the file).
The last assistant message is the answer that is learnt; earlier turns are the history, as `chat()` lays it out.
The output folder (`save_model`) loads with `from_pretrained`, the processor saved next to it.

`viscpm.adapters.trl.VisCPMSFTTrainer` is TRL's `SFTTrainer` with VisCPM-Chat's loss and TRL's vision-language
collator set to answer-only labels (its docstring says why plain `SFTTrainer` cannot train CPM-Bee).
"""

import argparse
import sys
from pathlib import Path

from trl import SFTConfig

from viscpm.adapters.trl import VisCPMSFTTrainer


def load_chats(path: str):
    """The JSONL rows as a `datasets.Dataset`, image paths resolved against the file's folder and decoded lazily."""
    import datasets

    folder = Path(path).resolve().parent
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    if len(rows) == 0 or "messages" not in rows.column_names or "images" not in rows.column_names:
        raise ValueError(f"{path}: expected non-empty JSONL rows with 'images' and 'messages'")
    rows = rows.map(lambda row: {"images": [str(folder / image) for image in row["images"]]})
    return rows.cast_column("images", datasets.Sequence(datasets.Image()))


def main(argv=None) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a converted VisCPM-Chat folder")
    parser.add_argument("--data", required=True, help="JSONL of {'images': [path], 'messages': [...]} rows")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is available")
    args = parser.parse_args(argv)

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model)
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, bf16=args.bf16, use_cpu=args.cpu, max_length=None,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
    )
    trainer = VisCPMSFTTrainer(model, args=config, train_dataset=load_chats(args.data), processing_class=processor)
    trainer.train()
    trainer.save_model(args.output_dir)  # the model and, as the processing class, the processor
    return 0


if __name__ == "__main__":
    sys.exit(main())
