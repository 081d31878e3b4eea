"""Language adapters: LoRA fine-tuning of VisCPM for a new language with `peft`, `datasets` and `Trainer`.

The MpM recipe: the visual skills are learnt in one language, and a little data in a new language aligns the
answers' language. Here that is a small LoRA adapter per language on CPM-Bee's projections (optionally with the
query tokens and the mapping trained in full), saved as a standard peft folder (``adapter_config.json`` +
``adapter_model.safetensors`` + a model card naming the base model and the language) and switched at run time.

Chat::

    data = load_conversations("llava_de.jsonl", image_folder="images/")      # LLaVA conversation rows
    processor = AutoProcessor.from_pretrained("viscpm-chat-hf")
    train = prepare_chat_dataset(data, processor)                           # one example per answer turn
    model = AutoModelForImageTextToText.from_pretrained("viscpm-chat-hf")
    train_language_adapter(model, train, "adapter-de", language="de", data_collator=ChatAdapterCollator(processor))

Text only (the "multilingual alignment" stage, no image): :func:`prepare_text_dataset` instead. Paint:
:func:`prepare_paint_dataset`, :class:`PaintAdapterModel`, :func:`train_paint_adapter`. Loading:
:func:`load_language_adapters`, or ``VisCPMChat.from_pretrained(base, adapter=path)``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.image_processing_viscpm import load_image_file, to_rgb
from ..modeling.tokenization_cpmbee import CpmBeeTokenizer

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""CPM-Bee's projections (plain ``nn.Linear``): attention q/k/v/out and the gated FFN."""

QUERY_MODULE = "vision_model.embeddings.position_embedding.query"
"""Where the query tokens are trained. ``query`` is a bare parameter, which peft cannot save as a module; the query
tokens enter the model only as ``query + position_embedding.query.weight[2:2 + n]``, so training that position table
(a module peft can save) gives exactly the same gradients and the same set of functions as training ``query``."""

MAPPING_MODULES = ("mapping.0", "mapping.2")
"""The two linear layers of the vision-to-CPM-Bee mapping (wrapped one by one: the model indexes ``mapping[0]``)."""

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "model")
IMAGE_PLACEHOLDER = "<image>"
SKIP = "skip"
RAISE = "raise"

_TEXT_KEYS = ("input_ids", "segment_ids", "context_mask", "labels")
_IGNORE_INDEX = -100


def _encoding_features() -> dict:
    """`datasets` column types of one tokenizer encoding (the per-example ext table included)."""
    import datasets

    return {
        **{key: datasets.Sequence(datasets.Value("int64")) for key in _TEXT_KEYS},
        "segment_rel": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        "ext_table_ids": datasets.Sequence(datasets.Value("int64")),
        "ext_table_sub": datasets.Sequence(datasets.Value("int64")),
    }


class BadDataError(ValueError):
    """A training row that cannot be used (with ``on_bad_rows="raise"``), or no usable row at all."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading rows
# ---------------------------------------------------------------------------------------------------------------------

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def load_conversations(source: Any, split: str = "train", **load_kwargs):
    """Rows to train on, as a `datasets.Dataset`.

    ``source`` is a `datasets.Dataset` (returned as is), a list of dicts, a JSON / JSONL / parquet / CSV file (or a
    list of them), a folder that ``datasets.load_dataset`` understands (an image folder with ``metadata.jsonl``, or a
    folder of data files) or a Hub dataset id. ``load_kwargs`` go to ``datasets.load_dataset``.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"the dataset has splits {sorted(source)}, not {split!r}")
        return source[split]
    if isinstance(source, (list, tuple)) and source and all(isinstance(row, Mapping) for row in source):
        return datasets.Dataset.from_list([dict(row) for row in source])
    files = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not files:
        raise BadDataError("no data: the source is empty")
    paths = [Path(str(f)).expanduser() for f in files]
    if all(p.is_file() for p in paths):
        suffixes = {p.suffix.lower() for p in paths}
        builders = {_FILE_BUILDERS.get(s) for s in suffixes}
        if None in builders or len(builders) != 1:
            raise ValueError(f"cannot tell the format of {[str(p) for p in paths]}: use .json, .jsonl, .parquet, "
                             ".csv or .arrow files (all of one kind)")
        return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in paths], split=split, **load_kwargs)
    if len(paths) == 1 and paths[0].is_dir():
        return datasets.load_dataset(str(paths[0]), split=split, **load_kwargs)
    missing = [str(p) for p in paths if not p.exists()]
    looks_like_repo = (isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~"))
                       and Path(source).suffix.lower() not in _FILE_BUILDERS)
    if len(files) == 1 and missing and looks_like_repo:
        return datasets.load_dataset(source, split=split, **load_kwargs)  # a Hub dataset id
    raise FileNotFoundError(f"data not found: {', '.join(missing) or source}")


# ---------------------------------------------------------------------------------------------------------------------
# Chat examples
# ---------------------------------------------------------------------------------------------------------------------


def _strip_image_placeholder(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace("\n" + IMAGE_PLACEHOLDER, "").replace(
        IMAGE_PLACEHOLDER, "").strip()


def conversation_turns(conversations: Any) -> list[tuple[str, str, str]]:
    """``(context, question, answer)`` per answer of a LLaVA conversation, texts raw (not escaped).

    ``conversations`` is ``[{"from": "human", "value": q1}, {"from": "gpt", "value": a1}, ...]`` (``role`` /
    ``content`` keys and ``user`` / ``assistant`` roles are accepted too); LLaVA's ``<image>`` marker is removed.
    The context of turn *k* is the history as ``VisCPMChat.chat()`` builds it: ``"User: q\\nAI: a\\n"`` per
    earlier turn. Raises `BadDataError` for an empty or malformed conversation.
    """
    if isinstance(conversations, Mapping) or not isinstance(conversations, Sequence) or isinstance(conversations, str):
        raise BadDataError("conversations must be a list of messages")
    if not conversations:
        raise BadDataError("empty conversation")
    texts = []
    for i, message in enumerate(conversations):
        if not isinstance(message, Mapping):
            raise BadDataError(f"message {i} is not a dict")
        role = message.get("from", message.get("role"))
        value = message.get("value", message.get("content"))
        expected = HUMAN_ROLES if i % 2 == 0 else ASSISTANT_ROLES
        if role not in expected:
            raise BadDataError(f"message {i} is from {role!r}, expected one of {expected} (turns alternate "
                               "human/gpt, starting with the human)")
        if not isinstance(value, str):
            raise BadDataError(f"message {i} has no text value")
        texts.append(_strip_image_placeholder(value))
    if len(texts) % 2:
        raise BadDataError("the conversation ends with an unanswered human message")
    turns, history = [], ""
    for question, answer in zip(texts[0::2], texts[1::2]):
        if not answer:
            raise BadDataError("empty answer")
        turns.append((history, question, answer))
        history += "User: " + question + "\n" + "AI: " + answer + "\n"
    return turns


def chat_training_prompt(question: str, answer: str, context: str = "", query_num: int | None = 64) -> dict:
    """The CPM-Bee dict of one chat turn with its answer, as ``chat()`` asks it: ``{"image": "<unk>" * query_num,
    "context": history, "question": question, "<ans>": answer}`` (texts escaped; no ``image`` key when
    ``query_num`` is None: text only)."""
    escape = CpmBeeTokenizer.escape
    prompt = {} if query_num is None else {"image": "<unk>" * int(query_num)}
    prompt.update({"context": escape(context), "question": escape(question), "<ans>": escape(answer)})
    return prompt


def _encode_training(tokenizer, prompt: dict) -> dict:
    """Training layout of one prompt, unpadded, with its own ext table (merged per batch by the collators)."""
    enc = tokenizer([prompt], return_labels=True)  # a one-item batch: lists of one row
    return {
        "input_ids": enc["input_ids"][0],
        "segment_ids": enc["segment_ids"][0],
        "context_mask": enc["context_mask"][0],
        "labels": enc["labels"][0],
        "segment_rel": enc["segment_rel"][0],
        "ext_table_ids": enc["ext_table_ids"][0],
        "ext_table_sub": enc["ext_table_sub"][0],
    }


def _image_start(segment_ids: list[int]) -> int:
    """First image slot: the token after the image leaf's ``<s>`` (the leaf is segment 2: root, key, leaf)."""
    return segment_ids.index(2) + 1


def _image_reference(value: Any, image_folder: str | None) -> tuple[str | None, bytes | None]:
    """``(path, bytes)`` of an image cell (a path, bytes, a `datasets.Image` dict or a PIL image)."""
    import io

    import PIL.Image

    if isinstance(value, Mapping):
        if value.get("bytes"):
            return None, bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return (None, bytes(value)) if value else (None, None)
    if isinstance(value, PIL.Image.Image):
        buffer = io.BytesIO()
        to_rgb(value).save(buffer, format="PNG")
        return None, buffer.getvalue()
    if isinstance(value, (str, os.PathLike)) and str(value):
        path = Path(str(value)).expanduser()
        if image_folder is not None and not path.is_absolute():
            path = Path(image_folder).expanduser() / path
        return str(path), None
    return None, None


def _check_image(path: str | None, data: bytes | None) -> str:
    """'' when the image opens, else the reason to skip it."""
    if path is None and data is None:
        return "missing image"
    try:
        to_rgb(load_image_file(path if data is None else data))
    except FileNotFoundError:
        return "missing image"
    except (ValueError, OSError):
        return "corrupt image"
    return ""


def _finish(dataset, what: str, on_bad_rows: str, total: int):
    """Drop the rows marked with a skip reason (logging the counts) or raise on the first one."""
    reasons = Counter(reason for reason in dataset["skip_reason"] if reason)
    if reasons:
        if on_bad_rows == RAISE:
            first = next(i for i, reason in enumerate(dataset["skip_reason"]) if reason)
            raise BadDataError(f"{what} row {dataset[first]['row_index']}: {dataset[first]['skip_reason']} "
                               f"({sum(reasons.values())} bad rows in all; pass on_bad_rows='skip' to drop them)")
        logger.warning("skipped %d of %d %s rows: %s", sum(reasons.values()), total, what,
                       ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()))
        dataset = dataset.filter(lambda reason: not reason, input_columns="skip_reason")
    if len(dataset) == 0:
        raise BadDataError(f"no usable {what} examples" + (f" (skipped: {dict(reasons)})" if reasons else ""))
    dataset = dataset.remove_columns("skip_reason")
    dataset.info.description = f"skipped: {dict(reasons)}"
    return dataset


def _check_option(on_bad_rows: str) -> None:
    if on_bad_rows not in (SKIP, RAISE):
        raise ValueError(f"on_bad_rows must be 'skip' or 'raise', got {on_bad_rows!r}")


def _check_not_empty(dataset, what: str) -> None:
    if len(dataset) == 0:
        raise BadDataError(f"no usable {what} examples: the data is empty")


def prepare_chat_dataset(
    dataset,
    processor,
    image_folder: str | os.PathLike | None = None,
    image_column: str = "image",
    conversations_column: str = "conversations",
    max_length: int | None = 2048,
    on_bad_rows: str = SKIP,
    check_images: bool = True,
    num_proc: int | None = None,
):
    """LLaVA conversation rows → one tokenized training example per answer.

    Each turn becomes :func:`chat_training_prompt` (history as ``context``, exactly the prompt ``chat()`` asks at
    that turn, with the answer in place) encoded in CPM-Bee's training layout (``return_labels=True``: labels on
    the answer tokens and its closing ``</s>``, -100 elsewhere). The image stays a reference (``image_path`` or
    ``image_bytes``) that :class:`ChatAdapterCollator` opens per batch.

    Bad rows (a missing or unreadable image, an empty or malformed conversation, an example over ``max_length``
    tokens) are dropped with a count in the log (``on_bad_rows="skip"``) or raise `BadDataError` naming the row
    (``"raise"``); no usable row at all always raises. ``check_images=False`` skips opening every image here (then a
    bad image is an error when its batch is built).
    """
    import datasets

    _check_option(on_bad_rows)
    dataset = load_conversations(dataset)
    _check_not_empty(dataset, "chat")
    for column in (image_column, conversations_column):
        if column not in dataset.column_names:
            raise BadDataError(f"the data has no {column!r} column (columns: {dataset.column_names})")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    tokenizer, query_num = processor.tokenizer, processor.query_num
    folder = None if image_folder is None else str(image_folder)
    total = len(dataset)

    def expand(batch, indices):
        out = {key: [] for key in (*_TEXT_KEYS, "segment_rel", "ext_table_ids", "ext_table_sub", "image_start",
                                   "image_path", "image_bytes", "row_index", "skip_reason")}

        def emit(index, reason, encoded=None, path=None, data=None):
            encoded = encoded or {}
            for key in (*_TEXT_KEYS, "segment_rel", "ext_table_ids", "ext_table_sub"):
                out[key].append(encoded.get(key, []))
            out["image_start"].append(_image_start(encoded["segment_ids"]) if encoded else -1)
            out["image_path"].append(path)
            out["image_bytes"].append(data)
            out["row_index"].append(index)
            out["skip_reason"].append(reason)

        for index, image, conversation in zip(indices, batch[image_column], batch[conversations_column]):
            try:
                turns = conversation_turns(conversation)
            except BadDataError as error:
                emit(index, "empty conversation" if "empty conversation" in str(error) else
                     f"malformed conversation ({error})")
                continue
            path, data = _image_reference(image, folder)
            reason = _check_image(path, data) if check_images else ("" if path or data else "missing image")
            if reason:
                emit(index, reason)
                continue
            for context, question, answer in turns:
                encoded = _encode_training(tokenizer, chat_training_prompt(question, answer, context, query_num))
                if max_length is not None and len(encoded["input_ids"]) > max_length:
                    emit(index, f"longer than max_length={max_length}")
                    continue
                emit(index, "", encoded, path, data)
        return out

    features = datasets.Features({
        **_encoding_features(),
        "image_start": datasets.Value("int64"),
        "image_path": datasets.Value("string"),
        "image_bytes": datasets.Value("binary"),
        "row_index": datasets.Value("int64"),
        "skip_reason": datasets.Value("string"),
    })
    expanded = dataset.map(expand, batched=True, with_indices=True, remove_columns=dataset.column_names,
                           features=features, num_proc=num_proc, desc="chat examples")
    return _finish(expanded, "chat", on_bad_rows, total)


def text_training_prompt(row: Mapping) -> dict:
    """The CPM-Bee dict of one text-only row: LLaVA ``conversations`` are handled by the caller; an instruction row
    (``instruction`` [+ ``input``] + ``output``) becomes ``{"instruction", "input", "<ans>": output}``; a plain
    ``text`` row is all answer (``{"<ans>": text}``: every token is learnt)."""
    escape = CpmBeeTokenizer.escape
    if row.get("output") is not None:
        prompt = {"instruction": escape(str(row.get("instruction") or ""))}
        if row.get("input"):
            prompt["input"] = escape(str(row["input"]))
        prompt["<ans>"] = escape(str(row["output"]))
        return prompt
    return {"<ans>": escape(str(row.get("text") or ""))}


def prepare_text_dataset(
    dataset,
    tokenizer,
    max_length: int | None = 2048,
    on_bad_rows: str = SKIP,
    build_prompt: Callable[[Mapping], dict] | None = None,
    num_proc: int | None = None,
):
    """Text-only rows (the MpM "multilingual alignment" stage: CPM-Bee alone, no image) → training examples.

    A row may be a LLaVA conversation without image (one example per answer, the chat layout without the
    ``image`` key), an instruction (``instruction``, optional ``input``, ``output``) or plain ``text``; or give
    ``build_prompt(row) -> CPM-Bee dict with an "<ans>"`` for another layout. Empty rows and rows over
    ``max_length`` are skipped with a count (or raise, with ``on_bad_rows="raise"``).
    """
    import datasets

    _check_option(on_bad_rows)
    dataset = load_conversations(dataset)
    _check_not_empty(dataset, "text")
    total = len(dataset)
    columns = dataset.column_names

    def expand(batch, indices):
        out = {key: [] for key in (*_TEXT_KEYS, "segment_rel", "ext_table_ids", "ext_table_sub", "row_index",
                                   "skip_reason")}
        rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
        for index, row in zip(indices, rows):
            try:
                if build_prompt is not None:
                    prompts = [build_prompt(row)]
                elif row.get("conversations") is not None:
                    prompts = [chat_training_prompt(q, a, c, query_num=None)
                               for c, q, a in conversation_turns(row["conversations"])]
                else:
                    prompts = [text_training_prompt(row)]
                    if not prompts[0]["<ans>"]:
                        raise BadDataError("empty text")
            except BadDataError as error:
                prompts, reason = [], str(error)
            else:
                reason = ""
            encoded_rows = []
            for prompt in prompts:
                encoded = _encode_training(tokenizer, prompt)
                if max_length is not None and len(encoded["input_ids"]) > max_length:
                    reason = f"longer than max_length={max_length}"
                    continue
                encoded_rows.append(encoded)
            for encoded in encoded_rows or [{}]:
                for key in (*_TEXT_KEYS, "segment_rel", "ext_table_ids", "ext_table_sub"):
                    out[key].append(encoded.get(key, []))
                out["row_index"].append(index)
                out["skip_reason"].append("" if encoded else (reason or "no example"))
        return out

    features = datasets.Features({
        **_encoding_features(),
        "row_index": datasets.Value("int64"),
        "skip_reason": datasets.Value("string"),
    })
    expanded = dataset.map(expand, batched=True, with_indices=True, remove_columns=columns, features=features,
                           num_proc=num_proc, desc="text examples")
    return _finish(expanded, "text", on_bad_rows, total)


# ---------------------------------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------------------------------


def collate_text_features(features: Sequence[Mapping], vocab_size: int, pad_token_id: int,
                          keys: Sequence[str] = _TEXT_KEYS, pad_to_multiple_of: int | None = None) -> dict:
    """Pad separately encoded CPM-Bee examples (right padding) into one batch with one ext table.

    Each example carries its own ext table (ids >= ``vocab_size`` in ``input_ids``/``labels`` are its columns); the
    batch table is their union in example order, deduplicated by (id, sub) — the table the tokenizer builds when it
    encodes the same items together — and the ids are renumbered into it.
    """
    columns: dict[tuple[int, int], int] = {}
    remaps = []
    for feature in features:
        remap = {}
        for k, pair in enumerate(zip(feature["ext_table_ids"], feature["ext_table_sub"])):
            remap[vocab_size + k] = vocab_size + columns.setdefault(tuple(int(v) for v in pair), len(columns))
        remaps.append(remap)
    length = max(len(feature["input_ids"]) for feature in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    fill = {"input_ids": pad_token_id, "segment_ids": 0, "context_mask": 0, "labels": _IGNORE_INDEX}
    batch = {key: [] for key in (*keys, "attention_mask")}
    for feature, remap in zip(features, remaps):
        size = len(feature["input_ids"])
        for key in keys:
            values = [int(v) for v in feature[key]]
            if key in ("input_ids", "labels"):
                values = [remap.get(v, v) for v in values]
            batch[key].append(values + [fill[key]] * (length - size))
        batch["attention_mask"].append([1] * size + [0] * (length - size))
    out = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    segments = max(len(feature["segment_rel"]) for feature in features)
    rel = torch.zeros(len(features), segments, segments, dtype=torch.long)
    for b, feature in enumerate(features):
        n = len(feature["segment_rel"])
        if n:
            rel[b, :n, :n] = torch.tensor([list(r) for r in feature["segment_rel"]], dtype=torch.long)
    out["segment_rel"] = rel
    table = sorted(columns.items(), key=lambda item: item[1])
    out["ext_table_ids"] = torch.tensor([[i for (i, _), _ in table]] * len(features), dtype=torch.long).view(
        len(features), len(table))
    out["ext_table_sub"] = torch.tensor([[s for (_, s), _ in table]] * len(features), dtype=torch.long).view(
        len(features), len(table))
    return out


class ChatAdapterCollator:
    """Batches of :func:`prepare_chat_dataset` (or :func:`prepare_text_dataset`) examples for the model.

    Pads the token features (one merged ext table), opens the images and runs the processor's image processor
    (``pixel_values``), and gives each row's ``image_bound``. Text-only examples give no ``pixel_values``.
    """

    def __init__(self, processor, pad_to_multiple_of: int | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self.query_num = getattr(processor, "query_num", None)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping]) -> dict:
        if not features:
            raise ValueError("empty batch")
        batch = collate_text_features(features, self.tokenizer.vocab_size, self.tokenizer.pad_token_id,
                                      pad_to_multiple_of=self.pad_to_multiple_of)
        with_image = [feature.get("image_start", -1) is not None and feature.get("image_start", -1) >= 0
                      for feature in features]
        if any(with_image):
            if not all(with_image):
                raise ValueError("a batch mixes examples with and without image: train on one kind at a time")
            if self.image_processor is None:
                raise ValueError("image examples need a processor with an image processor")
            images = []
            for feature in features:
                source = feature.get("image_bytes") or feature.get("image_path")
                try:
                    images.append(to_rgb(load_image_file(source)))
                except (OSError, ValueError) as error:
                    raise BadDataError(f"cannot open the image of row {feature.get('row_index')}: {error}") from None
            batch["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
            starts = torch.tensor([int(feature["image_start"]) for feature in features], dtype=torch.long)
            batch["image_bound"] = torch.stack([starts, starts + self.query_num], dim=1)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------------


def lora_target_pattern(target_modules: Sequence[str] = LORA_TARGET_MODULES) -> str:
    """A peft ``target_modules`` regex for CPM-Bee's projections only, wherever CPM-Bee sits (``language_model.`` in
    Chat, the root of `CpmBeeForCausalLM`, ``model.`` in the Paint text encoder); never the vision encoder."""
    unknown = sorted(set(target_modules) - set(LORA_TARGET_MODULES))
    if unknown or not target_modules:
        raise ValueError(f"target_modules must be among {LORA_TARGET_MODULES}, got {list(target_modules)}")
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"(?:.*\.)?model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"


def language_adapter_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    train_query: bool = False,
    train_mapping: bool = False,
    **kwargs,
):
    """The `peft.LoraConfig` of a language adapter: LoRA on CPM-Bee's projections; with ``train_query`` /
    ``train_mapping`` the query tokens (see :data:`QUERY_MODULE`) and the mapping are trained in full and saved in
    the adapter (``modules_to_save``), so the adapter holds everything it changed."""
    from peft import LoraConfig

    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    if train_query:
        modules_to_save.append(QUERY_MODULE)
    if train_mapping:
        modules_to_save.extend(MAPPING_MODULES)
    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_target_pattern(target_modules),
        modules_to_save=modules_to_save or None, bias="none", **kwargs,
    )


def add_language_adapter(model: nn.Module, config=None, adapter_name: str = "default", **config_kwargs):
    """Wrap ``model`` (VisCPM-Chat, CPM-Bee or the Paint text encoder) in a `peft.PeftModel` with a new, trainable
    language adapter; every base weight is frozen. ``config`` defaults to :func:`language_adapter_config`."""
    from peft import PeftModel, get_peft_model

    config = config if config is not None else language_adapter_config(**config_kwargs)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        model.set_adapter(adapter_name)
        return model
    return get_peft_model(model, config, adapter_name=adapter_name)


def _write_card(folder: Path, base_model: str | None, language: str | None, what: str) -> None:
    """Model card metadata: base model, language, tags (peft's own card is kept and extended)."""
    from huggingface_hub import ModelCard, ModelCardData

    readme = folder / "README.md"
    card = ModelCard.load(readme) if readme.exists() else None
    data = card.data if card is not None and card.data is not None else ModelCardData()
    body = card.text if card is not None else ""
    if base_model:
        data.base_model = base_model
    if language:
        data.language = [language]
    data.library_name = "peft"
    tags = [tag for tag in (data.tags or []) if not (base_model and tag.startswith("base_model:"))]
    if base_model:
        tags.append(f"base_model:adapter:{base_model}")  # peft tags the local path it was trained from
    data.tags = sorted(set(tags + ["viscpm", "lora", "language-adapter"]))
    intro = (f"\n# {what} language adapter ({language or 'unspecified language'})\n\nA LoRA adapter of "
             f"`{base_model or 'VisCPM'}` trained with `viscpm.adapters` so that the model answers in this language. "
             "Load it with `VisCPMChat.from_pretrained(base, adapter=path)` (Paint: `VisCPMPaint.from_pretrained(base, "
             "adapter=path)`) or `peft.PeftModel.from_pretrained(model, path)`.\n")
    text = body if "language adapter" in body else intro + body
    ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(readme)


def save_language_adapter(model, output_dir: str | os.PathLike, language: str | None = None,
                          base_model: str | None = None, adapter_name: str | None = None, what: str = "VisCPM") -> Path:
    """Save one adapter of a `PeftModel` as a standard, flat peft folder (``adapter_config.json``,
    ``adapter_model.safetensors``, ``README.md`` whose metadata names ``base_model`` and ``language``).

    Files are written next to each other in a temporary folder and renamed into ``output_dir`` (which may hold other
    things, e.g. training checkpoints); ``base_model`` (e.g. a Hub id) replaces the local path peft records."""
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    if base_model:
        config.base_model_name_or_path = base_model
    base_model = base_model or config.base_model_name_or_path
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=output_dir) as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True,
                             save_embedding_layers=False)
        written = Path(tmp) / adapter_name if adapter_name != "default" else Path(tmp)
        _write_card(written, base_model, language, what)
        for path in written.iterdir():
            if path.is_file():
                os.replace(path, output_dir / path.name)
    return output_dir


def _language_of(path: str) -> str | None:
    readme = Path(path) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    language = ModelCard.load(readme).data.language
    return language[0] if isinstance(language, list) and language else language


def load_language_adapters(model: nn.Module, adapters: str | os.PathLike | Sequence | Mapping,
                           is_trainable: bool = False, **kwargs):
    """Load one or several adapters onto ``model`` and return the `peft.PeftModel` (the first adapter active).

    ``adapters`` is a folder or Hub repo (adapter name ``"default"``), a list of them (named after the language in
    their model card, else ``"adapter_<i>"``) or a ``{name: folder_or_repo}`` dict. Switch with
    ``model.set_adapter(name)``; ``with model.disable_adapter():`` runs the base model."""
    from peft import PeftModel

    if isinstance(adapters, (str, os.PathLike)):
        named = {"default": str(adapters)}
    elif isinstance(adapters, Mapping):
        named = {str(k): str(v) for k, v in adapters.items()}
    else:
        named = {}
        for i, path in enumerate(adapters):
            name = _language_of(str(path)) or f"adapter_{i}"
            named[name if name not in named else f"{name}_{i}"] = str(path)
    if not named:
        raise ValueError("no adapter given")
    for name, path in named.items():
        local = Path(path).expanduser()
        if local.exists() and not (local / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{local} is not a peft adapter folder (no adapter_config.json)")
    first, *rest = named.items()
    if isinstance(model, PeftModel):
        model.load_adapter(first[1], adapter_name=first[0], is_trainable=is_trainable, **kwargs)
    else:
        model = PeftModel.from_pretrained(model, first[1], adapter_name=first[0], is_trainable=is_trainable, **kwargs)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name, is_trainable=is_trainable, **kwargs)
    model.set_adapter(first[0])
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

_TRAINING_DEFAULTS = dict(
    per_device_train_batch_size=4,
    learning_rate=2e-4,
    num_train_epochs=1,
    lr_scheduler_type="cosine",
    warmup_steps=0,
    logging_steps=10,
    save_steps=500,
    save_total_limit=2,
    report_to=[],
    gradient_checkpointing_kwargs={"use_reentrant": False},
)


def training_arguments(output_dir: str | os.PathLike, **overrides):
    """`TrainingArguments` for adapter training: the defaults above, ``remove_unused_columns=False`` (the collators
    read the raw columns) and ``label_names=["labels"]``; any `TrainingArguments` field may be overridden
    (``bf16``, ``fp16``, ``gradient_checkpointing``, ``max_steps``, ``save_steps``, ``use_cpu``, ...)."""
    from transformers import TrainingArguments

    args = {**_TRAINING_DEFAULTS, **overrides, "output_dir": str(output_dir), "remove_unused_columns": False}
    args.setdefault("label_names", ["labels"])
    return TrainingArguments(**args)


def train_language_adapter(
    model: nn.Module,
    train_dataset,
    output_dir: str | os.PathLike,
    data_collator: Callable,
    language: str | None = None,
    base_model: str | None = None,
    lora_config=None,
    training_args=None,
    resume_from_checkpoint: str | bool | None = None,
    eval_dataset=None,
    callbacks: list | None = None,
    **training_overrides,
):
    """Train a language adapter with transformers' `Trainer` and save it in ``output_dir``.

    ``model`` is a base model (an adapter from ``lora_config`` / :func:`language_adapter_config` is added) or a
    `PeftModel` already holding the trainable adapter. Checkpoints go to ``output_dir/checkpoints`` (every
    ``save_steps``; ``resume_from_checkpoint=True`` continues from the last); the final adapter is a standard peft
    folder in ``output_dir`` (:func:`save_language_adapter`). Runs unchanged under ``accelerate launch``, DeepSpeed or
    FSDP. Returns ``(peft_model, train_output)``.
    """
    from peft import PeftModel
    from transformers import Trainer

    if training_args is None:
        training_args = training_arguments(Path(output_dir) / "checkpoints", **training_overrides)
    elif training_overrides:
        raise ValueError("pass either training_args or TrainingArguments overrides, not both")
    if not isinstance(model, PeftModel):
        model = add_language_adapter(model, lora_config)
    if training_args.gradient_checkpointing:
        # Frozen embeddings give no grad to the checkpointed blocks' inputs; make them require it.
        model.enable_input_require_grads()
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("training %d of %d parameters (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=data_collator, callbacks=callbacks)
    if resume_from_checkpoint is True and not _has_checkpoint(training_args.output_dir):
        resume_from_checkpoint = None
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if trainer.args.should_save:
        save_language_adapter(model, output_dir, language=language, base_model=base_model)
    return model, result


def _has_checkpoint(folder: str) -> bool:
    return os.path.isdir(folder) and any(name.startswith("checkpoint-") for name in os.listdir(folder))


# ---------------------------------------------------------------------------------------------------------------------
# Paint
# ---------------------------------------------------------------------------------------------------------------------

UNET_CROSS_ATTENTION_TARGETS = r".*attn2\.(?:to_q|to_k|to_v|to_out\.0)"
"""peft target regex for the UNet's cross-attention (the layers that read the text)."""


def paint_caption_prompt(caption: str) -> dict:
    """The text encoder's prompt dict, as the pipeline builds it (``<`` escaped)."""
    return {"caption": CpmBeeTokenizer.escape(caption), "objects": ""}


def prepare_paint_dataset(
    dataset,
    tokenizer,
    image_column: str = "image",
    caption_column: str = "caption",
    image_folder: str | os.PathLike | None = None,
    max_length: int | None = 512,
    on_bad_rows: str = SKIP,
    check_images: bool = True,
    num_proc: int | None = None,
):
    """(image, caption) rows → tokenized captions (the pipeline's prompt dict) + image references; bad rows
    (missing/corrupt image, empty caption, too long) skipped with a count or raised, as for chat."""
    import datasets

    _check_option(on_bad_rows)
    dataset = load_conversations(dataset)
    _check_not_empty(dataset, "paint")
    for column in (image_column, caption_column):
        if column not in dataset.column_names:
            raise BadDataError(f"the data has no {column!r} column (columns: {dataset.column_names})")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    folder = None if image_folder is None else str(image_folder)
    total = len(dataset)

    def encode(batch, indices):
        out = {key: [] for key in ("input_ids", "segment_ids", "context_mask", "segment_rel", "ext_table_ids",
                                   "ext_table_sub", "image_path", "image_bytes", "row_index", "skip_reason")}
        for index, image, caption in zip(indices, batch[image_column], batch[caption_column]):
            encoded, reason, path, data = {}, "", None, None
            if not isinstance(caption, str) or not caption.strip():
                reason = "empty caption"
            else:
                path, data = _image_reference(image, folder)
                reason = _check_image(path, data) if check_images else ("" if path or data else "missing image")
            if not reason:
                enc = tokenizer([paint_caption_prompt(caption)])  # a one-item batch: lists of one row
                encoded = {key: enc[key][0] for key in ("input_ids", "segment_ids", "context_mask", "segment_rel",
                                                        "ext_table_ids", "ext_table_sub")}
                if max_length is not None and len(encoded["input_ids"]) > max_length:
                    encoded, reason = {}, f"longer than max_length={max_length}"
            for key in ("input_ids", "segment_ids", "context_mask", "segment_rel", "ext_table_ids", "ext_table_sub"):
                out[key].append(encoded.get(key, []))
            out["image_path"].append(path if encoded else None)
            out["image_bytes"].append(data if encoded else None)
            out["row_index"].append(index)
            out["skip_reason"].append(reason)
        return out

    features = datasets.Features({
        **{key: datasets.Sequence(datasets.Value("int64"))
           for key in ("input_ids", "segment_ids", "context_mask", "ext_table_ids", "ext_table_sub")},
        "segment_rel": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        "image_path": datasets.Value("string"),
        "image_bytes": datasets.Value("binary"),
        "row_index": datasets.Value("int64"),
        "skip_reason": datasets.Value("string"),
    })
    encoded = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                          features=features, num_proc=num_proc, desc="paint examples")
    return _finish(encoded, "paint", on_bad_rows, total)


class PaintAdapterCollator:
    """Batches of :func:`prepare_paint_dataset` examples: captions right-padded (one ext table), images resized on
    the shorter side, centre-cropped to ``resolution`` and scaled to [-1, 1] (the VAE's input)."""

    def __init__(self, tokenizer, resolution: int = 512, random_flip: bool = False):
        self.tokenizer = tokenizer
        self.resolution = int(resolution)
        self.random_flip = random_flip

    def _pixels(self, image) -> torch.Tensor:
        import numpy as np
        import PIL.Image

        size = self.resolution
        width, height = image.size
        scale = size / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                             PIL.Image.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)

    def __call__(self, features: Sequence[Mapping]) -> dict:
        if not features:
            raise ValueError("empty batch")
        batch = collate_text_features(features, self.tokenizer.vocab_size, self.tokenizer.pad_token_id,
                                      keys=("input_ids", "segment_ids", "context_mask"))
        pixels = []
        for feature in features:
            source = feature.get("image_bytes") or feature.get("image_path")
            try:
                pixels.append(self._pixels(to_rgb(load_image_file(source))))
            except (OSError, ValueError) as error:
                raise BadDataError(f"cannot open the image of row {feature.get('row_index')}: {error}") from None
        batch["pixel_values"] = torch.stack(pixels)
        return batch


class PaintAdapterModel(nn.Module):
    """What `Trainer` trains for a Paint adapter: the original's objective (``SDWrapper.forward``): VAE latents
    (a sample of the posterior, times the scaling factor), Gaussian noise, a uniform random timestep per image, the
    UNet's prediction from the noisy latents and the text encoder's conditioning, MSE against the noise (against
    the velocity for a ``v_prediction`` scheduler). Random draws in the original's order: latents, noise, steps."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module, noise_scheduler):
        super().__init__()
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.noise_scheduler = noise_scheduler
        self.vae.requires_grad_(False)

    def forward(self, pixel_values, input_ids, attention_mask=None, segment_ids=None, context_mask=None,
                segment_rel=None, ext_table_ids=None, ext_table_sub=None, **unused):
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(vae_dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        conditioning = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, segment_ids=segment_ids, context_mask=context_mask,
            segment_rel=segment_rel, ext_table_ids=ext_table_ids, ext_table_sub=ext_table_sub,
        ).last_hidden_state
        unet_dtype = next(self.unet.parameters()).dtype
        prediction = self.unet(noisy.to(unet_dtype), timesteps, conditioning.to(unet_dtype)).sample
        kind = getattr(self.noise_scheduler.config, "prediction_type", "epsilon")
        target = noise if kind == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return {"loss": F.mse_loss(prediction.float(), target.float(), reduction="mean")}

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **unused):
        """What `Trainer` calls for ``gradient_checkpointing=True``: checkpoint CPM-Bee's layers and the UNet's."""
        self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(self.unet, "enable_gradient_checkpointing"):
            self.unet.enable_gradient_checkpointing()

    def peft_models(self) -> dict:
        """The parts holding adapters: ``{"text_encoder": PeftModel[, "unet": PeftModel]}``."""
        from peft import PeftModel

        return {name: part for name, part in (("text_encoder", self.text_encoder), ("unet", self.unet))
                if isinstance(part, PeftModel)}


def add_paint_adapter(pipeline, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                      target_modules: Sequence[str] = LORA_TARGET_MODULES, train_unet_cross_attention: bool = False,
                      unet_r: int | None = None) -> PaintAdapterModel:
    """A trainable :class:`PaintAdapterModel` over a `VisCPMPaintPipeline`'s parts: LoRA on the text encoder's
    CPM-Bee projections, and optionally on the UNet's cross-attention (``train_unet_cross_attention``)."""
    from peft import LoraConfig, get_peft_model

    text_encoder = get_peft_model(pipeline.text_encoder, LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_target_pattern(target_modules)))
    unet = pipeline.unet
    unet.requires_grad_(False)
    if train_unet_cross_attention:
        unet = get_peft_model(unet, LoraConfig(r=unet_r or r, lora_alpha=lora_alpha if unet_r is None else unet_r * 2,
                                               lora_dropout=lora_dropout, target_modules=UNET_CROSS_ATTENTION_TARGETS))
    scheduler = pipeline.scheduler
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(scheduler.config)  # the original trains with DDPM's noising
    return PaintAdapterModel(text_encoder, unet, pipeline.vae, noise_scheduler)


def save_paint_adapter(model: PaintAdapterModel, output_dir: str | os.PathLike, language: str | None = None,
                       base_model: str | None = None) -> Path:
    """A Paint adapter folder: ``text_encoder/`` (and ``unet/``) peft folders plus a top-level model card."""
    output_dir = Path(output_dir)
    for name, part in model.peft_models().items():
        save_language_adapter(part, output_dir / name, language=language, base_model=base_model,
                              what=f"VisCPM-Paint {name}")
    _write_card(output_dir, base_model, language, "VisCPM-Paint")
    return output_dir


def load_paint_adapter(pipeline, path: str | os.PathLike, adapter_name: str = "default"):
    """Put the adapter of a Paint adapter folder into a pipeline's text encoder (and UNet), in place: the pipeline
    keeps its components (now with LoRA layers, active) and runs the adapted model. Returns the `PeftModel`s."""
    from peft import PeftModel

    path = Path(path).expanduser()
    parts = {name: path / name for name in ("text_encoder", "unet") if (path / name / "adapter_config.json").is_file()}
    if "text_encoder" not in parts:
        if path.exists():
            raise FileNotFoundError(f"{path} is not a Paint adapter folder (no text_encoder/adapter_config.json)")
        from huggingface_hub import snapshot_download

        return load_paint_adapter(pipeline, snapshot_download(str(path)), adapter_name)
    loaded = {}
    for name, folder in parts.items():
        loaded[name] = PeftModel.from_pretrained(getattr(pipeline, name), str(folder), adapter_name=adapter_name)
    return loaded


def _paint_trainer(**kwargs):
    """A `Trainer` for a :class:`PaintAdapterModel` that saves and resumes the adapters only (the model is not a
    `PreTrainedModel`, so the stock Trainer would save every weight)."""
    from transformers import Trainer

    class PaintAdapterTrainer(Trainer):
        def _save(self, output_dir=None, state_dict=None):
            output_dir = output_dir or self.args.output_dir
            if self.args.should_save:
                for name, part in self.model.peft_models().items():
                    part.save_pretrained(os.path.join(output_dir, name), safe_serialization=True,
                                          save_embedding_layers=False)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            for name, part in (model or self.model).peft_models().items():
                weights = os.path.join(resume_from_checkpoint, name, "adapter_model.safetensors")
                if not os.path.isfile(weights):
                    raise FileNotFoundError(f"{weights} is missing: not a Paint adapter checkpoint")
                set_peft_model_state_dict(part, load_file(weights))

    return PaintAdapterTrainer(**kwargs)


def train_paint_adapter(model: PaintAdapterModel, train_dataset, output_dir: str | os.PathLike, data_collator,
                        language: str | None = None, base_model: str | None = None, training_args=None,
                        resume_from_checkpoint: str | bool | None = None, **training_overrides):
    """Train a Paint adapter with `Trainer` (checkpoints in ``output_dir/checkpoints``, final adapter folder in
    ``output_dir``, see :func:`save_paint_adapter`). Returns ``(model, train_output)``."""
    if training_args is None:
        training_args = training_arguments(Path(output_dir) / "checkpoints", **training_overrides)
    if training_args.gradient_checkpointing:
        model.text_encoder.enable_input_require_grads()
    trainer = _paint_trainer(model=model, args=training_args, train_dataset=train_dataset,
                                       data_collator=data_collator)
    if resume_from_checkpoint is True and not _has_checkpoint(training_args.output_dir):
        resume_from_checkpoint = None
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if trainer.args.should_save:
        save_paint_adapter(model, output_dir, language=language, base_model=base_model)
    return model, result


__all__ = [
    "ASSISTANT_ROLES",
    "BadDataError",
    "ChatAdapterCollator",
    "HUMAN_ROLES",
    "LORA_TARGET_MODULES",
    "MAPPING_MODULES",
    "PaintAdapterCollator",
    "PaintAdapterModel",
    "QUERY_MODULE",
    "UNET_CROSS_ATTENTION_TARGETS",
    "add_language_adapter",
    "add_paint_adapter",
    "chat_training_prompt",
    "collate_text_features",
    "conversation_turns",
    "language_adapter_config",
    "load_conversations",
    "load_language_adapters",
    "load_paint_adapter",
    "lora_target_pattern",
    "paint_caption_prompt",
    "prepare_chat_dataset",
    "prepare_paint_dataset",
    "prepare_text_dataset",
    "save_language_adapter",
    "save_paint_adapter",
    "text_training_prompt",
    "train_language_adapter",
    "train_paint_adapter",
    "training_arguments",
]
