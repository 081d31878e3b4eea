#!/usr/bin/env python
"""Convert an original VisCPM-Chat checkpoint into a Hugging Face model folder.

    python conversion/convert_viscpm_chat.py --checkpoint viscpm_chat_balance_checkpoint.pt \\
        --output-dir viscpm-chat-hf \\
        [--llm-config cpm-bee-10b.json] [--vision-config beit3.json] [--query-num 64] [--vocab-file bee.txt] \\
        [--dtype float16] [--overwrite]

Defaults are the released model: CPM-Bee 10B, BEiT-3 large 224/16, 64 queries. `--llm-config` takes the original
CPM-Bee JSON keys (`dim_model`, `num_layers`, ...), `--vision-config` torchscale `EncoderConfig` keys
(`encoder_embed_dim`, `encoder_layers`, `encoder_attention_heads`, `encoder_ffn_embed_dim`, `img_size`,
`patch_size`, `vocab_size`). The folder then loads with `AutoModelForImageTextToText.from_pretrained` (after
`import viscpm`). The checkpoint is read with `weights_only=True` and memory-mapped; the output folder appears
only once it is complete. BEiT-3 weights VisCPM-Chat never uses (the masked-image-modelling head, the text
embedding, the mask token) are dropped, and the log says so.

Exit status: 0 on success, 1 on a conversion error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert an original VisCPM-Chat checkpoint (torch.save state dict) into a Hugging Face folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="the original VisCPM-Chat checkpoint (.pt / .bin)")
    parser.add_argument("--output-dir", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--llm-config", help="the original CPM-Bee config JSON; default: CPM-Bee 10B")
    parser.add_argument(
        "--vision-config",
        help="JSON of torchscale EncoderConfig keys (encoder_embed_dim, encoder_layers, ...); default: BEiT-3 large",
    )
    parser.add_argument("--query-num", type=int, help="number of query tokens; default: 64")
    parser.add_argument(
        "--vocab-file",
        help="the CPM-Bee vocabulary (bee.txt); default: the one in the installed original VisCPM package",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the written weights; default: keep the checkpoint's",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir once done")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on usage errors
    if args.query_num is not None and args.query_num < 1:
        print(f"error: --query-num must be positive, got {args.query_num}", file=sys.stderr)
        return 2

    try:
        from viscpm.convert import run_converter
        from viscpm.convert_chat import convert_viscpm_chat_checkpoint
    except ImportError as error:
        print(f"error: cannot import viscpm ({error}); run `pip install -e .` in the repository", file=sys.stderr)
        return 1

    return run_converter(
        convert_viscpm_chat_checkpoint,
        vocab_file=args.vocab_file,
        log_to_stderr="viscpm.convert_chat",
        checkpoint=args.checkpoint,
        output_dir=args.output_dir,
        llm_config=args.llm_config,
        vision_config=args.vision_config,
        query_num=args.query_num,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )

if __name__ == "__main__":
    sys.exit(main())
