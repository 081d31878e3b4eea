"""Training data for language adapters: rows, prompts, one preparation path for all of them, and the collators.

Rows are LLaVA conversations (Chat), text rows (the alignment stage: CPM-Bee alone) or (image, caption) pairs (Paint).
:func:`load_rows` reads them (files, a folder, the Hub, memory) and checks what every later step relies on; each
``prepare_*`` function only says how one row becomes prompts and hands it to :func:`prepare_examples`, the one path
that tokenizes, applies ``max_length`` and drops bad rows with a count in the log (or raises on the first one with
``on_bad_rows="raise"``). The collators pad examples into batches and open the images per batch.

Corpora too big for memory are read as a stream (``load_rows(..., streaming=True)``: a `datasets.IterableDataset`);
the same ``prepare_*`` functions then give a stream of the same examples, prepared as training reads them.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..conversion.common import first_line, looks_like_repo_id
from ..modeling.image_processing_viscpm import load_image_file, to_rgb
from ..modeling.processing_viscpm_chat import chat_turn
from ..modeling.tokenization_cpmbee import CpmBeeTokenizer

logger = logging.getLogger(__name__)

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "model")
IMAGE_PLACEHOLDER = "<image>"
SKIP = "skip"
RAISE = "raise"

TEXT_KEYS = ("input_ids", "segment_ids", "context_mask", "labels")
"""The per-token columns of a training example (Paint captions have no ``labels``)."""
_IGNORE_INDEX = -100
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class AdapterError(Exception):
    """Something the user of adapter training can fix (data, output folder, checkpoint); the message is one line that
    names the cause and the fix."""


class BadDataError(AdapterError, ValueError):
    """A training row that cannot be used (with ``on_bad_rows="raise"``), or no usable row at all."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading rows
# ---------------------------------------------------------------------------------------------------------------------


def is_streaming(dataset) -> bool:
    """Whether ``dataset`` is a `datasets.IterableDataset` (rows read as a stream: no length, no random access)."""
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def load_conversations(source: Any, split: str = "train", streaming: bool = False, **load_kwargs):
    """Rows to train on, as a `datasets.Dataset` (``streaming=True``: a `datasets.IterableDataset`, read lazily).

    ``source`` is a `datasets.Dataset` / `IterableDataset` (returned as is, a map-style one made a stream with
    ``streaming``), a list of dicts, a JSON / JSONL / parquet / CSV file (or a list of them), a folder that
    ``datasets.load_dataset`` understands (an image folder with ``metadata.jsonl``, or a folder of data files) or a
    Hub dataset id. ``load_kwargs`` go to ``datasets.load_dataset``. Empty or unreadable files are a `BadDataError`
    naming them (when streaming: an unreadable first row; a bad file further on fails when the stream reaches it).
    """
    import datasets

    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise BadDataError(f"the dataset has splits {sorted(source)}, not {split!r}: pick one with --split")
        source = source[split]
    if isinstance(source, datasets.IterableDataset):
        return source
    if isinstance(source, datasets.Dataset):
        return source.to_iterable_dataset() if streaming else source
    if isinstance(source, (list, tuple)) and source and all(isinstance(row, Mapping) for row in source):
        rows = datasets.Dataset.from_list([dict(row) for row in source])
        return rows.to_iterable_dataset() if streaming else rows
    load_kwargs["streaming"] = streaming
    files = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not files:
        raise BadDataError("no data: the source is empty")
    paths = [Path(str(f)).expanduser() for f in files]
    if all(p.is_file() for p in paths):
        builders = {_FILE_BUILDERS.get(p.suffix.lower()) for p in paths}
        if None in builders or len(builders) != 1:
            raise BadDataError(f"cannot tell the format of {[str(p) for p in paths]}: use .json, .jsonl, .parquet, "
                               ".csv or .arrow files (all of one kind)")
        empty = [str(p) for p in paths if p.stat().st_size == 0]
        if empty:
            raise BadDataError(f"{', '.join(empty)} is empty: give a data file with training rows")
        return _load_dataset(builders.pop(), [str(p) for p in paths], split, data_files=[str(p) for p in paths],
                             **load_kwargs)
    if len(paths) == 1 and paths[0].is_dir():
        return _load_dataset(str(paths[0]), [str(paths[0])], split, **load_kwargs)
    missing = [str(p) for p in paths if not p.exists()]
    looks_like_repo = (isinstance(source, str) and looks_like_repo_id(source)
                       and Path(source).suffix.lower() not in _FILE_BUILDERS)
    if len(files) == 1 and missing and looks_like_repo:
        return _load_dataset(source, [source], split, **load_kwargs)  # a Hub dataset id
    raise FileNotFoundError(f"data not found: {', '.join(missing) or source} (give data files, a folder or a Hub "
                            "dataset id)")


def _load_dataset(path: str, names: list[str], split: str, **kwargs):
    """``datasets.load_dataset`` with its failures on bad files turned into one-line errors naming the files (its
    own log lines about them are held back: the error says it all)."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        dataset = datasets.load_dataset(path, split=split, **kwargs)
        if is_streaming(dataset):
            next(iter(dataset))  # a stream reads nothing until asked: read its first row now, to fail here
        return dataset
    except StopIteration:  # what the json builder raises for a file without rows
        raise BadDataError(f"{', '.join(names)} holds no rows: give a data file with training rows") from None
    except datasets.exceptions.DatasetGenerationError as error:
        cause = first_line(error.__cause__ or error)
        raise BadDataError(f"cannot read {', '.join(names)}: {cause} (fix the file: JSON Lines hold one object per "
                           "line)") from None
    except ValueError as error:
        if "corresponds to no data" in str(error):
            raise BadDataError(f"{', '.join(names)} holds no rows: give a data file with training rows") from None
        if "Unknown split" in str(error):
            raise BadDataError(f"{first_line(error).rstrip('.')} in {', '.join(names)}: pick one with --split") from None
        if kwargs.get("streaming"):  # the parser's own error (pyarrow), met on the stream's first row
            raise BadDataError(f"cannot read {', '.join(names)}: {first_line(error)} (fix the file: JSON Lines hold "
                               "one object per line)") from None
        raise
    finally:
        datasets.logging.set_verbosity(verbosity)


def row_columns(dataset) -> list[str]:
    """The column names of ``dataset`` (of a stream whose columns are unknown until read: its first row's);
    raises `BadDataError` when there is no row at all."""
    if is_streaming(dataset):
        first = next(iter(dataset), None)
        empty = first is None
        names = dataset.column_names or list(first or ())
    else:
        empty, names = len(dataset) == 0, dataset.column_names
    if empty:
        raise BadDataError("the data is empty")
    return names


def load_rows(source: Any, columns: Mapping[str, str] | None = None, image_folder: str | os.PathLike | None = None,
              what: str = "training", split: str = "train", streaming: bool = False):
    """The rows of :func:`load_conversations` (a stream with ``streaming``), checked: at least one row, every column
    of ``columns`` (``{option: column name}``, the option named in the error) present, and ``image_folder`` (when
    given) an existing folder."""
    dataset = load_conversations(source, split=split, streaming=streaming)
    try:
        names = row_columns(dataset)
    except BadDataError:
        raise BadDataError(f"no usable {what} examples: the data is empty") from None
    for option, column in (columns or {}).items():
        if column not in names:
            raise BadDataError(f"the data has no {column!r} column (columns: {names}): name the right "
                               f"one with --{option.replace('_', '-')}")
    if image_folder is not None and not Path(image_folder).expanduser().is_dir():
        raise BadDataError(f"image folder {image_folder} not found: --image-folder is where the images' relative "
                           "paths start")
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------------


def _strip_image_placeholder(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace("\n" + IMAGE_PLACEHOLDER, "").replace(
        IMAGE_PLACEHOLDER, "").strip()


def conversation_turns(conversations: Any) -> list[tuple[str, str, str]]:
    """``(context, question, answer)`` per answer of a LLaVA conversation, texts raw (not escaped).

    ``conversations`` is ``[{"from": "human", "value": q1}, {"from": "gpt", "value": a1}, ...]`` (``role`` /
    ``content`` keys and ``user`` / ``assistant`` roles are accepted too); LLaVA's ``<image>`` marker is removed.
    The context of turn *k* is the history as ``VisCPMChat.chat()`` builds it: ``"User: q\\nAI: a\\n"`` per
    earlier turn. Raises `BadDataError` ("empty conversation" or "malformed conversation (...)").
    """
    if isinstance(conversations, Mapping) or not isinstance(conversations, Sequence) or isinstance(conversations, str):
        raise BadDataError("malformed conversation (not a list of messages)")
    if not conversations:
        raise BadDataError("empty conversation")
    texts = []
    for i, message in enumerate(conversations):
        if not isinstance(message, Mapping):
            raise BadDataError(f"malformed conversation (message {i} is not a dict)")
        role = message.get("from", message.get("role"))
        value = message.get("value", message.get("content"))
        expected = HUMAN_ROLES if i % 2 == 0 else ASSISTANT_ROLES
        if role not in expected:
            raise BadDataError(f"malformed conversation (message {i} is from {role!r}, expected one of {expected}: "
                               "turns alternate human/gpt, starting with the human)")
        if not isinstance(value, str):
            raise BadDataError(f"malformed conversation (message {i} has no text value)")
        texts.append(_strip_image_placeholder(value))
    if len(texts) % 2:
        raise BadDataError("malformed conversation (it ends with an unanswered human message)")
    turns, history = [], ""
    for question, answer in zip(texts[0::2], texts[1::2]):
        if not answer:
            raise BadDataError("malformed conversation (empty answer)")
        turns.append((history, question, answer))
        history += chat_turn(question, answer)
    return turns


def chat_training_prompt(question: str, answer: str, context: str = "", query_num: int | None = 64) -> dict:
    """The CPM-Bee dict of one chat turn with its answer, as ``chat()`` asks it: ``{"image": "<unk>" * query_num,
    "context": history, "question": question, "<ans>": answer}`` (texts escaped; no ``image`` key when
    ``query_num`` is None: text only)."""
    escape = CpmBeeTokenizer.escape
    prompt = {} if query_num is None else {"image": "<unk>" * int(query_num)}
    prompt.update({"context": escape(context), "question": escape(question), "<ans>": escape(answer)})
    return prompt


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


def paint_caption_prompt(caption: str) -> dict:
    """The text encoder's prompt dict, as the pipeline builds it (``<`` escaped)."""
    return {"caption": CpmBeeTokenizer.escape(caption), "objects": ""}


# ---------------------------------------------------------------------------------------------------------------------
# Preparation: rows -> examples, bad rows skipped and counted
# ---------------------------------------------------------------------------------------------------------------------


def _token_features(keys: Sequence[str]) -> dict:
    """`datasets` column types of one tokenizer encoding (the per-example ext table included)."""
    import datasets

    return {
        **{key: datasets.Sequence(datasets.Value("int64")) for key in keys},
        "segment_rel": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        "ext_table_ids": datasets.Sequence(datasets.Value("int64")),
        "ext_table_sub": datasets.Sequence(datasets.Value("int64")),
    }


def _image_features() -> dict:
    import datasets

    return {"image_path": datasets.Value("string"), "image_bytes": datasets.Value("binary")}


def encode_example(tokenizer, prompt: dict, labels: bool = True) -> dict:
    """One prompt in the training layout, unpadded, with its own ext table (merged per batch by the collators);
    ``labels`` (CPM-Bee's training layout: the answer tokens and its closing ``</s>``, -100 elsewhere) when asked."""
    enc = tokenizer([prompt], return_labels=labels)  # a one-item batch: lists of one row
    keys = TEXT_KEYS if labels else TEXT_KEYS[:-1]
    return {key: enc[key][0] for key in (*keys, "segment_rel", "ext_table_ids", "ext_table_sub")}


class ImageSource:
    """Turns an image cell (a path relative to ``folder``, bytes, a `datasets.Image` dict or a PIL image) into
    ``{"image_path", "image_bytes"}`` for the collators, or raises `BadDataError` ("missing image" / "corrupt
    image"). With ``check=True`` every image is opened here, so a bad one is skipped now rather than failing a batch."""

    def __init__(self, folder: str | os.PathLike | None = None, check: bool = True):
        self.folder = None if folder is None else Path(folder).expanduser()
        self.check = check

    def __call__(self, value: Any) -> dict:
        import PIL.Image

        path, data = None, None
        if isinstance(value, Mapping):
            data = bytes(value["bytes"]) if value.get("bytes") else None
            value = None if data else value.get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            data = bytes(value)
        elif isinstance(value, PIL.Image.Image):
            buffer = io.BytesIO()
            to_rgb(value).save(buffer, format="PNG")
            data = buffer.getvalue()
        elif isinstance(value, (str, os.PathLike)) and str(value):
            path = Path(str(value)).expanduser()
            path = str(self.folder / path if self.folder is not None and not path.is_absolute() else path)
        if path is None and data is None:
            raise BadDataError("missing image")
        if self.check:
            try:
                to_rgb(load_image_file(path if data is None else data))
            except FileNotFoundError:
                raise BadDataError("missing image") from None
            except (ValueError, OSError):
                raise BadDataError("corrupt image") from None
        return {"image_path": path, "image_bytes": data}


def cache_key(tokenizer, *settings) -> str:
    """A cheap, exact identity of a preparation: the tokenizer (class, code and vocabulary), this module's code and
    ``settings``. `datasets` would otherwise pickle the whole tokenizer (86,583 tokens) per ``map`` to fingerprint
    the function, which takes seconds to tens of seconds."""
    import hashlib
    import inspect

    from datasets.fingerprint import Hasher

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256("\n".join(token for token, _ in vocab).encode("utf-8"))
    for source in (__file__, inspect.getsourcefile(type(tokenizer))):
        digest.update(Path(source).read_bytes())
    return Hasher.hash([type(tokenizer).__qualname__, digest.hexdigest(), *settings])


def _check_option(on_bad_rows: str) -> None:
    if on_bad_rows not in (SKIP, RAISE):
        raise ValueError(f"on_bad_rows must be 'skip' or 'raise', got {on_bad_rows!r}")


def prepare_examples(
    dataset,
    row_examples: Callable[[dict], Iterable[dict]],
    features: Mapping,
    what: str,
    columns: Mapping[str, str] | None = None,
    image_folder: str | os.PathLike | None = None,
    max_length: int | None = None,
    on_bad_rows: str = SKIP,
    num_proc: int | None = None,
    key: str | None = None,
):
    """The one preparation path: rows → tokenized training examples, bad rows skipped and counted.

    ``row_examples(row)`` gives the examples of one row (dicts with the columns of ``features``; several for a
    conversation with several answers) or raises `BadDataError` whose message is the reason the row is skipped.
    Examples over ``max_length`` tokens are skipped too. The skipped rows are counted by reason in the log
    (``on_bad_rows="skip"``) or the first one raises `BadDataError` naming the row (``"raise"``); no usable example at
    all always raises. Rows come from :func:`load_rows` (``columns`` and ``image_folder`` are checked there).
    ``key`` (see :func:`cache_key`) names what ``row_examples`` does, for `datasets`' cache; without it `datasets`
    fingerprints ``row_examples`` itself.

    A `datasets.IterableDataset` of rows (``load_rows(..., streaming=True)``) gives an `IterableDataset` of the same
    examples, prepared lazily as the stream is read (see :func:`_stream_examples`).
    """
    import datasets
    from datasets.fingerprint import Hasher

    _check_option(on_bad_rows)
    dataset = load_rows(dataset, columns, image_folder, what)
    streaming = is_streaming(dataset)
    if streaming and num_proc is not None:
        raise ValueError("num_proc prepares a map-style dataset; a stream is prepared as it is read: drop num_proc "
                         "(--num-proc) and use the data loader's workers (--dataloader-num-workers)")
    for column in (columns or {}).values():  # image references stay undecoded; the collators open them per batch
        if isinstance((dataset.features or {}).get(column), datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    names = row_columns(dataset)
    expand = _row_expander(row_examples, features, names, max_length)
    types = datasets.Features({**features, "row_index": datasets.Value("int64"),
                               "skip_reason": datasets.Value("string")})
    if streaming:
        return _stream_examples(dataset.map(expand, batched=True, with_indices=True, remove_columns=names,
                                            features=types), what, on_bad_rows)
    fingerprint = None if key is None else Hasher.hash([dataset._fingerprint, what, max_length, key])
    expanded = dataset.map(expand, batched=True, with_indices=True, remove_columns=names, features=types,
                           num_proc=num_proc, desc=f"{what} examples", new_fingerprint=fingerprint)
    return _skip_bad_rows(expanded, what, on_bad_rows, len(dataset))


def _row_expander(row_examples, features: Mapping, names: Sequence[str], max_length: int | None):
    """The batched ``map`` function of :func:`prepare_examples` (map-style and streamed alike): each row's examples,
    or one entry with the reason the row (or an example of it) is skipped."""

    def expand(batch, indices):
        out = {key: [] for key in (*features, "row_index", "skip_reason")}
        for index, values in zip(indices, zip(*(batch[name] for name in names))):
            try:
                examples = list(row_examples(dict(zip(names, values)))) or [BadDataError("no example")]
            except BadDataError as error:
                examples = [error]
            for example in examples:
                if not isinstance(example, Exception) and max_length is not None and len(
                        example["input_ids"]) > max_length:
                    example = BadDataError(f"longer than max_length={max_length}")
                skipped = isinstance(example, Exception)
                for key in features:
                    out[key].append(None if skipped else example[key])
                out["row_index"].append(index)
                out["skip_reason"].append(str(example) if skipped else "")
        return out

    return expand


class _StreamedBadRows:
    """The filter of a streamed preparation: keeps good examples; a bad one is counted by reason (a log line when
    the count reaches 1, 2, 4, 8, ...: the stream has no end to report at) or raises with ``on_bad_rows="raise"``.
    Each data-loader worker counts its own share."""

    def __init__(self, what: str, on_bad_rows: str):
        self.what, self.on_bad_rows, self.reasons = what, on_bad_rows, Counter()

    def __call__(self, reason: str, row_index: int) -> bool:
        if not reason:
            return True
        if self.on_bad_rows == RAISE:
            raise BadDataError(f"{self.what} row {row_index}: {reason} (a bad row in the stream; pass "
                               "on_bad_rows='skip' to drop such rows)")
        self.reasons[reason] += 1
        total = sum(self.reasons.values())
        if total & (total - 1) == 0:
            logger.warning("skipped %d streamed %s rows so far: %s", total, self.what,
                           ", ".join(f"{n} {why}" for why, n in self.reasons.most_common()))
        return False


def _stream_examples(expanded, what: str, on_bad_rows: str):
    """The examples of a streamed preparation, bad rows filtered out by :class:`_StreamedBadRows`. The stream is read
    here up to its first usable example, so that data with none (every row bad) fails now, not in the Trainer."""

    def examples(counter):
        return expanded.filter(counter, input_columns=["skip_reason", "row_index"]).remove_columns("skip_reason")

    probe = _StreamedBadRows(what, on_bad_rows)
    if next(iter(examples(probe)), None) is None:
        raise BadDataError(f"no usable {what} examples" + (f" (skipped: {dict(probe.reasons)})" if probe.reasons
                                                           else ""))
    return examples(_StreamedBadRows(what, on_bad_rows))


def count_line(dataset) -> str:
    """What the training scripts print about their examples: their number, or that they are streamed."""
    return "streaming the training examples" if is_streaming(dataset) else f"{len(dataset)} training examples"


def check_streaming_steps(dataset, args) -> None:
    """A stream has no length, so `Trainer` cannot count its epochs: refuse one without ``max_steps`` up front, in one
    line that says what to give."""
    if is_streaming(dataset) and not (args.max_steps and args.max_steps > 0):
        raise AdapterError("the training data is streamed (--streaming: it has no length, so epochs cannot be "
                           "counted): give the number of optimizer steps with --max-steps N (max_steps=N)")


def _skip_bad_rows(dataset, what: str, on_bad_rows: str, total: int):
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


def _image_start(segment_ids: list[int]) -> int:
    """First image slot: the token after the image leaf's ``<s>`` (the leaf is segment 2: root, key, leaf)."""
    return segment_ids.index(2) + 1


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
    that turn, with the answer in place) encoded in CPM-Bee's training layout (see :func:`encode_example`). The image
    stays a reference (``image_path`` or ``image_bytes``) that :class:`ChatAdapterCollator` opens per batch.

    Bad rows (a missing or unreadable image, an empty or malformed conversation, an example over ``max_length``
    tokens) are dropped with a count in the log (``on_bad_rows="skip"``) or raise `BadDataError` naming the row
    (``"raise"``); no usable row at all always raises. ``check_images=False`` skips opening every image here (then a
    bad image is an error when its batch is built).
    """
    columns = {"image_column": image_column, "conversations_column": conversations_column}
    return _prepare_image_turns(dataset, processor, lambda row: conversation_turns(row[conversations_column]),
                                columns, "chat", (), image_folder, check_images, max_length, on_bad_rows, num_proc)


def _prepare_image_turns(dataset, processor, row_turns, columns, what, key_extra, image_folder, check_images,
                         max_length, on_bad_rows, num_proc):
    """The one way image rows become Chat examples: ``row_turns(row)`` gives its ``(context, question, answer)``
    turns, each encoded as the prompt ``chat()`` asks at that turn with the answer in place, plus the row's image."""
    import datasets

    tokenizer, query_num = processor.tokenizer, processor.query_num
    images = ImageSource(image_folder, check_images)
    image_column = columns["image_column"]

    def row_examples(row):
        turns = row_turns(row)
        image = images(row[image_column])
        for context, question, answer in turns:
            encoded = encode_example(tokenizer, chat_training_prompt(question, answer, context, query_num))
            yield {**encoded, **image, "image_start": _image_start(encoded["segment_ids"])}

    features = {**_token_features(TEXT_KEYS), **_image_features(), "image_start": datasets.Value("int64")}
    key = cache_key(tokenizer, columns, str(images.folder), check_images, query_num, *key_extra)
    return prepare_examples(dataset, row_examples, features, what, columns=columns, image_folder=image_folder,
                            max_length=max_length, on_bad_rows=on_bad_rows, num_proc=num_proc, key=key)


CAPTION_QUESTION = "Describe the image briefly."
"""The question every image-caption row of the Chat alignment stage is asked (its answer is the caption): a plain
English request for a short description, so that the stage trains the image-to-text path on the prompt layout
``chat()`` uses, and a model trained on it answers a like question with a caption."""


def prepare_caption_chat_dataset(
    dataset,
    processor,
    image_folder: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    question: str = CAPTION_QUESTION,
    max_length: int | None = 2048,
    on_bad_rows: str = SKIP,
    check_images: bool = True,
    num_proc: int | None = None,
):
    """Image-caption rows (``{"image": ..., "caption": ...}``, the MpM Chat alignment stage) → Chat training
    examples: one per row, the prompt :func:`chat_training_prompt` of ``question`` (no history) with the caption as
    the answer, in the layout of :func:`prepare_chat_dataset` (so :class:`ChatAdapterCollator` batches them). Bad
    rows (missing/corrupt image, empty caption, too long) are skipped with a count or raised, as for chat."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty text: the prompt each caption answers")

    def row_turns(row):
        caption = row[caption_column]
        if not isinstance(caption, str) or not caption.strip():
            raise BadDataError("empty caption")
        return [("", question, caption.strip())]

    columns = {"image_column": image_column, "caption_column": caption_column}
    return _prepare_image_turns(dataset, processor, row_turns, columns, "caption", (question,), image_folder,
                                check_images, max_length, on_bad_rows, num_proc)


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

    def row_examples(row):
        if build_prompt is not None:
            prompts = [build_prompt(row)]
        elif row.get("conversations") is not None:
            prompts = [chat_training_prompt(q, a, c, query_num=None) for c, q, a in
                       conversation_turns(row["conversations"])]
        else:
            prompts = [text_training_prompt(row)]
            if not prompts[0]["<ans>"]:
                raise BadDataError("empty text")
        return [encode_example(tokenizer, prompt) for prompt in prompts]

    from datasets.fingerprint import Hasher

    key = cache_key(tokenizer, None if build_prompt is None else Hasher.hash(build_prompt))
    return prepare_examples(dataset, row_examples, _token_features(TEXT_KEYS), "text", max_length=max_length,
                            on_bad_rows=on_bad_rows, num_proc=num_proc, key=key)


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
    images = ImageSource(image_folder, check_images)

    def row_examples(row):
        caption = row[caption_column]
        if not isinstance(caption, str) or not caption.strip():
            raise BadDataError("empty caption")
        image = images(row[image_column])
        return [{**encode_example(tokenizer, paint_caption_prompt(caption), labels=False), **image}]

    features = {**_token_features(TEXT_KEYS[:-1]), **_image_features()}
    columns = {"image_column": image_column, "caption_column": caption_column}
    key = cache_key(tokenizer, columns, str(images.folder), check_images)
    return prepare_examples(dataset, row_examples, features, "paint", columns=columns, image_folder=image_folder,
                            max_length=max_length, on_bad_rows=on_bad_rows, num_proc=num_proc, key=key)


# ---------------------------------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------------------------------


def collate_text_features(features: Sequence[Mapping], ext_offset: int, pad_token_id: int,
                          keys: Sequence[str] = TEXT_KEYS, pad_to_multiple_of: int | None = None) -> dict:
    """Pad separately encoded CPM-Bee examples (right padding) into one batch with one ext table.

    Each example carries its own ext table (ids >= the tokenizer's ``ext_offset`` in ``input_ids``/``labels`` are its
    columns); the batch table is their union in example order, deduplicated by (id, sub) — the table the tokenizer
    builds when it encodes the same items together — and the ids are renumbered into it.
    """
    if not features:
        raise ValueError("empty batch")
    columns: dict[tuple[int, int], int] = {}
    remaps = []
    for feature in features:
        remap = {}
        for k, pair in enumerate(zip(feature["ext_table_ids"], feature["ext_table_sub"])):
            remap[ext_offset + k] = ext_offset + columns.setdefault(tuple(int(v) for v in pair), len(columns))
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


def open_batch_images(features: Sequence[Mapping]) -> list:
    """The RGB images of a batch's examples; an image that no longer opens is a `BadDataError` naming its row."""
    images = []
    for feature in features:
        source = feature.get("image_bytes") or feature.get("image_path")
        try:
            images.append(to_rgb(load_image_file(source)))
        except (OSError, ValueError) as error:
            raise BadDataError(f"cannot open the image of row {feature.get('row_index')}: {error}") from None
    return images


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
        batch = collate_text_features(features, self.tokenizer.ext_offset, self.tokenizer.pad_token_id,
                                      pad_to_multiple_of=self.pad_to_multiple_of)
        with_image = [feature.get("image_start", -1) is not None and feature.get("image_start", -1) >= 0
                      for feature in features]
        if any(with_image):
            if not all(with_image):
                raise ValueError("a batch mixes examples with and without image: train on one kind at a time")
            if self.image_processor is None:
                raise ValueError("image examples need a processor with an image processor")
            images = open_batch_images(features)
            batch["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
            starts = torch.tensor([int(feature["image_start"]) for feature in features], dtype=torch.long)
            batch["image_bound"] = torch.stack([starts, starts + self.query_num], dim=1)
        return batch


class PaintAdapterCollator:
    """Batches of :func:`prepare_paint_dataset` examples: captions right-padded (one ext table), images resized on
    the shorter side, centre-cropped to ``resolution`` and scaled to [-1, 1] (the VAE's input).

    Examples of a text-feature cache (:func:`~viscpm.adapters.paint.cache_text_features`) also carry CPM-Bee's states
    (``text_states``, ``[tokens, hidden]``); they are padded with ``text_pad_state``, the state CPM-Bee gives a padded
    position (the UNet attends to those too), into ``text_states`` ``[batch, seq, hidden]``.
    """

    def __init__(self, tokenizer, resolution: int = 512, random_flip: bool = False,
                 text_pad_state: torch.Tensor | None = None):
        self.tokenizer = tokenizer
        self.resolution = int(resolution)
        self.random_flip = random_flip
        self.text_pad_state = text_pad_state

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
        batch = collate_text_features(features, self.tokenizer.ext_offset, self.tokenizer.pad_token_id,
                                      keys=TEXT_KEYS[:-1])
        batch["pixel_values"] = torch.stack([self._pixels(image) for image in open_batch_images(features)])
        if features[0].get("text_states") is not None:
            if self.text_pad_state is None:
                raise ValueError("these examples carry cached text features (text_states): batch them with the "
                                 "cache's collator (TextFeatureCache.collator), which knows the padding's state")
            states = self.text_pad_state.float().repeat(len(features), batch["input_ids"].shape[1], 1)
            for row, feature in enumerate(features):
                cached = torch.as_tensor(feature["text_states"], dtype=torch.float32)
                states[row, :len(cached)] = cached
            batch["text_states"] = states
        return batch
