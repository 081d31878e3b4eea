#!/usr/bin/env python
"""Upload a converted VisCPM folder (Chat, Paint, CPM-Bee) or a language adapter to the Hugging Face Hub.

    python conversion/push_to_hub.py viscpm-chat-hf me/viscpm-chat-hf \\
        [--private] [--revision BRANCH] [--commit-message MSG] [--create-pr] \\
        [--source-checkpoint viscpm_chat_balance_checkpoint.pt] [--language zh --language en] \\
        [--include-dotfiles] [--dry-run | --stage-dir DIR [--overwrite]]

The repo gets the folder's files, the model-definition files from `modeling/` with `auto_map` entries (so it loads
with `trust_remote_code=True` where viscpm is not installed) and a generated model card (YAML metadata, what the
model is, usage for this repo, the source checkpoint and its sha256). Everything goes up in one commit, with the
token from `HF_TOKEN` or the login cache (`hf auth login`).

`--dry-run` prints the file list and the card without touching the network; `--stage-dir DIR` writes the exact
folder that would be uploaded and uploads nothing.

Nothing from outside the folder is read: a link to a file inside the folder is uploaded as that file, but a link
that points outside the folder (to a key, to /etc/...), nowhere, or to a folder makes the push (and `--dry-run`,
`--stage-dir`) stop with an error that lists the links, before anything is staged or sent; replace such a link
with a copy of what it points to, or remove it. (Refusing rather than skipping: a skipped link would publish an
incomplete model without anyone noticing.) Hidden files and folders (`.env`, `.secrets/`, ...) are left out, with a
note, unless `--include-dotfiles`; `.git`, `.cache` and unfinished conversions are never uploaded. Repo ids are
checked with huggingface_hub's own rules before anything else.

How it works: A converted folder (VisCPM-Chat, VisCPM-Paint, CPM-Bee) or a peft language adapter is turned into an *upload plan*:
the exact files of the repo, each taken from the folder as is (weights) or rewritten (configs with ``auto_map``),
plus the model-definition files from ``modeling/`` (remote code) and a generated model card. The plan is then
printed (``--dry-run``), written to a folder (``--stage-dir``) or committed with ``huggingface_hub``.

For Chat and CPM-Bee, ``auto_map`` entries go into ``config.json``, ``processor_config.json`` and
``tokenizer_config.json`` and the code files sit at the repo root, so in an environment with only
transformers::

    AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
    AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    pipeline("image-text-to-text", model=repo, trust_remote_code=True)

For Paint, ``model_index.json`` names the pipeline as ``["pipeline_viscpm_paint", "VisCPMPaintPipeline"]`` with
that file at the root, and each of our components as ``["module_file", "Class"]`` with the file (and the files it
imports) in the component's folder, so ``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`` works.

Nothing here changes the classes of the running process (no ``register_for_auto_class``): the plan is built from
the folder's JSON files and the source files of :mod:`viscpm.modeling`.

Exit status: 0 on success, 1 on an error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm

from viscpm import modeling
from viscpm.conversion.common import (  # noqa: F401  (file_sha256, SOURCE_INFO_FILE: also this module's names)
    CHECKPOINT_SUFFIXES,
    SOURCE_INFO_FILE,
    ConversionError,
    ScriptArgumentParser,
    atomic_output_dir,
    file_sha256,
    first_line,
    is_within,
    shorten,
)

__all__ = [
    "HubError",
    "UploadPlan",
    "build_model_card",
    "code_closure",
    "collect_folder_files",
    "detect_kind",
    "file_sha256",
    "main",
    "prepare_upload",
    "push_to_hub",
    "stage_upload",
]

MODELING_DIR = Path(modeling.__file__).resolve().parent
"""The model-definition files; they ship to the Hub as remote code."""

ORIGINAL_REPO = "https://github.com/OpenBMB/VisCPM"
LICENSE_LINK = "https://github.com/OpenBMB/General-Model-License/blob/main/%E9%80%9A%E7%94%A8%E6%A8%A1%E5%9E%8B%E8%AE%B8%E5%8F%AF%E5%8D%8F%E8%AE%AE-%E6%9D%A5%E6%BA%90%E8%AF%B4%E6%98%8E-%E5%AE%A3%E4%BC%A0%E9%99%90%E5%88%B6-%E5%95%86%E4%B8%9A%E6%8E%88%E6%9D%83.md"
"""The VisCPM weights are under OpenBMB's General Model License (the code is Apache-2.0)."""

_IGNORED = re.compile(r"(^|/)(\.git|\.cache|__pycache__|\.[^/]*\.partial-[^/]*|\.[^/]*\.old-[^/]*)(/|$)|\.lock$|\.pyc$")
_LINK_THRESHOLD = 16 << 20
_ALLOWED_IMPORTS = {"torch", "transformers", "diffusers", "numpy", "PIL", "safetensors", "huggingface_hub"}


class HubError(Exception):
    """Something is wrong with what the user gave (a folder, a repo id, an option); the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Remote code
# --------------------------------------------------------------------------------------------------


def _module_of(class_name: str) -> str:
    """The file (module name, no ``.py``) of ``viscpm.modeling`` that defines ``class_name``."""
    name = modeling._EXPORTS.get(class_name)
    if name is None:
        raise HubError(f"no file of {MODELING_DIR} defines {class_name}")
    return name


def code_closure(modules: list[str]) -> list[str]:
    """The ``.py`` files of ``modeling/`` that ``modules`` need: themselves and everything they import relatively.

    Each file is checked to import only the standard library, torch, transformers, diffusers (and numpy/PIL) and
    its siblings through flat relative imports, since that is all a remote-code loader provides.

    Raises:
        HubError: a file is missing, or imports something a user without viscpm may not have.
    """
    todo, seen = list(modules), []
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        path = MODELING_DIR / f"{name}.py"
        if not path.is_file():
            raise HubError(f"remote code file {path} not found")
        seen.append(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or not node.module or "." in node.module:
                    raise HubError(f"{path.name} has `from {'.' * node.level}{node.module or ''} import ...`: remote "
                                   "code only follows flat relative imports (`from .module import name`)")
                todo.append(node.module)
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for full in names:
                top = full.split(".")[0]
                if top not in _ALLOWED_IMPORTS and top not in sys.stdlib_module_names:
                    raise HubError(f"{path.name} imports {full}, which a user loading the repo with "
                                   "trust_remote_code may not have; modeling/ may import only torch/transformers/"
                                   "diffusers and its own files")
    return [f"{name}.py" for name in seen]


def _auto_ref(class_name: str) -> str:
    return f"{_module_of(class_name)}.{class_name}"


# --------------------------------------------------------------------------------------------------
# What a folder is
# --------------------------------------------------------------------------------------------------


KINDS = ("chat", "paint", "cpmbee", "adapter")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise HubError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "") or "nothing"


def detect_kind(folder: str | os.PathLike) -> str:
    """``"chat"``, ``"paint"``, ``"cpmbee"`` or ``"adapter"``, from the folder's configs.

    Raises:
        HubError: the folder is missing, or is none of these (the message lists what it holds).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder" if folder.exists() else f"{folder} not found (check the path)")
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "model_index.json").is_file():
        name = _read_json(folder / "model_index.json").get("_class_name")
        name = name[-1] if isinstance(name, list) else name
        if name == "VisCPMPaintPipeline":
            return "paint"
        raise HubError(f"{folder}/model_index.json is a {name} pipeline, not VisCPMPaintPipeline")
    if (folder / "config.json").is_file():
        model_type = _read_json(folder / "config.json").get("model_type")
        if model_type in ("viscpm_chat", "cpmbee"):
            return "chat" if model_type == "viscpm_chat" else "cpmbee"
        raise HubError(f"{folder}/config.json has model_type {model_type!r}; expected viscpm_chat or cpmbee")
    if any(folder.glob("*/adapter_config.json")):  # a Paint adapter: one peft folder per component
        return "adapter"
    if any(p.suffix in CHECKPOINT_SUFFIXES for p in folder.iterdir()):
        hint = "; it looks like an original checkpoint: convert it first (conversion/convert_viscpm_*.py)"
    else:
        hint = ""
    raise HubError(
        f"{folder} is not a converted VisCPM folder: it has {_listing(folder)}; expected config.json "
        f"(Chat / CPM-Bee), model_index.json (Paint) or adapter_config.json (a peft adapter){hint}"
    )


# --------------------------------------------------------------------------------------------------
# The upload plan
# --------------------------------------------------------------------------------------------------


def collect_folder_files(folder: str | os.PathLike, include_dotfiles: bool = False) -> tuple[dict[str, Path], dict]:
    """The files of ``folder`` to upload, ``{path_in_repo: file}``, and those left out, ``{path_in_repo: reason}``.

    Only what lies inside the folder is ever read: a link to a file inside it stands for that file (the plan holds
    the file it points to), while a link that points outside, nowhere or to a folder is refused (see the module
    docstring). Hidden entries (a name starting with ".") are left out unless ``include_dotfiles``; ``.git``,
    ``.cache``, ``__pycache__``, lock files and unfinished conversions always are.

    Raises:
        HubError: the folder holds links that would read from outside it (all of them are named).
    """
    root = Path(folder).resolve()
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    refused: list[str] = []
    for here, dirnames, filenames in os.walk(root):  # linked folders are listed, never entered
        kept_dirs = []
        for entry in sorted(dirnames) + sorted(filenames):
            path = Path(here, entry)
            name = path.relative_to(root).as_posix()
            if _IGNORED.search(name):
                continue
            if entry.startswith(".") and not include_dotfiles:
                skipped[name] = "hidden"
                continue
            if path.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    refused.append(f"{name} -> {os.readlink(path)} (points nowhere)")
                    continue
                if not is_within(target, root):
                    refused.append(f"{name} -> {target} (outside the folder)")
                elif target.is_dir():
                    refused.append(f"{name} -> {target} (a folder)")
                elif target.is_file():
                    files[name] = target
                else:
                    skipped[name] = "not a regular file"
            elif path.is_dir():
                kept_dirs.append(entry)
            elif path.is_file():
                files[name] = path
            else:
                skipped[name] = "not a regular file"
        dirnames[:] = kept_dirs
    files.pop(SOURCE_INFO_FILE, None)  # its content goes into the model card
    if refused:
        raise HubError(
            f"{folder} has {len(refused)} link(s) that a push will not follow: {shorten(refused, 3)}; only files "
            "inside the folder are uploaded: replace each link with a copy of what it points to, or remove it"
        )
    return files, skipped


@dataclass
class UploadPlan:
    """The files of the repo: ``path_in_repo -> Path`` (a file of the folder, uploaded as is) or ``bytes``; and what
    of the folder is left out, ``path_in_repo -> reason``."""

    kind: str
    repo_id: str
    folder: Path
    files: dict[str, Path | bytes] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """What the user should know about the files left out (one line each)."""
        hidden = [name for name, why in self.skipped.items() if why == "hidden"]
        other = [f"{name} ({why})" for name, why in self.skipped.items() if why != "hidden"]
        lines = []
        if hidden:
            lines.append(f"not uploading {len(hidden)} hidden file(s)/folder(s): {shorten(hidden)}; pass "
                         "--include-dotfiles to upload them")
        if other:
            lines.append(f"not uploading {shorten(other)}")
        return lines

    def check_inside_folder(self) -> None:
        """Refuse a plan whose files are no longer plain files inside the folder (changed since it was made, or a
        plan built by hand): nothing from outside the folder is staged or sent.

        Raises:
            HubError: naming the files.
        """
        outside = [name for name, content in self.files.items() if isinstance(content, Path)
                   and content.parent != MODELING_DIR
                   and (content.is_symlink() or not content.is_file() or not is_within(content, self.folder))]
        if outside:
            raise HubError(f"{shorten(sorted(outside), 3)} of the upload no longer lie inside {self.folder} as plain "
                           "files; prepare the upload again")

    def size(self, name: str) -> int:
        content = self.files[name]
        return len(content) if isinstance(content, bytes) else content.stat().st_size

    def describe(self) -> str:
        """One line per file (size, and whether it is generated) and the total."""
        lines = []
        for name in sorted(self.files):
            content = self.files[name]
            origin = "generated" if isinstance(content, bytes) else (
                "model code" if content.parent == MODELING_DIR else "from the folder")
            lines.append(f"{_human(self.size(name)):>10}  {name}  ({origin})")
        total = sum(self.size(name) for name in self.files)
        lines.append(f"{_human(total):>10}  total, {len(self.files)} files -> {self.repo_id}")
        return "\n".join(lines)

    @property
    def card(self) -> str:
        return self.files["README.md"].decode("utf-8")


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def _json_bytes(data: Mapping) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _add_code(files: dict, modules: list[str], prefix: str = "") -> None:
    for name in code_closure(modules):
        files[prefix + name] = MODELING_DIR / name


def _with_auto_map(path: Path, entries: Mapping) -> dict:
    data = _read_json(path)
    data["auto_map"] = {**data.get("auto_map", {}), **entries}
    return data


def _chat_like_plan(folder: Path, files: dict, kind: str) -> None:
    if kind == "chat":
        model_ref = _auto_ref("VisCPMChatForConditionalGeneration")
        config_map = {"AutoConfig": _auto_ref("VisCPMChatConfig"), "AutoModel": model_ref,
                      "AutoModelForImageTextToText": model_ref}
    else:
        config_map = {"AutoConfig": _auto_ref("CpmBeeConfig"), "AutoModel": _auto_ref("CpmBeeModel"),
                      "AutoModelForCausalLM": _auto_ref("CpmBeeForCausalLM")}
    processor_map = {"AutoProcessor": _auto_ref("VisCPMChatProcessor")} if kind == "chat" else {}
    tokenizer_map = {**processor_map, "AutoTokenizer": [_auto_ref("CpmBeeTokenizer"), None]}
    image_map = {"AutoImageProcessor": _auto_ref("VisCPMImageProcessor"), **processor_map}

    files["config.json"] = _json_bytes(_with_auto_map(folder / "config.json", config_map))
    if (folder / "tokenizer_config.json").is_file():
        files["tokenizer_config.json"] = _json_bytes(_with_auto_map(folder / "tokenizer_config.json", tokenizer_map))
    if kind == "chat":
        missing = [n for n in ("processor_config.json", "tokenizer_config.json") if not (folder / n).is_file()]
        if missing:
            raise HubError(f"{folder} has no {' and no '.join(missing)}: convert it with --vocab-file so that the "
                           "processor is saved (AutoProcessor and the pipeline need it)")
        data = _with_auto_map(folder / "processor_config.json", processor_map)
        if isinstance(data.get("image_processor"), dict):
            data["image_processor"]["auto_map"] = {**data["image_processor"].get("auto_map", {}), **image_map}
        files["processor_config.json"] = _json_bytes(data)
        if (folder / "preprocessor_config.json").is_file():
            files["preprocessor_config.json"] = _json_bytes(
                _with_auto_map(folder / "preprocessor_config.json", image_map))
    modules = {ref.split(".")[0] for entry in (config_map, tokenizer_map, image_map if kind == "chat" else {})
               for value in entry.values() for ref in (value if isinstance(value, list) else [value]) if ref}
    _add_code(files, sorted(modules))


def _paint_plan(folder: Path, files: dict) -> None:
    index = _read_json(folder / "model_index.json")
    pipeline_module = _component_entry(files, "", _module_of("VisCPMPaintPipeline"), "VisCPMPaintPipeline")
    index["_class_name"] = [pipeline_module, "VisCPMPaintPipeline"]
    for component, value in list(index.items()):
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
            continue
        library, class_name = value
        if not library.startswith("viscpm"):  # diffusers / transformers parts load from their libraries
            continue
        module = _module_of(class_name)
        index[component] = [_component_entry(files, component, module, class_name), class_name]
        sub = folder / component
        if (sub / "config.json").is_file() and class_name == "VisCPMPaintTextEncoder":
            files[f"{component}/config.json"] = _json_bytes(_with_auto_map(sub / "config.json", {
                "AutoConfig": _auto_ref("VisCPMPaintTextEncoderConfig"), "AutoModel": _auto_ref(class_name)}))
        if (sub / "tokenizer_config.json").is_file() and class_name == "CpmBeeTokenizer":
            files[f"{component}/tokenizer_config.json"] = _json_bytes(_with_auto_map(
                sub / "tokenizer_config.json", {"AutoTokenizer": [_auto_ref(class_name), None]}))
    files["model_index.json"] = _json_bytes(index)


def _direct_imports(module: str) -> list[str]:
    tree = ast.parse((MODELING_DIR / f"{module}.py").read_text(encoding="utf-8"))
    return [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1]


def _component_entry(files: dict, component: str, module: str, class_name: str) -> str:
    """Put ``module`` and what it imports into the component folder (``""``: the repo root, for the pipeline);
    return the module diffusers should load.

    diffusers copies a local component's module together with its *direct* relative imports only (from the Hub
    it follows them all), so when ``module`` needs files through another file, a small generated entry module
    that imports every needed file directly is what ``model_index.json`` names.
    """
    closure = [name[:-3] for name in code_closure([module])]
    prefix = f"{component}/" if component else ""
    _add_code(files, [module], prefix=prefix)
    if set(closure) <= {module, *_direct_imports(module)}:
        return module
    entry = f"{module}_entry"
    lines = [f'"""Entry point for diffusers remote code: imports every file `{module}` needs (generated by viscpm)."""',
             ""]
    lines += [f"from .{name} import *  # noqa: F401,F403" for name in reversed(closure) if name != module]
    lines += [f"from .{module} import {class_name}  # noqa: F401", ""]
    files[f"{prefix}{entry}.py"] = "\n".join(lines).encode("utf-8")
    return entry


def _source_info(folder: Path, source_checkpoint: str | os.PathLike | None) -> dict | None:
    if source_checkpoint is not None:
        path = Path(source_checkpoint)
        if not path.is_file():
            raise HubError(f"--source-checkpoint {path} not found (pass the original .pt file it was converted from)")
        return {"file": path.name, "sha256": file_sha256(path)}
    if (folder / SOURCE_INFO_FILE).is_file():
        return _read_json(folder / SOURCE_INFO_FILE)
    return None



def prepare_upload(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    kind: str | None = None,
    source_checkpoint: str | os.PathLike | None = None,
    language: str | list[str] | None = None,
    base_model: str | None = None,
    include_dotfiles: bool = False,
) -> UploadPlan:
    """The files a push of ``folder`` to ``repo_id`` would upload, model card and remote code included.

    Args:
        kind: ``"chat"``, ``"paint"``, ``"cpmbee"`` or ``"adapter"``; None detects it (see :func:`detect_kind`).
        source_checkpoint: the original file the folder was converted from; the card names it and its sha256
            (default: what the folder's ``viscpm_source.json`` says, if it has one).
        language: the card's languages (default ``["zh", "en"]``; for an adapter, the language it adds).
        base_model: the card's base model (default: the official repo, or an adapter's ``base_model_name_or_path``).
        include_dotfiles: also upload hidden files and folders (``.env``, ...); see :func:`collect_folder_files`.

    Raises:
        HubError: the folder or an option is not usable (a repo id huggingface_hub rejects, links that point outside
            the folder, ...); the message says why.
    """
    folder = Path(folder)
    _check_repo_id(repo_id)
    files, skipped = collect_folder_files(folder, include_dotfiles) if folder.is_dir() else ({}, {})
    detected = detect_kind(folder)
    if kind is not None and kind != detected:
        raise HubError(f"{folder} is a {detected} folder, not {kind}")
    plan = UploadPlan(detected, repo_id, folder.resolve(), dict(files), skipped)
    if detected in ("chat", "cpmbee"):
        _chat_like_plan(folder, plan.files, detected)
    elif detected == "paint":
        _paint_plan(folder, plan.files)
    source = _source_info(folder, source_checkpoint)
    plan.files["README.md"] = build_model_card(
        detected, repo_id, source=source, language=language, base_model=base_model, folder=folder).encode("utf-8")
    return plan


def _check_repo_id(repo_id: str) -> None:
    """huggingface_hub's own rules (letters, digits, ``-_.``, at most 96 characters, no ``--``/``..``, no ``.git``
    ending, ...), so that ``--dry-run`` and ``--stage-dir`` refuse what a push would."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"{repo_id!r} is not a Hub repo id: {first_line(error)} (expected NAME or OWNER/NAME, e.g. "
                       "me/viscpm-chat-hf)") from None


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------

_CARD_META = {
    "chat": dict(pipeline_tag="image-text-to-text", library_name="transformers", base_model="openbmb/VisCPM-Chat",
                 tags=["viscpm", "cpm-bee", "beit3", "multimodal", "image-text-to-text", "custom_code"]),
    "paint": dict(pipeline_tag="text-to-image", library_name="diffusers", base_model="openbmb/VisCPM-Paint",
                  tags=["viscpm", "cpm-bee", "stable-diffusion", "text-to-image", "custom_code"]),
    "cpmbee": dict(pipeline_tag="text-generation", library_name="transformers", base_model="openbmb/cpm-bee-10b",
                   tags=["cpm-bee", "text-generation", "custom_code"]),
    "adapter": dict(pipeline_tag=None, library_name="peft", base_model=None, tags=["viscpm", "peft", "lora"]),
}

_CARD_WHAT = {
    "chat": "VisCPM-Chat, a Chinese-English multimodal chat model: a BEiT-3 vision encoder whose 64 query outputs "
            "are mapped into the CPM-Bee 10B language model. Converted to a native transformers model that "
            "answers exactly as the original implementation for the same weights.",
    "paint": "VisCPM-Paint, a Chinese-English text-to-image model: Stable Diffusion 2.1 conditioned on CPM-Bee 10B. "
             "Converted to a diffusers pipeline that draws the same images as the original implementation for "
             "the same weights, settings and generator.",
    "cpmbee": "CPM-Bee, a Chinese-English bilingual language model, as a native transformers model.",
    "adapter": "A peft (LoRA) language adapter for VisCPM: it teaches the model to answer / draw from prompts in "
               "another language.",
}


def _usage(kind: str, repo_id: str, base_model: str | None) -> str:
    if kind == "chat":
        return f'''```python
# With only transformers installed (the model code ships with this repo):
from PIL import Image
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{repo_id}", trust_remote_code=True)
out = pipe(images=Image.open("photo.jpg"), text="这张图片里有什么？", return_full_text=False)
print(out[0]["generated_text"])

# The model and the processor on their own:
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

# With viscpm installed (pip install viscpm-hf): the original chat() interface
from viscpm import VisCPMChat

chat = VisCPMChat.from_pretrained("{repo_id}")
answer, context, vision_hidden_states = chat.chat(Image.open("photo.jpg"), "这张图片里有什么？")
```'''
    if kind == "paint":
        return f'''```python
# With only diffusers and transformers installed (the pipeline code ships with this repo):
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
image = pipe("一只可爱的橘猫坐在窗台上", generator=torch.Generator().manual_seed(0)).images[0]
image.save("cat.png")

# With viscpm installed (pip install viscpm-hf): the original interface
from viscpm import VisCPMPaint

painter = VisCPMPaint.from_pretrained("{repo_id}")
painter.generate("一只可爱的橘猫坐在窗台上").save("cat.png")
```'''
    if kind == "cpmbee":
        return f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
```'''
    base = base_model or "BASE_MODEL"
    return f'''```python
from peft import PeftModel
from transformers import AutoModelForImageTextToText

base = AutoModelForImageTextToText.from_pretrained("{base}", trust_remote_code=True)
model = PeftModel.from_pretrained(base, "{repo_id}")
```'''


def build_model_card(
    kind: str,
    repo_id: str,
    *,
    source: Mapping | None = None,
    language: str | list[str] | None = None,
    base_model: str | None = None,
    folder: str | os.PathLike | None = None,
) -> str:
    """The ``README.md`` of the repo: YAML metadata, what the model is, usage for this repo, provenance."""
    if kind not in KINDS:
        raise HubError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    meta = dict(_CARD_META[kind])
    if kind == "adapter" and base_model is None and folder is not None:
        configs = [Path(folder) / "adapter_config.json", *sorted(Path(folder).glob("*/adapter_config.json"))]
        for config in configs:
            if config.is_file():
                base_model = _read_json(config).get("base_model_name_or_path") or None
                break
    base_model = base_model or meta.pop("base_model")
    meta.pop("base_model", None)
    languages = [language] if isinstance(language, str) else list(language or ["zh", "en"])
    data = ModelCardData(
        license="other",
        license_name="general-model-license",
        license_link=LICENSE_LINK,
        language=languages,
        library_name=meta["library_name"],
        pipeline_tag=meta["pipeline_tag"],
        base_model=base_model,
        tags=meta["tags"] + ([f"language:{code}" for code in languages] if kind == "adapter" else []),
    )
    if source:
        origin = f"Converted from the original checkpoint `{source.get('file')}`"
        if source.get("repo"):
            origin += f" of [{source['repo']}](https://huggingface.co/{source['repo']})"
            if source.get("revision"):
                origin += f" (revision `{source['revision']}`)"
        origin += f", sha256 `{source.get('sha256', 'unknown')}`"
        origin += ", with viscpm-hf's converter."
    elif kind == "adapter":
        origin = "Trained with viscpm-hf's language-adapter recipe" + (f" on top of `{base_model}`." if base_model
                                                                         else ".")
    else:
        origin = "Converted with viscpm-hf from an original VisCPM checkpoint (the source file was not recorded)."
    title = repo_id.split("/")[-1]
    return f"""---
{data.to_yaml()}
---

# {title}

{_CARD_WHAT[kind]}

## Usage

{_usage(kind, repo_id, base_model)}

## Provenance

{origin}
The original model and code are by OpenBMB: [{ORIGINAL_REPO}]({ORIGINAL_REPO}). The weights are under OpenBMB's
General Model License ([text]({LICENSE_LINK})); read it before commercial use.
"""


# --------------------------------------------------------------------------------------------------
# Staging and pushing
# --------------------------------------------------------------------------------------------------


def stage_upload(plan: UploadPlan, stage_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the exact repo ``plan`` describes into ``stage_dir`` (weights hard-linked where possible, else
    copied); the folder appears only once complete.

    Raises:
        HubError: ``stage_dir`` exists and is not empty (unless ``overwrite``), cannot be written, or overlaps the
            folder (staging into it, or replacing a folder that holds it, would change what is being pushed).
    """
    if is_within(stage_dir, plan.folder) or is_within(plan.folder, stage_dir):
        raise HubError(f"--stage-dir {stage_dir} and the folder {plan.folder} overlap (one holds the other); "
                       "stage into a folder outside it")
    plan.check_inside_folder()
    try:
        with atomic_output_dir(stage_dir, overwrite) as tmp:
            for name, content in tqdm(sorted(plan.files.items()), desc="staging", unit="file",
                                      disable=len(plan.files) < 50):
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                    continue
                if content.stat().st_size >= _LINK_THRESHOLD and content.parent != MODELING_DIR:
                    try:  # weights: a hard link costs no disk space or time
                        os.link(content, target)
                        continue
                    except OSError:
                        pass
                shutil.copyfile(content, target)
    except ConversionError as error:
        raise HubError(str(error)) from None
    return Path(stage_dir)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    plan: UploadPlan | None = None,
    **plan_options,
):
    """Create ``repo_id`` if needed and commit the folder's upload plan to it in one commit.

    The token is ``token``, else ``HF_TOKEN``, else the login cache (``hf auth login``). With ``revision``, the
    commit goes to that branch (created from main if missing); with ``create_pr``, it opens a pull request.

    Returns:
        huggingface_hub's ``CommitInfo`` (``commit_url``, ``pr_url``, ...).
    """
    plan = plan or prepare_upload(folder, repo_id, **plan_options)
    plan.check_inside_folder()
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content))
        for name, content in sorted(plan.files.items())
    ]
    message = commit_message or f"Upload {plan.kind} model converted with viscpm-hf"
    return api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ScriptArgumentParser(
        prog=prog,
        description="Upload a converted VisCPM-Chat / VisCPM-Paint / CPM-Bee folder or a language adapter to the "
                    "Hugging Face Hub, with its model card and the code to load it without viscpm.",
    )
    parser.add_argument("folder", help="the converted folder (or adapter folder)")
    parser.add_argument("repo_id", help="the Hub repo, e.g. me/viscpm-chat-hf (created if missing)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    parser.add_argument("--revision", help="branch to commit to (created if missing); default: main")
    parser.add_argument("--commit-message", help="the commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--dry-run", action="store_true", help="print the file list and the card; no network")
    parser.add_argument("--stage-dir", help="write the exact folder that would be uploaded here; upload nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --stage-dir")
    parser.add_argument("--source-checkpoint", help="the original .pt it was converted from (sha256 in the card)")
    parser.add_argument("--language", action="append", help="language code for the card (repeatable)")
    parser.add_argument("--base-model", help="the card's base model (default: the official repo / the adapter's)")
    parser.add_argument("--include-dotfiles", action="store_true",
                        help="also upload hidden files and folders (.env, ...); left out by default")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``push_to_hub.py`` / ``viscpm push``: 0 on success, 1 on an error (one line on stderr), 2 on bad usage."""
    args = build_parser(prog).parse_args(argv)
    try:
        plan = prepare_upload(args.folder, args.repo_id, source_checkpoint=args.source_checkpoint,
                              language=args.language, base_model=args.base_model,
                              include_dotfiles=args.include_dotfiles)
        for note in plan.notes():
            print(f"note: {note}", file=sys.stderr)
        if args.dry_run:
            print(plan.describe())
            print()
            print(plan.card)
            return 0
        if args.stage_dir:
            print(f"staged {stage_upload(plan, args.stage_dir, args.overwrite)} ({len(plan.files)} files)")
            return 0
        info = push_to_hub(args.folder, args.repo_id, plan=plan, private=args.private, revision=args.revision,
                           commit_message=args.commit_message, create_pr=args.create_pr)
    except (HubError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except HfHubHTTPError as error:  # 401, 403, 404, ... as one line
        print(f"error: the Hub refused the upload: {first_line(error)}", file=sys.stderr)
        return 1
    print(f"pushed {args.repo_id}: {getattr(info, 'pr_url', None) or getattr(info, 'commit_url', info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
