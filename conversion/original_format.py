"""Load the original openbmb checkpoints in one line: fetch, convert once into a cache folder, load from there.

    VisCPMChat.from_pretrained("openbmb/VisCPM-Chat", variant="balance")
    VisCPMPaint.from_pretrained("openbmb/VisCPM-Paint", variant="zhplus")
    VisCPMChat.from_pretrained("viscpm_chat_balance_checkpoint.pt")

:func:`resolve_original_format` is what their ``from_pretrained`` calls first. A converted folder or repo (one with
``config.json`` / ``model_index.json``) is returned unchanged. A repo, folder or file in the original format
(``torch.save`` state dicts) has the right checkpoint fetched with ``huggingface_hub`` (progress bar, resumable,
shared with the Hub cache), converted with :mod:`~viscpm.conversion.convert_viscpm_chat` / :mod:`~viscpm.conversion.convert_viscpm_paint` into
``<cache>/<entry>``, and that folder is returned; later calls find the entry and convert nothing.

The entry is written in a temporary sibling and renamed into place when complete (an interrupted conversion leaves
no entry), under a file lock (two processes converting the same checkpoint produce one entry; the second waits
and then loads it). The cache lives in ``$VISCPM_CACHE``, else ``<cache_dir>/viscpm-converted`` when
``cache_dir=`` is given, else ``$HF_HOME/viscpm/converted``. What the original checkpoints lack is fetched from its
public repo: the CPM-Bee vocabulary (``openbmb/cpm-bee-10b``, unless the original ``VisCPM`` package is installed)
and, for Paint, the Stable Diffusion 2.1-base VAE and scheduler. Nothing is fetched at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from viscpm.conversion.common import (
    CHECKPOINT_SUFFIXES,
    SOURCE_INFO_FILE,
    ConversionError,
    atomic_output_dir,
    default_vocab_file,
    file_sha256,
    looks_like_repo_id,
)

logger = logging.getLogger(__name__)

__all__ = ["ORIGINAL_REPOS", "OriginalRepo", "converted_cache_dir", "resolve_original_format"]

CONVERSION_OPTIONS = ("llm_config", "vision_config", "query_num", "sd_base", "vocab_file")
"""Keyword arguments of ``from_pretrained`` that go to the converter (and into the cache key), not to the loader."""
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
VOCAB_REPO, VOCAB_FILENAME = "openbmb/cpm-bee-10b", "vocab.txt"
CACHE_FORMAT = 1
"""Bumped when the converters' output changes, so that old cache entries are not reused."""


@dataclass(frozen=True)
class OriginalRepo:
    """An official repo in the original format: which model it holds and its checkpoint file per variant."""

    kind: str
    files: dict
    default: str


ORIGINAL_REPOS = {
    "openbmb/VisCPM-Chat": OriginalRepo(
        "chat",
        {"v1.1": "pytorch_model.v1.bin", "balance": "viscpm_chat_balance_checkpoint.pt",
         "zhplus": "viscpm_chat_zhplus_checkpoint.pt"},
        default="v1.1",
    ),
    "openbmb/VisCPM-Paint": OriginalRepo(
        "paint",
        {"balance": "viscpm_paint_balance_checkpoint.pt", "zhplus": "viscpm_paint_zhplus_checkpoint.pt"},
        default="balance",
    ),
}

_MARKERS = {"chat": "config.json", "paint": "model_index.json"}
_NAMES = {"chat": "VisCPM-Chat", "paint": "VisCPM-Paint"}


# --------------------------------------------------------------------------------------------------
# Finding the checkpoint
# --------------------------------------------------------------------------------------------------


def _pick_checkpoint(files: list[str], variant: str | None, where: str, kind: str, known: OriginalRepo | None) -> str:
    """The checkpoint file among ``files`` (repo-relative names) for ``variant``."""
    if known is not None:
        if variant is None:
            variant = known.default
        if variant not in known.files:
            raise ConversionError(
                f"{where} has no variant {variant!r}; choose one of {', '.join(map(repr, known.files))}")
        return known.files[variant]
    candidates = sorted(name for name in files if name.endswith(CHECKPOINT_SUFFIXES) and "/" not in name)
    if variant is not None:
        candidates = [name for name in candidates if variant.lower() in Path(name).stem.lower()]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(sorted(files)[:12]) or "no files"
    if not candidates:
        wanted = f" whose name contains {variant!r}" if variant is not None else ""
        raise ConversionError(
            f"{where} is neither a converted {_NAMES[kind]} (expected {_MARKERS[kind]}) nor an original checkpoint "
            f"(expected a {'/'.join(CHECKPOINT_SUFFIXES)} file{wanted}); found: {found}"
        )
    raise ConversionError(
        f"{where} holds several original checkpoints ({', '.join(candidates)}); choose one with variant= "
        "(a part of its name) or pass the file itself"
    )


def _hub_options(options: MutableMapping) -> dict:
    return {key: options[key] for key in HUB_OPTIONS if options.get(key) is not None}


def _list_repo(repo_id: str, hub: dict) -> list[str] | None:
    """The repo's files: from the Hub, or from the local Hub cache when offline. None when neither can tell."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not hub.get("local_files_only") and not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().list_repo_files(repo_id, revision=hub.get("revision"), token=hub.get("token"))
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError):
            return None  # from_pretrained reports these in its own words
        except Exception as error:  # offline, timeout, proxy: the cache may still know the repo
            logger.info("cannot list %s on the Hub (%s); looking in the local cache", repo_id, error)
    try:
        snapshot = Path(snapshot_download(repo_id, revision=hub.get("revision"), cache_dir=hub.get("cache_dir"),
                                          local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _download(repo_id: str, filename: str, hub: dict) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, **hub))


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


def converted_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted original checkpoints are kept (see the module docstring)."""
    if os.environ.get("VISCPM_CACHE"):
        return Path(os.environ["VISCPM_CACHE"])
    if cache_dir is not None:
        return Path(cache_dir) / "viscpm-converted"
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "viscpm" / "converted"


def _option_fingerprint(value) -> object:
    """What a conversion option contributes to the cache key: a file's content hash, else the value itself."""
    if isinstance(value, (str, os.PathLike)) and Path(value).is_file() and Path(value).stat().st_size < 1 << 24:
        return hashlib.sha256(Path(value).read_bytes()).hexdigest()
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _source_identity(checkpoint: Path, repo_id: str | None) -> dict:
    """Identifies the checkpoint's content cheaply: the Hub blob (named by its sha256 for large files), else the
    file's path, size and modification time."""
    real = checkpoint.resolve()
    if repo_id is not None and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return {"sha256": real.name}
    stat = real.stat()
    return {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _entry_name(kind: str, label: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{kind}--{re.sub(r'[^A-Za-z0-9_.-]+', '-', label).strip('-.')[:80]}--{digest}"


def _vocab_file(options: dict, hub: dict) -> str:
    vocab = options.get("vocab_file") or default_vocab_file()
    if vocab is None:
        vocab = str(_download(VOCAB_REPO, VOCAB_FILENAME, {k: v for k, v in hub.items() if k != "revision"}))
    return str(vocab)


def _convert(kind: str, checkpoint: Path, output_dir: Path, options: dict, hub: dict) -> None:
    """Run the converter of ``kind`` (the converters validate the checkpoint and refuse other kinds)."""
    common = dict(llm_config=options.get("llm_config"), vocab_file=_vocab_file(options, hub), progress=True)
    if kind == "chat":
        from viscpm.conversion.convert_viscpm_chat import convert_viscpm_chat_checkpoint

        convert_viscpm_chat_checkpoint(checkpoint, output_dir, vision_config=options.get("vision_config"),
                                       query_num=options.get("query_num"), **common)
    else:
        from viscpm.conversion.convert_viscpm_paint import DEFAULT_SD_BASE, convert_viscpm_paint_checkpoint

        convert_viscpm_paint_checkpoint(checkpoint, output_dir, sd_base=options.get("sd_base") or DEFAULT_SD_BASE,
                                        **common)


def _converted(kind: str, checkpoint: Path, options: dict, hub: dict, provenance: dict) -> Path:
    """The cache entry for ``checkpoint``, converting it first if there is none (atomically, under a lock)."""
    from filelock import FileLock, Timeout

    identity = _source_identity(checkpoint, provenance.get("repo"))
    key = {"format": CACHE_FORMAT, "kind": kind, "source": identity,
           "options": {name: _option_fingerprint(options[name]) for name in sorted(options)}}
    label = f"{provenance.get('repo') or ''}-{Path(provenance['file']).stem}"
    root = converted_cache_dir(hub.get("cache_dir"))
    root.mkdir(parents=True, exist_ok=True)
    entry = root / _entry_name(kind, label, key)
    marker = entry / _MARKERS[kind]
    if marker.is_file():
        return entry
    lock = FileLock(str(entry) + ".lock")
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        logger.warning("another process is converting %s; waiting for it to finish", checkpoint)
        lock.acquire()
    try:
        if marker.is_file():  # another process converted it while we waited
            return entry
        logger.warning("converting %s into %s (once; later loads use the converted folder)", checkpoint, entry)
        with atomic_output_dir(entry, overwrite=True) as tmp:
            _convert(kind, checkpoint, tmp / "model", options, hub)
            for child in (tmp / "model").iterdir():
                os.rename(child, tmp / child.name)
            (tmp / "model").rmdir()
            sha = identity.get("sha256") or file_sha256(checkpoint)
            info = {**provenance, "sha256": sha, "kind": kind}
            (tmp / SOURCE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    finally:
        lock.release()
    return entry


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def resolve_original_format(source: str | os.PathLike, kind: str, variant: str | None, options: MutableMapping):
    """What ``from_pretrained`` should load for ``source``: itself, or the converted cache folder of an original one.

    Args:
        source: a converted folder / repo (returned as is), an original checkpoint file, or a folder / Hub repo
            holding original checkpoints (``openbmb/VisCPM-Chat``, ``openbmb/VisCPM-Paint``, or any other).
        kind: ``"chat"`` or ``"paint"``.
        variant: which checkpoint of an original repo or folder (``"v1.1"``, ``"balance"``, ``"zhplus"`` for the
            official repos; elsewhere a part of the file name). For a converted source it is put back into
            ``options`` and so reaches transformers / diffusers as their weights ``variant``.
        options: the caller's ``from_pretrained`` keyword arguments. The conversion options (``llm_config``,
            ``vision_config``, ``query_num``, ``sd_base``, ``vocab_file``) are taken out of it; the Hub options
            (``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download``) are read and left.

    Raises:
        ConversionError: the source is neither format (the message lists what it holds), the variant is unknown,
            or the checkpoint cannot be converted (truncated, unsafe pickle, wrong model, ...).
    """
    if kind not in _MARKERS:
        raise ValueError(f"kind must be 'chat' or 'paint', got {kind!r}")
    conversion = {name: options.pop(name) for name in CONVERSION_OPTIONS if options.get(name) is not None}
    for name in CONVERSION_OPTIONS:
        options.pop(name, None)
    hub = _hub_options(options)
    text = os.fspath(source)
    path = Path(text).expanduser()

    def unchanged():
        if variant is not None:
            options["variant"] = variant
        return source

    if path.is_file():
        return _converted(kind, path, conversion, hub, {"file": path.name})
    if path.is_dir():
        files = sorted(p.relative_to(path).as_posix() for p in path.iterdir() if p.is_file())
        if _MARKERS[kind] in files:
            return unchanged()
        other = next((k for k, m in _MARKERS.items() if k != kind and m in files), None)
        if other is not None:
            raise ConversionError(f"{path} is a converted {_NAMES[other]} folder, not {_NAMES[kind]}")
        name = _pick_checkpoint(files, variant, str(path), kind, None)
        return _converted(kind, path / name, conversion, hub, {"file": name})
    if text.endswith(CHECKPOINT_SUFFIXES) or not looks_like_repo_id(text):
        if text.endswith(CHECKPOINT_SUFFIXES) or text.startswith((".", "/", "~")):
            raise ConversionError(f"{text} not found (check the path)")
        return unchanged()

    known = ORIGINAL_REPOS.get(text)
    if known is not None and known.kind != kind:
        raise ConversionError(f"{text} holds {_NAMES[known.kind]}, not {_NAMES[kind]}; load it with "
                              f"{'VisCPMPaint' if known.kind == 'paint' else 'VisCPMChat'}.from_pretrained")
    files = _list_repo(text, hub)
    if files is None and known is None:
        return unchanged()  # not inspectable: from_pretrained gives its own error (or works from its cache)
    if files is not None and _MARKERS[kind] in files:
        return unchanged()
    if files is not None and known is None:
        other = next((k for k, m in _MARKERS.items() if k != kind and m in files), None)
        if other is not None:
            raise ConversionError(f"{text} is a converted {_NAMES[other]} repo, not {_NAMES[kind]}")
    filename = _pick_checkpoint(files or [], variant, text, kind, known)
    if files is not None and filename not in files:
        raise ConversionError(f"{text} has no {filename} (it has: {', '.join(files[:12]) or 'no files'})")
    checkpoint = _download(text, filename, hub)
    provenance = {"repo": text, "file": filename, "variant": variant or (known.default if known else None)}
    if checkpoint.parent.parent.name == "snapshots":
        provenance["revision"] = checkpoint.parent.name
    return _converted(kind, checkpoint, conversion, hub, provenance)
