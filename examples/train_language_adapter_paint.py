#!/usr/bin/env python
"""Train a VisCPM-Paint language adapter (LoRA) for a new language.

    python examples/train_language_adapter_paint.py --model viscpm-paint-hf --data captions_de.jsonl \\
        --image-folder images/ --language de --output-dir adapters/viscpm-paint-de \\
        [--base-model openbmb/VisCPM-Paint] [--image-column image] [--caption-column caption] [--resolution 512] \\
        [--r 16 --alpha 32] [--train-unet-cross-attention [--unet-r 8]] [--batch-size 4 --lr 1e-4 --max-steps N] \\
        [--bf16 | --fp16] [--gradient-checkpointing] [--resume [CHECKPOINT]]

`--data` holds (image, caption) rows in the new language (JSON / JSONL / parquet / CSV, an image folder with
`metadata.jsonl`, or a Hub dataset id). The objective is the original's: the VAE latents of the image are noised at a
random DDPM step and the UNet, conditioned on the caption through CPM-Bee and the bridge, predicts the noise (MSE).
LoRA goes on CPM-Bee's projections in the text encoder, and with `--train-unet-cross-attention` on the UNet's
cross-attention too. The VAE and all base weights stay frozen.

The adapter folder has `text_encoder/` (and `unet/`) peft folders plus a model card; use it with
`VisCPMPaint.from_pretrained("viscpm-paint-hf", adapter="adapters/viscpm-paint-de")`. Trainer checkpoints go to
`--output-dir/checkpoints`.

Exit status: 0 on success, 1 on a data or training error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a VisCPM-Paint language adapter (LoRA) with peft + Trainer.")
    parser.add_argument("--model", required=True, help="converted VisCPM-Paint folder or Hub repo")
    parser.add_argument("--data", required=True, nargs="+", help="data files, a folder, or a Hub dataset id")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-folder", help="folder the images' relative paths start from")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--language", required=True, help="language code of the adapter, e.g. de (model card)")
    parser.add_argument("--base-model", help="base model id for the model card (default: --model)")
    parser.add_argument("--resolution", type=int, default=512, help="training image size (default 512)")
    parser.add_argument("--random-flip", action="store_true", help="flip images left-right at random")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank of the text encoder")
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--train-unet-cross-attention", action="store_true",
                        help="also LoRA on the UNet's cross-attention (to_q/to_k/to_v/to_out of attn2)")
    parser.add_argument("--unet-r", type=int, help="LoRA rank of the UNet (default: --r)")
    parser.add_argument("--max-length", type=int, default=512, help="skip captions longer than this (tokens)")
    parser.add_argument("--on-bad-rows", choices=["skip", "raise"], default="skip")
    parser.add_argument("--no-check-images", action="store_true")
    parser.add_argument("--num-proc", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the base weights")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--save-steps", type=int, default=500)
    parser.add_argument("--logging-steps", type=int, default=10)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true")
    precision.add_argument("--fp16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="resume from the last checkpoint in --output-dir/checkpoints, or from the one given")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (tiny models, tests)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("r", "alpha", "batch_size", "grad_accum", "save_steps", "resolution"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import torch

        import viscpm  # noqa: F401  (registers the Auto classes)
        from viscpm import adapters
        from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline
    except ImportError as error:
        print(f"error: cannot import viscpm and its training dependencies ({error})", file=sys.stderr)
        return 1

    try:
        load = {} if args.dtype is None else {"torch_dtype": getattr(torch, args.dtype)}
        pipe = VisCPMPaintPipeline.from_pretrained(args.model, **load)
        data = adapters.load_conversations(args.data if len(args.data) > 1 else args.data[0], split=args.split)
        train = adapters.prepare_paint_dataset(
            data, pipe.tokenizer, image_column=args.image_column, caption_column=args.caption_column,
            image_folder=args.image_folder, max_length=args.max_length, on_bad_rows=args.on_bad_rows,
            check_images=not args.no_check_images, num_proc=args.num_proc,
        )
        print(f"{len(train)} training examples", file=sys.stderr)
        model = adapters.add_paint_adapter(pipe, r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                           train_unet_cross_attention=args.train_unet_cross_attention,
                                           unet_r=args.unet_r)
        collator = adapters.PaintAdapterCollator(pipe.tokenizer, resolution=args.resolution,
                                                 random_flip=args.random_flip)
        adapters.train_paint_adapter(
            model, train, args.output_dir, data_collator=collator, language=args.language,
            base_model=args.base_model or args.model, resume_from_checkpoint=args.resume,
            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps,
            warmup_steps=args.warmup_steps, save_steps=args.save_steps, logging_steps=args.logging_steps,
            bf16=args.bf16, fp16=args.fp16, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
            use_cpu=args.cpu,
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
