"""What every converter shares: reading original checkpoints, key maps, validation and atomic output.

The original checkpoints are `torch.save` pickles of a state dict (CPM-Bee alone, or VisCPM-Chat /
VisCPM-Paint with the language model under ``llm.``). The converters (``convert_cpmbee.py``,
``convert_viscpm_chat.py``, ``convert_viscpm_paint.py``), original-format loading and the Hub push use:

* :func:`load_original_checkpoint`: reads a checkpoint without running code from it (``weights_only=True``)
  and without copying it into memory (``mmap=True``); every way of failing is a :class:`ConversionError`
  with a one-line message that names the file and the fix.
* :class:`KeyMap`: renames original keys to ours (under their prefixes), and back again for messages;
  :func:`split_by_prefix` separates a model's part of a checkpoint.
* :func:`check_converted` (:func:`build_meta_model`, :func:`expected_parameter_shapes`,
  :func:`validate_state_dict`): compare a converted state dict with what a config expects, naming every missing,
  unexpected and mis-shaped key, and (:func:`sizes_from_shapes`, :func:`config_differences`) which config
  sizes the checkpoint's shapes contradict.
* :func:`write_safetensors` (sharded, cast one shard at a time, NaN/inf weights named in a warning),
  :func:`save_model_folder`, :func:`write_model_folder` and :func:`atomic_output_dir` (a folder appears only
  once it is complete, its files readable as the umask allows, like any other file the user writes).
* :func:`load_config`, :func:`converter_parser` and :func:`run_converter`: config files, the scripts' common
  options and their error handling.

Only :class:`ConversionError` is raised for problems with the user's input; anything else is a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import pickle
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm.auto import tqdm

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "DEFAULT_MAX_SHARD_SIZE",
    "SOURCE_INFO_FILE",
    "ConversionError",
    "KeyMap",
    "ScriptArgumentParser",
    "atomic_output_dir",
    "build_meta_model",
    "check_converted",
    "check_output_dir",
    "config_differences",
    "converter_parser",
    "default_vocab_file",
    "expected_parameter_shapes",
    "file_sha256",
    "first_line",
    "follow_umask",
    "is_within",
    "layer_count",
    "load_config",
    "load_original_checkpoint",
    "looks_like_repo_id",
    "parse_dtype",
    "require_file",
    "run_converter",
    "save_model_folder",
    "shape_of",
    "shorten",
    "sizes_from_shapes",
    "split_by_prefix",
    "unwrap_state_dict",
    "validate_state_dict",
    "write_model_folder",
    "write_safetensors",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "2GB"
"""Shard size of written weights. A shard is cast and serialised in memory at once, so it stays small."""
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""The file endings of original (torch.save) checkpoints."""
SOURCE_INFO_FILE = "viscpm_source.json"
"""Written into a folder converted on the fly (conversion/original_format.py): which original file it came from; the
Hub push puts its content into the model card."""


def file_sha256(path: str | os.PathLike, progress: bool = True) -> str:
    """The sha256 of a file, read in 8 MiB blocks (with a progress bar for large files)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                         disable=not progress or size < 1 << 28) as bar:
        while block := handle.read(8 << 20):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


class ConversionError(Exception):
    """Something is wrong with what the user gave (a file, a config, an option).

    The message is a single line that says what is wrong and, where there is one, what to do.
    """


# --------------------------------------------------------------------------------------------------
# Reading original checkpoints
# --------------------------------------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6 writes a zip archive
_PICKLE_PROTO = b"\x80"  # the legacy torch.save format starts with a pickle (protocol >= 2)
_UNSAFE_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` (not an existing path) can be a Hub repo id, ``owner/name``, rather than a mistyped path."""
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", text)) and not text.startswith((".", "/")) and ".." not in text


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch colours some of its messages
    return text.splitlines()[0].strip() if text else type(error).__name__


def _sniff_non_checkpoint(path: Path, head: bytes) -> str:
    """Explain what a file that is not a torch checkpoint probably is."""
    if len(head) >= 10 and head[8:10] == b'{"':
        return (
            f"{path} is a safetensors file, not an original PyTorch checkpoint "
            "(is it already converted? load its folder with from_pretrained)"
        )
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        hint = ""
        data = None
        try:
            if path.stat().st_size < 1 << 20:
                data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            pass
        if isinstance(data, dict) and ("dim_model" in data or "model_type" in data):
            hint = " (it looks like a model config: pass it with --config)"
        return f"{path} is a JSON/text file, not a PyTorch checkpoint{hint}; pass the .pt file written by torch.save"
    return (
        f"{path} is not a PyTorch checkpoint (unrecognised file header); "
        "pass the original .pt file written by torch.save"
    )


def load_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load an original checkpoint as a flat ``{name: tensor}`` dict, safely and lazily.

    The file is read with ``torch.load(..., weights_only=True)``, which never runs code stored in
    the pickle, and memory-mapped where the format allows it (files from ``torch.save`` since
    PyTorch 1.6), so a 20 GB checkpoint is paged in on demand rather than copied into RAM. A state
    dict stored under a ``"state_dict"``, ``"model"`` or ``"module"`` key is unwrapped.

    Raises:
        ConversionError: the path is missing or a directory, the file is empty, truncated, corrupt,
            not a torch checkpoint, holds pickled Python objects that a safe load refuses, or does
            not hold a state dict.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint not found: {path} (check the path)")
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        listing = f" (it contains: {', '.join(found[:5])})" if found else ""
        raise ConversionError(f"{path} is a directory; pass the checkpoint file itself{listing}")
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as error:
        raise ConversionError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    if not head:
        raise ConversionError(f"{path} is empty (0 bytes); download or copy the checkpoint again")

    if head.startswith(_ZIP_MAGIC):
        mmap = True
    elif head.startswith(_PICKLE_PROTO):
        mmap = False  # the legacy format cannot be memory-mapped: it is read into memory
    else:
        raise ConversionError(_sniff_non_checkpoint(path, head))

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        message = str(error)
        unsafe = _UNSAFE_GLOBAL.search(message)
        if unsafe:
            raise ConversionError(
                f"{path} holds a pickled Python object ({unsafe.group(1)}), not only tensors, so a safe "
                "load (weights_only=True) refuses it; if you trust the file, re-save just its state dict "
                "with torch.save(state_dict, ...) and convert that"
            ) from None
        raise ConversionError(
            f"{path} is corrupt or not a PyTorch checkpoint ({first_line(error)}); download or copy it again"
        ) from None
    except MemoryError:
        raise
    except Exception as error:  # torch reports damaged archives as RuntimeError, EOFError, ...
        detail = first_line(error)
        if "central directory" in detail or "zip archive" in detail or isinstance(error, EOFError):
            what = "truncated or corrupt"
        else:
            what = "unreadable"
        raise ConversionError(
            f"{path} is {what} (torch.load: {detail[:200]}); download or copy the checkpoint again"
        ) from None
    return unwrap_state_dict(loaded, source=str(path))


_WRAPPER_KEYS = ("state_dict", "model", "module")


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the ``{name: tensor}`` state dict inside ``obj``.

    ``obj`` may be the state dict itself or a training checkpoint that keeps it under one of the
    keys ``"state_dict"``, ``"model"`` or ``"module"`` (nested wrappers are followed).

    Raises:
        ConversionError: ``obj`` holds no tensors, or holds entries that are not tensors.
    """
    for _ in range(4):
        if not isinstance(obj, Mapping):
            raise ConversionError(f"{source} holds a {type(obj).__name__}, not a state dict of tensors")
        has_tensors = any(isinstance(value, torch.Tensor) for value in obj.values())
        wrapped = [key for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)]
        if has_tensors or not wrapped:
            break
        obj = obj[wrapped[0]]
    if not obj:
        raise ConversionError(f"{source} holds no tensors (an empty state dict)")
    bad = [
        f"{key!r} ({type(value).__name__})"
        for key, value in obj.items()
        if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if bad:
        raise ConversionError(
            f"{source} is not a plain state dict: {len(bad)} entries are not tensors: {shorten(bad)}"
        )
    return dict(obj)


# --------------------------------------------------------------------------------------------------
# Key names
# --------------------------------------------------------------------------------------------------


class KeyMap:
    """A renaming between original and Hugging Face parameter names.

    Built from ``(original, ours)`` templates in which ``{i}`` stands for a layer index, e.g.
    ``("encoder.layers.{i}.ffn.ffn.w_out.weight", "layers.{i}.mlp.down_proj.weight")``.
    """

    def __init__(self, templates: Iterable[tuple[str, str]]):
        self.templates = tuple(templates)
        self._forward = [(self._compile(src), dst) for src, dst in self.templates]
        self._backward = [(self._compile(dst), src) for src, dst in self.templates]

    @staticmethod
    def _compile(template: str) -> re.Pattern:
        parts = [re.escape(part) for part in template.split("{i}")]
        return re.compile(r"(?P<i>\d+)".join(parts) if len(parts) == 2 else parts[0])

    @staticmethod
    def _apply(rules, key: str, strip: str, add: str) -> str | None:
        if not key.startswith(strip):
            return None
        key = key[len(strip):]
        for pattern, template in rules:
            match = pattern.fullmatch(key)
            if match:
                return add + (template.replace("{i}", match.group("i")) if "{i}" in template else template)
        return None

    def to_hf(self, key: str, prefix: str = "", hf_prefix: str = "") -> str | None:
        """Our name for an original key, or None if it is not known.

        ``prefix`` is where the part sits in the original checkpoint (``"llm."``; a key without it is not known),
        ``hf_prefix`` where it sits in our model (``"language_model.model."``).
        """
        return self._apply(self._forward, key, prefix, hf_prefix)

    def to_original(self, key: str, prefix: str = "", hf_prefix: str = "") -> str | None:
        """The original name for one of our keys (the reverse of :meth:`to_hf`), or None if it is not known."""
        return self._apply(self._backward, key, hf_prefix, prefix)


def split_by_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    """``(under, rest)``: the entries whose key starts with ``prefix`` (keys kept whole), and the others."""
    under = {key: tensor for key, tensor in state_dict.items() if key.startswith(prefix)}
    return under, {key: tensor for key, tensor in state_dict.items() if key not in under}


# --------------------------------------------------------------------------------------------------
# Checking a state dict against a config
# --------------------------------------------------------------------------------------------------


def build_meta_model(model_cls: type, config) -> torch.nn.Module:
    """Instantiate ``model_cls(config)`` on the meta device: shapes and names, no memory, no init cost."""
    with torch.device("meta"):
        return model_cls(config)


def expected_parameter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the parameters a checkpoint must provide (tied aliases counted once).

    Buffers are left out: they are computed from the config, never stored in original checkpoints.
    """
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def shorten(items: list, limit: int = 5) -> str:
    items = [str(item) for item in items]
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(size)) for size in shape) + "]"


def validate_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    unexpected: Iterable[str] = (),
    describe: Callable[[str], str] = lambda key: key,
    source: str = "checkpoint",
    summary: str = "",
    hint: str = "",
) -> None:
    """Check a converted state dict against the expected ``{name: shape}``.

    Args:
        unexpected: further keys already known to be unexpected (e.g. original keys that no rule
            maps), reported as they are.
        describe: turns one of our key names into the name the user knows (the original key).
        source: how to call the state dict in messages (usually the checkpoint path).
        summary: put in brackets right after the first words, e.g. which config sizes differ.
        hint: appended to the message, e.g. what option fixes a config mismatch.

    Raises:
        ConversionError: naming every missing, unexpected and mis-shaped key (long lists shortened).
    """
    missing = [describe(key) for key in expected if key not in state_dict]
    extra = list(unexpected) + [describe(key) for key in state_dict if key not in expected]
    mismatched = [  # in the model's order: the embedding first, which tells the most
        f"{describe(key)} is {_shape(state_dict[key].shape)}, config needs {_shape(shape)}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} with other shapes ({shorten(mismatched, 3)})")
    if missing:
        problems.append(f"{len(missing)} missing ({shorten(missing)})")
    if extra:
        problems.append(f"{len(extra)} unexpected ({shorten(extra)})")
    if problems:
        message = f"{source} does not match the model config" + (f" ({summary})" if summary else "")
        message += ": " + "; ".join(problems)
        raise ConversionError(message + (f"; {hint}" if hint else ""))


def check_converted(
    state_dict: Mapping[str, torch.Tensor],
    model_cls: type,
    config,
    *,
    source: str,
    unexpected: Iterable[str] = (),
    describe: Callable[[str], str] = lambda key: key,
    differences: str = "",
    hint: str = "",
) -> torch.nn.Module:
    """Check a converted state dict against ``model_cls(config)`` (built on the meta device, which is returned).

    ``differences`` (see :func:`config_differences`) says what the checkpoint's shapes tell about the config; the
    other arguments are those of :func:`validate_state_dict`.
    """
    model = build_meta_model(model_cls, config)
    validate_state_dict(
        state_dict,
        expected_parameter_shapes(model),
        unexpected=unexpected,
        describe=describe,
        source=source,
        summary=f"the checkpoint has {differences}" if differences else "",
        hint=hint,
    )
    return model


def shape_of(state_dict: Mapping[str, torch.Tensor], key: str, dims: int) -> tuple[int, ...] | None:
    """The shape of ``state_dict[key]`` when it is there with ``dims`` dimensions, else None."""
    tensor = state_dict.get(key)
    return tuple(int(size) for size in tensor.shape) if tensor is not None and tensor.dim() == dims else None


def layer_count(keys: Iterable[str], prefix: str) -> int | None:
    """``1 + the highest N`` among the keys ``{prefix}N.*``, or None if there is none."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    layers = {int(match.group(1)) for key in keys if (match := pattern.match(key))}
    return max(layers) + 1 if layers else None


def sizes_from_shapes(
    state_dict: Mapping[str, torch.Tensor], table: Iterable[tuple[str, str, int | None, int | None]], prefix: str = ""
) -> dict[str, int]:
    """The sizes a checkpoint's shapes show, in the order of ``table`` (for :func:`config_differences`).

    A row ``(name, key, dims, axis)`` reads ``state_dict[prefix + key].shape[axis]`` when that tensor is there with
    ``dims`` dimensions; a row whose ``axis`` is None counts the layers ``prefix + key + "N."`` instead.
    """
    found = {}
    for name, key, dims, axis in table:
        if axis is None:
            value = layer_count(state_dict, prefix + key)
        else:
            shape = shape_of(state_dict, prefix + key, dims)
            value = shape[axis] if shape else None
        if value is not None:
            found[name] = value
    return found


def config_differences(found: Mapping[str, int], expected: Mapping[str, int], label: str = "") -> str:
    """``"name=found not expected, ..."`` for the sizes a checkpoint's shapes show (``found``) that differ from the
    config's (``expected``); ``label`` goes before each name (e.g. ``"llm "``)."""
    return ", ".join(
        f"{label}{name}={value} not {expected[name]}" for name, value in found.items() if expected[name] != value
    )


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"float16"`` / ``"bf16"`` / ``torch.float32`` ... → a torch dtype; None or ``"auto"`` → None (keep).

    Raises:
        ConversionError: an unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name in ("auto", "keep", ""):
        return None
    if name not in _DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return _DTYPES[name]


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()


def write_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    weights_name: str = "model.safetensors",
    progress: bool = True,
    describe: Callable[[str], str] = lambda key: key,
) -> list[str]:
    """Write ``state_dict`` as safetensors the way ``save_pretrained`` lays them out.

    One ``model.safetensors``, or when larger than ``max_shard_size`` the shards
    ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``. Floating-point
    tensors are cast to ``dtype`` one shard at a time, so memory use stays near one shard even
    when the source is memory-mapped and the cast makes everything new. The files get the
    permissions the umask gives (safetensors alone writes them private, 0600).

    NaN or infinite values, in the source or made by the cast (float16 overflows beyond 65504),
    are written as they are and named in one warning each (``describe`` turns our key into the
    name the user knows): the checkpoint is the user's, but a model computes garbage from them.

    Returns:
        The names of the files written.
    """
    folder = Path(folder)
    sizes = {
        key: torch.empty(tensor.shape, dtype=_cast(torch.empty(0, dtype=tensor.dtype), dtype).dtype, device="meta")
        for key, tensor in state_dict.items()
    }
    pattern = weights_name.replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(sizes, filename_pattern=pattern, max_shard_size=max_shard_size)
    written = []
    nonfinite = NonFiniteReport(describe)
    with tqdm(total=len(state_dict), desc="Writing tensors", unit="tensor", disable=not progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            shard: dict[str, torch.Tensor] = {}
            storages: set[tuple[int, int]] = set()
            for name in names:
                source = state_dict[name]
                tensor = _cast(source, dtype).contiguous()
                if tensor.device.type == "meta":
                    raise ValueError(f"cannot write {name}: it is on the meta device")
                nonfinite.check(name, source, tensor)
                storage = _storage_key(tensor)
                if storage in storages:  # safetensors refuses tensors that share memory
                    tensor = tensor.clone()
                storages.add(_storage_key(tensor))
                shard[name] = tensor
                bar.update(1)
            save_file(shard, folder / filename, metadata={"format": "pt"})
            follow_umask(folder / filename)
            written.append(filename)
            del shard
    if split.is_sharded:
        index = {
            "metadata": {
                **split.metadata,
                "total_parameters": sum(tensor.numel() for tensor in state_dict.values()),
            },
            "weight_map": split.tensor_to_filename,
        }
        index_name = weights_name + ".index.json"
        (folder / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(index_name)
    nonfinite.warn()
    return written


def _nonfinite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """``(NaN count, inf count)`` of a floating-point tensor, read in chunks (no full-size mask in memory)."""
    if not tensor.is_floating_point():
        return 0, 0
    nan = inf = 0
    for chunk in tensor.reshape(-1).split(1 << 24):
        if not bool(torch.isfinite(chunk).all()):
            nan += int(torch.isnan(chunk).sum())
            inf += int(torch.isinf(chunk).sum())
    return nan, inf


class NonFiniteReport:
    """Collects the tensors that hold NaN/inf values while they are written; :meth:`warn` names them in one line
    per cause (in the checkpoint itself, or made by a float16 cast)."""

    def __init__(self, describe: Callable[[str], str] = lambda key: key):
        self.describe = describe
        self.in_source: list[str] = []
        self.by_cast: list[str] = []

    def check(self, name: str, source: torch.Tensor, written: torch.Tensor) -> None:
        nan, inf = _nonfinite_counts(source)
        if nan or inf:
            counts = ", ".join(f"{n:,} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)
            self.in_source.append(f"{self.describe(name)} ({counts} of {source.numel():,} values)")
        if written.dtype != source.dtype:
            made = sum(_nonfinite_counts(written)) - nan - inf
            if made > 0:
                self.by_cast.append(f"{self.describe(name)} ({made:,} value(s))")

    def warn(self) -> None:
        if self.in_source:
            logger.warning(
                "the checkpoint has %d tensor(s) with NaN or infinite values: %s; a model with them computes NaN "
                "and answers or paints garbage (a damaged file or a diverged training run?); they are written as "
                "they are", len(self.in_source), shorten(self.in_source))
        if self.by_cast:
            logger.warning(
                "%d tensor(s) hold values beyond the range of the chosen dtype, which become inf when cast: %s; "
                "convert with dtype bfloat16 or float32 (--dtype) to keep them", len(self.by_cast),
                shorten(self.by_cast))


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Fail early (before hours of work) if ``output_dir`` cannot be written to, or replacing it loses data.

    Args:
        inputs: the files and folders the conversion reads (checkpoint, configs, vocabulary); ``overwrite`` must
            not delete one of them by replacing an ``output_dir`` that holds it.

    Raises:
        ConversionError: it is a file, lies under a file, is a non-empty directory and ``overwrite`` is False, or
            holds one of ``inputs``.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a directory; choose another output folder")
    ancestor = Path(os.path.abspath(output_dir))
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConversionError(f"cannot create output {output_dir}: {ancestor} is a file; choose another output folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot create output {output_dir}: {ancestor} is not writable (permission denied); "
                              "choose an output folder you can write to")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise ConversionError(
                f"output directory {output_dir} already exists and is not empty; "
                "choose another one or pass --overwrite to replace it"
            )
        inside = [str(path) for path in inputs if isinstance(path, (str, os.PathLike)) and is_within(path, output_dir)]
        if inside:
            raise ConversionError(
                f"output directory {output_dir} holds {shorten(inside, 2)}, which this conversion reads; --overwrite "
                "would delete it: choose another output folder"
            )
    return output_dir


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` (resolved: links followed) is ``folder`` or lies inside it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


@contextlib.contextmanager
def atomic_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling of ``output_dir`` to write into; rename it into place on success.

    On any exception (or Ctrl-C) the temporary folder is removed and ``output_dir`` is left as it
    was. An existing non-empty ``output_dir`` is an error unless ``overwrite``; then it is replaced
    only once the new folder is complete. A hard kill (SIGKILL, power loss) can leave the temporary
    folder behind; its name (``.NAME.partial-XXXX``) never looks like a model folder, and writers
    that put ``config.json`` last leave it without one.

    What is written gets the permissions of the umask (see :func:`follow_umask`), whatever the libraries that
    wrote it chose (safetensors writes 0600, ``mkdtemp`` 0700), so a folder one user converts another can load.

    Raises:
        ConversionError: see :func:`check_output_dir`.
    """
    output_dir = Path(os.path.abspath(output_dir))
    inputs = tuple(inputs)
    check_output_dir(output_dir, overwrite, inputs)
    parent = output_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConversionError(f"cannot create {parent}: {error.strerror or error}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=parent))
    try:
        yield tmp
        check_output_dir(output_dir, overwrite, inputs)  # it may have appeared while we were writing
        for path in (tmp, *tmp.rglob("*")):
            follow_umask(path)
        if output_dir.exists():
            # Move the old folder aside, put the new one in place, then delete the old one.
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=parent))
            try:
                os.rename(output_dir, old / output_dir.name)
            except BaseException:
                old.rmdir()
                raise
            try:
                os.rename(tmp, output_dir)
            except BaseException:
                os.rename(old / output_dir.name, output_dir)
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file or folder we wrote the permissions a new one gets from the umask (0644 / 0755 under 022).

    Links and files with more than one hard link (a staged weight linked to the user's own file: its mode is that
    file's) are left as they are.
    """
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode):
        os.chmod(path, 0o777 & ~_umask())
    elif stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
        os.chmod(path, (0o777 if info.st_mode & 0o111 else 0o666) & ~_umask())


def save_model_folder(
    folder: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config,
    model: torch.nn.Module | type,
    *,
    dtype: torch.dtype | None = None,
    tokenizer=None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    describe: Callable[[str], str] = lambda key: key,
) -> list[str]:
    """Write a ``from_pretrained``-loadable folder: weights, tokenizer, generation config, config.

    ``config.json`` is written last, so a folder cut short by a crash never loads. Write into the
    folder from :func:`atomic_output_dir` to also keep a half-written folder out of sight.

    Args:
        model: the model class, or an instance of it (a meta-device one is enough); it gives the
            ``architectures`` entry and the generation config.
        dtype: cast floating-point weights to it; None keeps the checkpoint's dtype.
        describe: the original name of one of our keys, for warnings (see :func:`write_safetensors`).

    Returns:
        The names of the files written.
    """
    folder = Path(folder)
    config = copy.deepcopy(config)  # architectures and dtype are set on a copy, not the caller's config
    model_cls = model if isinstance(model, type) else type(model)
    written = write_safetensors(state_dict, folder, dtype=dtype, max_shard_size=max_shard_size, progress=progress,
                                describe=describe)
    if tokenizer is not None:
        written += [Path(name).name for name in tokenizer.save_pretrained(folder)]
    if model_cls.can_generate():
        from transformers import GenerationConfig

        generation_config = getattr(model, "generation_config", None) if not isinstance(model, type) else None
        if generation_config is None:
            generation_config = GenerationConfig.from_model_config(config)
        generation_config.save_pretrained(folder)
        written.append("generation_config.json")
    stored = dtype or next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    config.architectures = [model_cls.__name__]
    config.dtype = str(stored).removeprefix("torch.")
    config.save_pretrained(folder)
    written.append("config.json")
    return written


def write_model_folder(
    output_dir: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config,
    model: torch.nn.Module | type,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    **save_options,
) -> Path:
    """:func:`save_model_folder` into ``output_dir``, which appears only once complete (see
    :func:`atomic_output_dir`); ``save_options`` are those of :func:`save_model_folder`."""
    with atomic_output_dir(output_dir, overwrite, inputs) as tmp:
        save_model_folder(tmp, state_dict, config, model, **save_options)
    return Path(output_dir)


# --------------------------------------------------------------------------------------------------
# CPM-Bee
# --------------------------------------------------------------------------------------------------


def default_vocab_file() -> str | None:
    """The CPM-Bee vocabulary shipped in the original ``VisCPM`` package, if that is installed.

    The package is located without importing it (its ``__init__`` loads the whole of VisCPM).
    """
    try:
        spec = importlib.util.find_spec("VisCPM")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location, "cpm_tokenizers", "vocabs", "bee.txt")
        if candidate.is_file():
            return str(candidate)
    return None


def require_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """``path`` as a Path when it is a file; else a ConversionError: ``"{what} {path} not found; {fix}"`` (or
    ``is a directory``)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what} {path} {'is a directory' if path.is_dir() else 'not found'}; {fix}")
    return path


def load_config(config_class, config, what: str, expected: str, from_original: Callable[[dict], object],
                sizes: Mapping[str, str] | None = None):
    """``config_class`` from: nothing (its defaults, the released model), an instance, a dict, or a JSON file.

    A dict or file holds the original's keys (read by ``from_original``) or is one of ours (with its
    ``model_type``). ``what`` names the config in errors and ``expected`` says what the file should hold.
    ``sizes`` maps our fields that must be positive numbers (integers, or reals where the default is one) to the
    original key, which messages name when the config used the original keys.

    Raises:
        ConversionError: the file is missing or not JSON, or the content does not fit ``config_class``.
    """
    if config is None:
        return config_class()
    sizes = sizes or {}
    source, names = what, {}
    if not isinstance(config, (Mapping, config_class)):
        path = require_file(config, what, f"pass {expected}")
        source = str(path)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConversionError(f"{what} {path} is not a text file; pass {expected}") from None
        except json.JSONDecodeError as error:
            raise ConversionError(f"{what} {path} is not valid JSON ({error})") from None
        if not isinstance(config, dict):
            raise ConversionError(f"{what} {path} holds a JSON {type(config).__name__}, not an object")
    try:
        if isinstance(config, config_class):
            loaded = config
        elif "model_type" in config:
            if config["model_type"] != config_class.model_type:
                raise ValueError(f"model_type is {config['model_type']!r}, not {config_class.model_type!r}")
            loaded = config_class.from_dict(dict(config))
        else:
            loaded, names = from_original(dict(config)), sizes
        _check_sizes(loaded, config_class(), sizes, names)
        return loaded
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{source}: {first_line(error)}") from None


def _check_sizes(config, default, sizes: Iterable[str], names: Mapping[str, str]) -> None:
    """Raise ValueError naming every field of ``sizes`` that is not a positive number of the default's kind."""
    bad = []
    for field in sizes:
        value = getattr(config, field, None)
        real = isinstance(getattr(default, field, None), float)
        if isinstance(value, bool) or not isinstance(value, (int, float) if real else int) or not 0 < value < math.inf:
            bad.append(f"{names.get(field, field)}={value!r} (must be a positive {'number' if real else 'whole number'})")
    if bad:
        raise ValueError(f"{', '.join(bad)}; fix the config")


class ScriptArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts (and the ``viscpm`` command): a usage error is one line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def converter_parser(
    prog: str | None, description: str, checkpoint_help: str, model_options: Mapping[str, Mapping]
) -> ScriptArgumentParser:
    """The command line of a converter: ``--checkpoint``, ``--output-dir``, then ``model_options`` (``{flag:
    add_argument keywords}``, the model's own), then the options every converter has (``--vocab-file``,
    ``--dtype``, ``--overwrite``, ``--no-progress``), which :func:`run_converter` passes on."""
    parser = ScriptArgumentParser(prog=prog, description=description)
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--output-dir", required=True, help="folder to create (must not exist or be empty)")
    for flag, keywords in model_options.items():
        parser.add_argument(flag, **keywords)
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


class _ScriptLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def run_converter(convert: Callable[..., Path], args: argparse.Namespace, **options) -> int:
    """Run ``convert(checkpoint, output_dir, ..., **options)`` for a command-line script; return its exit status.

    ``args`` come from :func:`converter_parser`: its common options are passed on, ``options`` are the model's
    own. Every failure is one line on stderr with status 1 (130 when interrupted), never a traceback; without
    ``--vocab-file`` the vocabulary of the installed original package is used. What the converters log (which
    keys were dropped; ``warning: ...`` for NaN weights) goes to stderr, one line each.
    """
    vocab_file = args.vocab_file or default_vocab_file()
    if vocab_file is None:
        print(
            "error: no vocabulary found: pass --vocab-file bee.txt (the CPM-Bee vocabulary; it ships in the "
            "original VisCPM package as VisCPM/cpm_tokenizers/vocabs/bee.txt)",
            file=sys.stderr,
        )
        return 1
    package_logger = logging.getLogger(__name__.rpartition(".")[0])  # viscpm.conversion: every converter's logger
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ScriptLogFormatter())
    package_logger.addHandler(handler)
    level = package_logger.level
    package_logger.setLevel(logging.INFO)
    try:
        output = convert(args.checkpoint, args.output_dir, vocab_file=vocab_file, dtype=args.dtype,
                         overwrite=args.overwrite, progress=not args.no_progress, **options)
    except (ConversionError, OSError) as error:  # OSError: disk full, permission denied, ... while writing
        print(f"error: {error}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory while converting; free memory or use a machine with more", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)
    print(f"wrote {output}")
    return 0
