#!/usr/bin/env python
"""Train a VisCPM-Chat language adapter (LoRA) for a new language.

    python examples/train_language_adapter_chat.py --model viscpm-chat-hf --data llava_de.jsonl \\
        --image-folder images/ --language de --output-dir adapters/viscpm-chat-de \\
        [--base-model openbmb/VisCPM-Chat] [--r 16 --alpha 32 --dropout 0.05] [--train-query] [--train-mapping] \\
        [--batch-size 4 --grad-accum 8 --lr 2e-4 --epochs 1 | --max-steps N] [--bf16 | --fp16] \\
        [--gradient-checkpointing] [--save-steps 500] [--resume [CHECKPOINT]] [--text-only]

`--data` is LLaVA conversation rows (`{"image": path, "conversations": [{"from": "human", ...}, {"from": "gpt",
...}]}`) in JSON / JSONL / parquet files, a folder `datasets` can load, or a Hub dataset id; image paths are relative
to `--image-folder`. Every answer of a conversation is one example (the earlier turns are its context, as `chat()`
builds it); the loss is on the answers only. `--text-only` trains CPM-Bee alone on text rows (`text`, or
`instruction`/`input`/`output`, or image-less conversations): the MpM "multilingual alignment" stage.

The adapter is written to `--output-dir` as a standard peft folder (adapter_config.json, adapter_model.safetensors,
README.md naming the base model and the language); Trainer checkpoints go to `--output-dir/checkpoints`. Use it with
`VisCPMChat.from_pretrained("viscpm-chat-hf", adapter="adapters/viscpm-chat-de")`. Several GPUs: run the same command
under `accelerate launch` or `torchrun` (add `--deepspeed ds_config.json` for DeepSpeed).

Exit status: 0 on success, 1 on a data or training error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a VisCPM-Chat language adapter (LoRA) with peft + Trainer.")
    parser.add_argument("--model", required=True, help="converted VisCPM-Chat folder or Hub repo")
    parser.add_argument("--data", required=True, nargs="+", help="data files, a folder, or a Hub dataset id")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--image-folder", help="folder the images' relative paths start from")
    parser.add_argument("--output-dir", required=True, help="where the adapter (and checkpoints/) go")
    parser.add_argument("--language", required=True, help="language code of the adapter, e.g. de (model card)")
    parser.add_argument("--base-model", help="base model id for the model card (default: --model)")
    parser.add_argument("--text-only", action="store_true", help="text rows, no image (alignment stage)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=int, default=32, help="LoRA alpha (default 32)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="CPM-Bee projections to adapt (default: q_proj k_proj v_proj o_proj gate_proj up_proj "
                             "down_proj)")
    parser.add_argument("--train-query", action="store_true", help="also train the query tokens (saved in the adapter)")
    parser.add_argument("--train-mapping", action="store_true", help="also train the mapping (saved in the adapter)")
    parser.add_argument("--max-length", type=int, default=2048, help="skip examples longer than this (tokens)")
    parser.add_argument("--on-bad-rows", choices=["skip", "raise"], default="skip",
                        help="bad rows (missing/corrupt image, empty conversation): skip with a count, or stop")
    parser.add_argument("--no-check-images", action="store_true", help="do not open every image before training")
    parser.add_argument("--num-proc", type=int, help="processes for data preparation")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the base weights (default: as saved; bfloat16 with --bf16 saves memory)")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch size")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs (ignored with --max-steps)")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    parser.add_argument("--logging-steps", type=int, default=10)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    precision.add_argument("--fp16", action="store_true", help="float16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="resume from the last checkpoint in --output-dir/checkpoints, or from the one given")
    parser.add_argument("--deepspeed", help="DeepSpeed config JSON (run under deepspeed/accelerate launch)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (tiny models, tests)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("r", "alpha", "batch_size", "grad_accum", "save_steps"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if args.text_only and (args.train_query or args.train_mapping):
        print("error: --train-query/--train-mapping need images: not with --text-only", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("viscpm.adapters").setLevel(logging.INFO)
    try:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import viscpm  # noqa: F401  (registers the Auto classes)
        from viscpm import adapters
    except ImportError as error:
        print(f"error: cannot import viscpm and its training dependencies ({error})", file=sys.stderr)
        return 1

    try:
        processor = AutoProcessor.from_pretrained(args.model)
        data = adapters.load_conversations(args.data if len(args.data) > 1 else args.data[0], split=args.split)
        prepare = dict(max_length=args.max_length, on_bad_rows=args.on_bad_rows, num_proc=args.num_proc)
        if args.text_only:
            train = adapters.prepare_text_dataset(data, processor.tokenizer, **prepare)
        else:
            train = adapters.prepare_chat_dataset(data, processor, image_folder=args.image_folder,
                                                  check_images=not args.no_check_images, **prepare)
        print(f"{len(train)} training examples", file=sys.stderr)

        load = {} if args.dtype is None else {"dtype": getattr(torch, args.dtype)}
        model = AutoModelForImageTextToText.from_pretrained(args.model, **load)
        config = adapters.language_adapter_config(
            r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
            target_modules=args.target_modules or adapters.LORA_TARGET_MODULES,
            train_query=args.train_query, train_mapping=args.train_mapping,
        )
        model = adapters.add_language_adapter(model, config)
        overrides = dict(
            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps,
            warmup_steps=args.warmup_steps, save_steps=args.save_steps, logging_steps=args.logging_steps,
            bf16=args.bf16, fp16=args.fp16, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
            use_cpu=args.cpu,
        )
        if args.deepspeed:
            overrides["deepspeed"] = args.deepspeed
        adapters.train_language_adapter(
            model, train, args.output_dir, data_collator=adapters.ChatAdapterCollator(processor),
            language=args.language, base_model=args.base_model or args.model, resume_from_checkpoint=args.resume,
            **overrides,
        )
    except (adapters.BadDataError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is in --output-dir/checkpoints (use --resume)", file=sys.stderr)
        return 130
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
