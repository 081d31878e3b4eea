"""What the apps (command line, demo, web app) share: one error type, loading models and images, decoding
choices and painting.

Everything a user can get wrong is an :class:`AppError` with a one-line message that says what to do; each app
shows it its own way (the command line on stderr with an exit status, the web app as a message in the page).
Heavy imports (torch, transformers, diffusers) happen inside the functions, so that ``viscpm --help`` and usage
errors do not pay for them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from viscpm.conversion.common import first_line
from viscpm.conversion.common import CHECKPOINT_SUFFIXES, looks_like_repo_id

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SEED_MAX",
    "AppError",
    "atomic_files",
    "check_model",
    "check_number",
    "decoding_options",
    "load_chat",
    "load_image",
    "load_paint",
    "paint_images",
    "resolve_device",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SEED_MAX = 2**63 - 1
"""The largest seed the apps take (torch takes 64 bits; the demo also uses ``seed + 1``)."""


class AppError(Exception):
    """A problem the user can fix, shown as one line (``status`` is the command line's exit status)."""

    def __init__(self, message: str, status: int = EXIT_ERROR):
        super().__init__(message)
        self.status = status


def check_number(value: Any, what: str = "", kind: type = int, low: float | None = None, high: float | None = None,
                 above: float | None = None) -> int | float:
    """``value`` (a number, or its text) as a finite ``kind`` (int or float) with ``low <= value <= high`` and
    ``value > above``, or a usage `AppError` that names ``what`` and the range (``"must be ..."`` without it)."""
    number = _as_number(value, kind)
    if (number is None or (low is not None and number < low) or (high is not None and number > high)
            or (above is not None and number <= above)):
        bounds = [f"{word} {bound}" for word, bound in (("above", above), ("at least", low), ("at most", high))
                  if bound is not None]
        wanted = " ".join(["a whole number" if kind is int else "a finite number", " and ".join(bounds)]).strip()
        raise AppError(f"{what} must be {wanted}, got {value!r}".strip(), EXIT_USAGE)
    return number


def _as_number(value: Any, kind: type) -> int | float | None:
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if kind is int and isinstance(value, float):
        return int(value) if value.is_integer() else None
    return kind(value)


@contextlib.contextmanager
def atomic_files(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary paths beside ``paths`` to write; when the block ends without an error (or Ctrl-C), each goes to
    its place at once, otherwise they are removed: a command never leaves half a file or half its files."""
    temps = [path.with_name(f".{path.name}.tmp{os.getpid()}") for path in paths]
    try:
        yield temps
        for temp, path in zip(temps, paths):
            os.replace(temp, path)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def resolve_device(name: str | None):
    """``--device`` as a `torch.device` (default: CUDA when available, else CPU)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise AppError(f"unknown --device {name!r}; use cpu, cuda or cuda:N", EXIT_USAGE) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AppError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    return device


def _dtype(name: str | None):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def _has_checkpoint(folder: Path) -> bool:
    return any(child.suffix.lower() in CHECKPOINT_SUFFIXES for child in folder.iterdir())


def check_model(path: str, kind: str) -> str:
    """Refuse early, in one line, what cannot be a converted ``kind`` ("chat" or "paint") folder.

    A string of the form ``owner/name`` that is not a local path is passed on as a Hub repo id; an original
    checkpoint file, or a folder holding one, is passed on (`viscpm.conversion.original_format` converts it).
    """
    expected = {"chat": "VisCPM-Chat", "paint": "VisCPM-Paint"}[kind]
    fix = (f"convert the original checkpoint with `viscpm convert {kind} --checkpoint FILE --output-dir DIR`, "
           "or run `viscpm demo` for a tiny one")
    local = Path(path).expanduser()
    if not local.exists():
        if looks_like_repo_id(path):
            return path
        raise AppError(f"model folder {path} not found; {fix}")
    if local.is_file():
        if local.suffix.lower() in CHECKPOINT_SUFFIXES:
            return str(local)  # an original checkpoint: converted once into a cache folder by from_pretrained
        raise AppError(f"{path} is a file, not a converted {expected} folder; {fix}")
    config_file, index_file = local / "config.json", local / "model_index.json"
    if kind == "chat":
        if index_file.is_file():
            raise AppError(f"{path} is a VisCPM-Paint pipeline folder; use `viscpm paint {path} PROMPT`")
        if not config_file.is_file():
            if _has_checkpoint(local):
                return str(local)
            raise AppError(f"{path} has no config.json, so it is not a converted {expected} folder; {fix}")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            raise AppError(f"{config_file} is not a valid JSON config; {fix}") from None
        if model_type != "viscpm_chat":
            raise AppError(f"{path} holds a {model_type!r} model, not {expected} ('viscpm_chat')")
    elif not index_file.is_file():
        if _has_checkpoint(local):
            return str(local)
        if config_file.is_file():
            raise AppError(f"{path} is a model folder, not a VisCPM-Paint pipeline (no model_index.json); {fix}")
        raise AppError(f"{path} has no model_index.json, so it is not a converted {expected} folder; {fix}")
    return str(local)


def load_image(path: str | os.PathLike, image_processor=None) -> str:
    """Check an image file by reading it the way VisCPM-Chat will: through the image processor's own loading
    (``VisCPMImageProcessor.to_pil``: 16-bit, float and transparent images converted as ``chat(path)`` converts them).
    Returns the path, for ``VisCPMChat.chat`` to read with its image processor, so that a file gives the same answer
    through every app as through ``chat(path)``; a problem is a one-line error saying what is wrong."""
    from viscpm.modeling.image_processing_viscpm import VisCPMImageProcessor

    path = Path(path).expanduser()
    if not path.exists():
        raise AppError(f"image {path} not found")
    if path.is_dir():
        raise AppError(f"image {path} is a folder; pass an image file (PNG, JPEG, ...)")
    try:
        (image_processor or VisCPMImageProcessor()).to_pil(str(path))
    except (ValueError, OSError) as error:  # unreadable, truncated, too large, ...
        raise AppError(f"cannot read image {path}: {first_line(error)}") from None
    return str(path)


def load_chat(path: str, dtype: str | None = None, device: str | None = None, variant: str | None = None,
              adapter: str | None = None):
    """`VisCPMChat` from a converted folder (or Hub id), with an optional PEFT adapter."""
    from viscpm.chat import VisCPMChat

    source = check_model(path, "chat")
    torch_device = resolve_device(device)
    if adapter is not None and not Path(adapter).expanduser().exists() and not looks_like_repo_id(adapter):
        raise AppError(f"adapter {adapter} not found; pass a folder with adapter_config.json (or a Hub repo id)")
    kwargs: dict[str, Any] = {}
    if variant is not None:
        kwargs["variant"] = variant
    if adapter is not None:
        kwargs["adapter"] = adapter
    try:
        chat = VisCPMChat.from_pretrained(source, dtype=_dtype(dtype), device=torch_device, **kwargs)
    except Exception as error:
        raise AppError(f"cannot load VisCPM-Chat from {path}: {first_line(error)[:300]} (is the folder complete? "
                       "convert it again with `viscpm convert chat`)") from error
    return chat


def load_paint(path: str, dtype: str | None = None, device: str | None = None, progress: bool = True,
               variant: str | None = None):
    """`VisCPMPaint` from a converted folder (or Hub id, or original checkpoint), on ``device``, with the optional
    parts the folder has (image safety checker, prompt checker, ranker) and nothing fetched for those it lacks."""
    from viscpm.paint import VisCPMPaint

    source = check_model(path, "paint")
    torch_device = resolve_device(device)
    try:
        painter = VisCPMPaint.from_pretrained(source, image_safety_checker=None, prompt_safety_checker=None,
                                              add_ranker=None, torch_dtype=_dtype(dtype), device=torch_device,
                                              variant=variant)
    except Exception as error:
        raise AppError(f"cannot load VisCPM-Paint from {path}: {first_line(error)[:300]} (is the folder complete? "
                       "convert it again with `viscpm convert paint`)") from error
    painter.pipeline.set_progress_bar_config(desc="painting", disable=not progress)
    return painter


def decoding_options(decoding: str = "beam", num_beams: int | None = None, max_new_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                     repetition_penalty: float | None = None, decode_mode: str | None = None) -> dict:
    """Generation overrides for `VisCPMChat.chat` from the command-line options.

    ``decoding`` is ``"beam"`` (the original's beam search, the folder's defaults: not streamable), ``"greedy"``
    (transformers' greedy search) or ``"sample"`` (transformers' sampling, one beam unless ``num_beams``).
    ``decode_mode`` picks the decode step of the original beam search (``static``, ``compile``, ``cuda_graph``).
    Options left at None keep the folder's generation config.
    """
    options: dict[str, Any] = {}
    if decode_mode is not None:
        if decoding != "beam":
            raise AppError(f"--decode-mode applies to the original beam search; drop --{decoding} or --decode-mode",
                           EXIT_USAGE)
        options["decode_mode"] = decode_mode
    if decoding == "greedy":
        if num_beams not in (None, 1):
            raise AppError(f"--greedy decodes one beam; drop --num-beams {num_beams}", EXIT_USAGE)
        options.update(original_beam_search=False, do_sample=False, num_beams=1)
    elif decoding == "sample":
        options.update(do_sample=True, num_beams=num_beams or 1)
    elif decoding != "beam":
        raise ValueError(f"unknown decoding {decoding!r}")
    elif num_beams is not None:
        options["num_beams"] = num_beams
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("repetition_penalty", repetition_penalty)):
        if value is not None:
            options[name] = value
    return options


def paint_images(painter, prompt: str, negative_prompt: str | None = None, steps: int = 50, seed: int | None = None,
                 size: int | None = None, num_images: int = 1, guidance_scale: float = 7.5):
    """Draw ``num_images`` PIL images for ``prompt``; returns ``(images, flagged)``.

    ``flagged[i]`` is True when the safety checker (if the folder has one) blacked out image ``i``. A prompt the
    prompt checker refuses is a `AppError`.
    """
    import torch

    if not prompt.strip():
        raise AppError("the prompt is empty; describe the picture", EXIT_USAGE)
    steps = check_number(steps, "the number of steps", low=1)
    generator = None if seed is None else torch.Generator(painter.device).manual_seed(seed)
    try:
        output = painter(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                         guidance_scale=guidance_scale, height=size, width=size, num_images_per_prompt=num_images,
                         generator=generator, output_type="pil")
    except ValueError as error:  # sizes and other values the pipeline refuses
        raise AppError(first_line(error)) from None
    if any(output.prompt_refused):
        raise AppError("the prompt checker refused this prompt; rephrase it")
    flagged = output.nsfw_content_detected or [False] * len(output.images)
    return output.images, [bool(flag) for flag in flagged]
