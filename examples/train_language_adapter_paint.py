#!/usr/bin/env python
"""Train a VisCPM-Paint language adapter (LoRA) for a new language.

    python examples/train_language_adapter_paint.py --model viscpm-paint-hf --data captions_de.jsonl \\
        --image-folder images/ --language de --output-dir adapters/viscpm-paint-de \\
        [--image-column image] [--caption-column caption] [--resolution 512] [--lora-r 16 --lora-alpha 32] \\
        [--train-unet-cross-attention [--unet-lora-r 8]] [--per-device-train-batch-size 4 --max-steps N] \\
        [--bf16] [--gradient-checkpointing] [--resume [CHECKPOINT] | --overwrite]

`--data` holds (image, caption) rows in the new language (JSON / JSONL / parquet / CSV, an image folder with
`metadata.jsonl`, or a Hub dataset id). The objective is the original's: the VAE latents of the image are noised at a
random DDPM step and the UNet, conditioned on the caption through CPM-Bee and the bridge, predicts the noise (MSE).
LoRA goes on CPM-Bee's projections in the text encoder, and with `--train-unet-cross-attention` on the UNet's
cross-attention too. The VAE and all base weights stay frozen.

The options are those of the Chat script (see it) with the ones below. The adapter folder has `text_encoder/` (and
`unet/`) peft folders plus a model card; use it with `VisCPMPaint.from_pretrained("viscpm-paint-hf",
adapter="adapters/viscpm-paint-de")`. Checkpoints go to `--output-dir/checkpoints`, each one a usable adapter too.

Exit status: 0 on success, 1 on a data or training error (one line on stderr), 2 on a usage error, 130 on Ctrl-C.
"""

import sys
from dataclasses import dataclass, field

from viscpm import adapters


@dataclass
class PaintArguments:
    """What only Paint adapters have."""

    caption_column: str = field(default="caption", metadata={"help": "Column holding the captions."})
    resolution: int = field(default=512, metadata={"help": "Training image size."})
    random_flip: bool = field(default=False, metadata={"help": "Flip images left-right at random."})
    train_unet_cross_attention: bool = field(
        default=False, metadata={"help": "Also LoRA on the UNet's cross-attention (to_q/to_k/to_v/to_out of attn2)."})
    unet_lora_r: int | None = field(default=None, metadata={"help": "LoRA rank of the UNet (default: --lora-r)."})

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"--resolution must be positive, got {self.resolution}")
        if self.unet_lora_r is not None and (self.unet_lora_r < 1 or not self.train_unet_cross_attention):
            raise ValueError("--unet-lora-r is a positive rank and goes with --train-unet-cross-attention")


def train(paint_args: PaintArguments, model_args: adapters.AdapterArguments, data_args: adapters.DataArguments,
          training_args: adapters.AdapterTrainingArguments) -> None:
    import torch

    from viscpm import VisCPMPaintPipeline

    columns = {"image_column": data_args.image_column, "caption_column": paint_args.caption_column}
    rows = adapters.load_rows(data_args.source, columns, data_args.image_folder, split=data_args.split,
                              streaming=data_args.streaming)
    load = {} if model_args.dtype is None else {"torch_dtype": getattr(torch, model_args.dtype)}
    pipe = VisCPMPaintPipeline.from_pretrained(model_args.model, **load)
    with training_args.main_process_first(desc="preparing the data"):
        train_data = adapters.prepare_paint_dataset(
            rows, pipe.tokenizer, image_column=data_args.image_column, caption_column=paint_args.caption_column,
            image_folder=data_args.image_folder, check_images=data_args.check_images, **data_args.prepare_kwargs())
    print(adapters.data.count_line(train_data), file=sys.stderr)

    model = adapters.add_paint_adapter(
        pipe, r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules, train_unet_cross_attention=paint_args.train_unet_cross_attention,
        unet_r=paint_args.unet_lora_r)
    collator = adapters.PaintAdapterCollator(pipe.tokenizer, resolution=paint_args.resolution,
                                             random_flip=paint_args.random_flip)
    adapters.train_paint_adapter(
        model, train_data, data_collator=collator, language=model_args.language,
        base_model=model_args.base_model or model_args.model, training_args=training_args,
        resume_from_checkpoint=model_args.resume, overwrite=model_args.overwrite)


ARGUMENTS = (PaintArguments, adapters.AdapterArguments, adapters.DataArguments, adapters.AdapterTrainingArguments)
DEFAULTS = {"max_length": 512, "lora_dropout": 0.0, "learning_rate": 1e-4}


def main(argv: list[str] | None = None) -> int:
    return adapters.run_training_script(train, ARGUMENTS, argv, DEFAULTS, prog="train_language_adapter_paint.py",
                                        description="Train a VisCPM-Paint language adapter (LoRA).")


if __name__ == "__main__":
    sys.exit(main())
