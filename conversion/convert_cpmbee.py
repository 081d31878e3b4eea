#!/usr/bin/env python
"""Convert an original CPM-Bee checkpoint into a Hugging Face model folder.

    python conversion/convert_cpmbee.py --checkpoint cpm-bee-10b.pt --output-dir cpmbee-10b-hf \\
        [--config cpm-bee-10b.json] [--vocab-file bee.txt] [--dtype float16] [--overwrite]

The folder then loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
after ``import viscpm``. The checkpoint is read with ``weights_only=True`` (no code from the file
runs) and memory-mapped; the output folder appears only once it is complete.

Exit status: 0 on success, 1 on a conversion error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert an original CPM-Bee checkpoint (torch.save state dict) into a Hugging Face folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="the original checkpoint (.pt); keys may sit under 'llm.'")
    parser.add_argument("--output-dir", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument(
        "--config",
        help="the original config JSON (dim_model, num_layers, ...) or one of ours; default: the 10B model",
    )
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

    try:
        from viscpm.convert import convert_cpmbee_checkpoint, run_converter
    except ImportError as error:
        print(f"error: cannot import viscpm ({error}); run `pip install -e .` in the repository", file=sys.stderr)
        return 1

    return run_converter(
        convert_cpmbee_checkpoint,
        vocab_file=args.vocab_file,
        checkpoint=args.checkpoint,
        output_dir=args.output_dir,
        config=args.config,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )

if __name__ == "__main__":
    sys.exit(main())
