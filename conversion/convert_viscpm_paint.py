#!/usr/bin/env python
"""Convert an original VisCPM-Paint checkpoint into a diffusers pipeline folder.

    python conversion/convert_viscpm_paint.py --checkpoint viscpm_paint_zhplus_checkpoint.pt --output-dir viscpm-paint \\
        [--llm-config cpm-bee-10b.json] [--sd-base stabilityai/stable-diffusion-2-1-base] [--vocab-file bee.txt] \\
        [--dtype float16] [--overwrite]

``trans_block.*``, ``unet.*`` and ``llm.*`` come from the checkpoint; the VAE, the scheduler and the UNet
config from ``--sd-base`` (a Hub repo id or a local folder with ``vae/``, ``scheduler/``, ``unet/config.json``).
The folder then loads with ``VisCPMPaintPipeline.from_pretrained`` or ``viscpm.VisCPMPaint.from_pretrained``.
The checkpoint is read with ``weights_only=True`` and memory-mapped; the output appears only once complete.

Exit status: 0 on success, 1 on a conversion error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_SD_BASE = "stabilityai/stable-diffusion-2-1-base"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert an original VisCPM-Paint checkpoint into a diffusers pipeline folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="the original checkpoint (viscpm_paint_*_checkpoint.pt)")
    parser.add_argument("--output-dir", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--llm-config", help="the original CPM-Bee config JSON or one of ours; default: CPM-Bee 10B")
    parser.add_argument(
        "--sd-base",
        default=DEFAULT_SD_BASE,
        help=f"Hub repo or local folder with vae/, scheduler/, unet/config.json (default: {DEFAULT_SD_BASE})",
    )
    parser.add_argument(
        "--vocab-file",
        help="the CPM-Bee vocabulary (bee.txt); default: the one in the installed original VisCPM package",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of the written weights; default: keep"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir once done")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on usage errors
    try:
        from viscpm.convert import run_converter
        from viscpm.convert_paint import convert_viscpm_paint_checkpoint
    except ImportError as error:
        print(f"error: cannot import viscpm ({error}); run `pip install -e .` in the repository", file=sys.stderr)
        return 1

    return run_converter(
        convert_viscpm_paint_checkpoint,
        vocab_file=args.vocab_file,
        checkpoint=args.checkpoint,
        output_dir=args.output_dir,
        llm_config=args.llm_config,
        sd_base=args.sd_base,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )

if __name__ == "__main__":
    sys.exit(main())
