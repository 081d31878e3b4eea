"""Tokenizer of CPM-Bee, the bilingual language model under VisCPM.

CPM-Bee reads *structured* input: a nested dict of strings (the "CPM-Bee dict") is laid out as a tree of
segments, each `<s> tokens </s>`, and the top-level key `"<ans>"` marks the part the model has to write.
This module turns such dicts into the tensors the model consumes, with the same token ids, segment numbering,
segment relations and ext-table numbering as the original VisCPM code, and turns generated ids back into answers
written into the dict. Plain strings are encoded like any transformers tokenizer encodes them (`input_ids` and
`attention_mask`, lists unless `return_tensors` is given).

Text conventions (the original's): in every string, `<<` is a literal `<` and `<name>` is a special token.
Pieces missing from the vocabulary and numbered specials (`<unk_2>`, `<option_1>`, ...) are represented by
a base token plus a `sub` index; pairs with `sub > 0` live in a per-batch *ext table* and appear in
`input_ids` as `len(tokenizer) + column` (`vocab_size + column` unless tokens were added).

Only torch, transformers and the standard library are imported: the file also ships as remote code.
"""

import copy
import os
import re
from typing import Any

import torch
from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.utils import PaddingStrategy, TensorType


VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt"}

# How the vocabulary file spells the two whitespace tokens.
_FILE_FORMS = {"</n>": "\n", "</_>": " "}
_ANS = "<ans>"
_IGNORE_INDEX = -100
# Options of the plain-text encoding that a CPM-Bee dict cannot honour (it is laid out whole, never cut into windows
# of characters): refused for dicts with a clear error instead of being ignored.
_PLAIN_TEXT_ONLY = ("stride", "return_overflowing_tokens", "return_offsets_mapping", "is_split_into_words")


def _is_special(token: str) -> bool:
    """A `<...>` token string (the original's test for special tokens)."""
    return token.startswith("<") and token.endswith(">")


def _special_base(token: str) -> str:
    """Base name of a special token: `<image_3>` -> `<image>`, `<ans>` -> `<ans>` (text before the first `_`)."""
    return "<" + token[1:-1].split("_", 1)[0] + ">"


def _bucket(n_up: int, n_down: int, max_depth: int) -> int:
    """Segment-relation bucket of a pair of segments; bucket 1 is reserved for in-context samples."""
    value = n_up * max_depth + n_down
    return value + 1 if value else 0


def _is_sequence(value) -> bool:
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0


def _path_str(path) -> str:
    return "data" + "".join(f"[{key!r}]" for key in path)


def _is_structured(text: Any) -> bool:
    """A CPM-Bee dict, or a batch holding at least one (strings in such a batch are laid out as CPM-Bee text)."""
    if isinstance(text, dict):
        return True
    return isinstance(text, (list, tuple)) and any(isinstance(item, dict) for item in text)


class _Sample:
    """One encoded item: base ids and sub indices per token, segments, and the per-name sub tables."""

    __slots__ = ("ids", "subs", "segments", "context", "segment_rel", "names", "answers")

    def __init__(self):
        self.ids: list[int] = []
        self.subs: list[int] = []
        self.segments: list[int] = []
        self.context: list[int] = []
        self.segment_rel: list[list[int]] = [[0]]
        # token name (e.g. "<unk>") -> {token string: sub index}, both in order of first appearance.
        self.names: dict[str, dict[str, int]] = {}
        # (segment id, path below "<ans>") of each answer leaf kept in the prompt, in order.
        self.answers: list[tuple[int, tuple]] = []


class CpmBeeTokenizer(PreTrainedTokenizer):
    r"""
    CPM-Bee tokenizer: greedy longest-match over `vocab.txt`, plus the structured-dict layout of CPM-Bee.

    Calling it on a CPM-Bee dict (nested dicts with `str` leaves) or a list of items holding one returns a
    [`BatchEncoding`] with `input_ids`, `attention_mask`, `segment_ids`, `context_mask`, `segment_rel`,
    `ext_table_ids`, `ext_table_sub`, `ext_table_mask`, `unk_allowed` (and `labels` with `return_labels=True`); on
    plain strings it behaves as any transformers tokenizer. See [`~CpmBeeTokenizer.__call__`].

    Args:
        vocab_file (`str`): one token per line; `</n>` stands for a newline and `</_>` for a space.
        bos_token, eos_token, pad_token, unk_token (`str`): `<s>`, `</s>`, `<pad>`, `<unk>`; a token missing from
            the vocabulary is added, as transformers tokenizers do.
        padding_side (`str`, defaults to `"left"`): left padding suits generation.
        max_segment_depth (`int`, defaults to 8): depth cap of the segment-relation buckets.
        max_segments (`int`, defaults to 1024): most segments (root, keys and leaves) one CPM-Bee dict may have. The
            segment-relation table grows with the square of this number (1024: 8 MB per item); a larger dict is
            refused before anything is allocated.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = [
        "input_ids",
        "attention_mask",
        "segment_ids",
        "context_mask",
        "segment_rel",
        "ext_table_ids",
        "ext_table_sub",
        "ext_table_mask",
        "unk_allowed",
    ]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        padding_side: str = "left",
        max_segment_depth: int = 8,
        max_segments: int = 1024,
        **kwargs,
    ):
        self.vocab_file = vocab_file
        self.max_segment_depth = int(max_segment_depth)
        self.max_segments = int(max_segments)
        if self.max_segments < 2:
            raise ValueError(f"max_segments must be at least 2 (the root and one leaf), got {max_segments}")
        self._load_vocab(vocab_file)
        self._added_cache: tuple = ((), None)
        kwargs.setdefault("special_tokens_pattern", "none")
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            padding_side=padding_side,
            max_segment_depth=max_segment_depth,
            max_segments=max_segments,
            **kwargs,
        )

    # ------------------------------------------------------------------ vocabulary

    def _load_vocab(self, vocab_file: str) -> None:
        """Read the vocabulary and build the lookup tables of the longest-match tokenizer."""
        with open(vocab_file, encoding="utf-8") as handle:
            file_tokens = [line for line in handle.read().split("\n") if line]
        self._file_tokens = file_tokens
        self._id_to_token = [_FILE_FORMS.get(token, token) for token in file_tokens]
        self.encoder: dict[str, int] = {}
        for index, token in enumerate(self._id_to_token):
            if token in self.encoder:
                raise ValueError(f"duplicate token {token!r} in the vocabulary {vocab_file} (lines "
                                 f"{self.encoder[token] + 1} and {index + 1})")
            self.encoder[token] = index
        # Ordinary pieces (never `<...>`) that text can be cut into, and for each first character the
        # lengths of those pieces, longest first: the longest match tries only lengths that exist.
        self._plain = {token: index for token, index in self.encoder.items() if not _is_special(token)}
        lengths: dict[str, set] = {}
        for token in self._plain:
            lengths.setdefault(token[0], set()).add(len(token))
        self._lengths = {char: tuple(sorted(found, reverse=True)) for char, found in lengths.items()}

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        return {**self.encoder, **getattr(self, "_added_tokens_encoder", {})}

    @property
    def ext_offset(self) -> int:
        """Id of the first ext-table column in `input_ids`: the size of the whole vocabulary, added tokens included
        (the model's embedding size once resized with `resize_token_embeddings(len(tokenizer))`)."""
        return len(self)

    def _piece_id(self, token: str) -> int:
        """Id of a vocabulary or added token, -1 if it is neither."""
        index = self.encoder.get(token)
        if index is None:
            index = self._added_tokens_encoder.get(token, -1)
        return index

    def _added_matcher(self, split_special_tokens: bool = False):
        """Pattern of the added tokens that text is cut at before the longest match (`add_tokens`, new special
        tokens), longest first; `<name>` tokens are read by the special-token rule instead. None without any."""
        tokens = tuple(sorted(
            (token.content for token in self._added_tokens_decoder.values()
             if not (_is_special(token.content) or (split_special_tokens and token.special))),
            key=lambda content: (-len(content), content),
        ))
        if not tokens:
            return None
        if self._added_cache[0] != tokens:
            self._added_cache = (tokens, re.compile("|".join(re.escape(token) for token in tokens)))
        return self._added_cache[1]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(self._file_tokens) + "\n")
        return (path,)

    # ------------------------------------------------------------------ text -> pieces

    @staticmethod
    def escape(text: str) -> str:
        """Make raw text safe inside CPM-Bee text: every `<` becomes `<<`."""
        return text.replace("<", "<<")

    @staticmethod
    def unescape(text: str) -> str:
        """Inverse of [`escape`]: `<<` becomes `<` (special tokens such as `<s>` are left as they are)."""
        return text.replace("<<", "<")

    def _split(self, text: str, split_special_tokens: bool = False) -> list[tuple[str, int]]:
        """Cut CPM-Bee text into `(piece, id)`; the id is -1 for out-of-vocabulary pieces and for special tokens
        neither in the vocabulary nor added. Added tokens are matched first. Runs of unknown characters form one
        piece."""
        matcher = self._added_matcher(split_special_tokens)
        out: list[tuple[str, int]] = []
        plain: list[str] = []
        pos, end = 0, len(text)
        while True:
            at = text.find("<", pos)
            if at < 0:
                plain.append(text[pos:])
                break
            plain.append(text[pos:at])
            if at + 1 >= end:
                raise ValueError(f"dangling '<' at the end of {text!r} (write '<<' for a literal '<')")
            if text[at + 1] == "<":
                plain.append("<")
                pos = at + 2
                continue
            close = text.find(">", at + 2)
            inner_lt = text.find("<", at + 2)
            if close < 0:
                raise ValueError(f"unterminated special token at position {at} of {text!r} "
                                 "(write '<<' for a literal '<')")
            if 0 <= inner_lt < close:
                raise ValueError(f"'<' inside the special token starting at position {at} of {text!r} "
                                 "(write '<<' for a literal '<')")
            self._cut_added("".join(plain), out, matcher)
            plain = []
            special = text[at:close + 1]
            out.append((special, self._piece_id(special)))
            pos = close + 1
        self._cut_added("".join(plain), out, matcher)
        return out

    def _cut_added(self, part: str, out: list, matcher) -> None:
        """Text without special tokens: added tokens whole, the rest by the longest match."""
        if matcher is None:
            self._cut_plain(part, out)
            return
        start = 0
        for found in matcher.finditer(part):
            self._cut_plain(part[start:found.start()], out)
            out.append((found.group(), self._added_tokens_encoder[found.group()]))
            start = found.end()
        self._cut_plain(part[start:], out)

    def _cut_plain(self, part: str, out: list) -> None:
        """Greedy longest match of ordinary pieces over text without special tokens."""
        plain, lengths = self._plain, self._lengths
        i, end, unknown_from = 0, len(part), -1
        while i < end:
            found = -1
            for size in lengths.get(part[i], ()):
                if size <= end - i:
                    found = plain.get(part[i:i + size], -1)
                    if found >= 0:
                        break
            if found < 0:
                if unknown_from < 0:
                    unknown_from = i
                i += 1
                continue
            if unknown_from >= 0:
                out.append((part[unknown_from:i], -1))
                unknown_from = -1
            out.append((part[i:i + size], found))
            i += size
        if unknown_from >= 0:
            out.append((part[unknown_from:], -1))

    def _token_name(self, piece: str) -> str:
        """Vocabulary token that carries an ext piece: `<unk>` for unknown text, the base of a special."""
        name = _special_base(piece) if _is_special(piece) else self.unk_token
        if self._piece_id(name) < 0:
            raise ValueError(f"unknown special token {piece!r}: neither it nor its base {name!r} is in the "
                             "vocabulary (write '<<' for a literal '<')")
        return name

    def tokenize(self, text: str, split_special_tokens: bool | None = None, **kwargs) -> list[str]:
        """Pieces of CPM-Bee text (escapes resolved, special tokens and added tokens kept whole; with
        `split_special_tokens=True` added special tokens are cut like text). Raises `ValueError` on malformed text
        or an unknown special token."""
        if split_special_tokens is None:
            split_special_tokens = self.split_special_tokens
        pieces = self._split(text, split_special_tokens)
        for piece, index in pieces:
            if index < 0 and _is_special(piece):
                self._token_name(piece)
        return [piece for piece, _ in pieces]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        """Vocabulary id; a numbered special maps to its base (`<unk_2>` -> `<unk>`), anything else unknown to
        `<unk>` (the structured call keeps such pieces apart through the ext table instead)."""
        index = self.encoder.get(token)
        if index is None and _is_special(token):
            index = self._piece_id(_special_base(token))
        return self._piece_id(self.unk_token) if index is None or index < 0 else index

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < len(self._id_to_token):
            return self._id_to_token[index]
        return self.unk_token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces back into CPM-Bee text: special tokens verbatim, other pieces escaped."""
        return "".join(token if _is_special(token) else self.escape(token) for token in tokens)

    def _decode(
        self,
        token_ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        ext_table: dict[int, str] | None = None,
        **kwargs,
    ) -> str:
        """Ids to CPM-Bee text as the original decodes them: ids found in `ext_table` (see
        [`get_ext_tables`]) give their stored string, vocabulary specials stay `<...>`, ordinary pieces are
        escaped, negative ids are skipped. Ids at or above `ext_offset` need `ext_table`."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ext_table = ext_table or {}
        parts, vocab_size, added = [], self.vocab_size, self._added_tokens_decoder
        for index in token_ids:
            index = int(index)
            if index in ext_table:
                parts.append(ext_table[index])
            elif index < 0:
                continue
            elif index >= vocab_size and index in added:
                if not (skip_special_tokens and added[index].special):
                    parts.append(added[index].content)
            elif index >= vocab_size:
                raise ValueError(f"id {index} refers to the batch ext table (ids >= {self.ext_offset}); pass "
                                 "`ext_table=tokenizer.get_ext_tables(data)[i]` or use `decode_answers`")
            else:
                token = self._id_to_token[index]
                if _is_special(token):
                    if not skip_special_tokens:
                        parts.append(token)
                else:
                    parts.append(self.escape(token))
        return "".join(parts)

    # ------------------------------------------------------------------ items -> samples

    def _encode_text(self, text: str, sample: _Sample, where: str, split_special_tokens: bool = False):
        """(base id, sub) of each piece of one string, numbering ext pieces in the sample's name tables."""
        try:
            pieces = self._split(text, split_special_tokens)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        tokens = []
        for piece, index in pieces:
            if index >= 0:
                tokens.append((index, 0))
                continue
            try:
                name = self._token_name(piece)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            table = sample.names.setdefault(name, {})
            sub = table.get(piece)
            if sub is None:
                sub = table[piece] = len(table)
            tokens.append((self._piece_id(name), sub))
        return tokens

    def _encode_item(self, item: Any, training: bool, max_length: int | None, split: bool = False) -> _Sample:
        """Encode one item into the generation layout (default) or the training layout (`split`: see
        `split_special_tokens`)."""
        sample = _Sample()
        if isinstance(item, str):
            for index, sub in self._encode_text(item, sample, "text", split):
                sample.ids.append(index)
                sample.subs.append(sub)
            if max_length is not None:
                del sample.ids[max_length:], sample.subs[max_length:]
            sample.segments = [0] * len(sample.ids)
            sample.context = [1] * len(sample.ids)
            return sample
        if not isinstance(item, dict):
            raise ValueError(f"each item must be a str or a CPM-Bee dict, got {type(item).__name__}")

        texts, depths, parents, predict, origins, answer_leaves = self._flatten_tree(item, training)
        has_answer = _ANS in item
        if has_answer and not training and not answer_leaves:
            raise ValueError("data['<ans>'] has no leaf to predict")

        bos, eos = self.bos_token_id, self.eos_token_id
        placeholder_at = {}
        for seg, text in enumerate(texts):
            tokens = [(bos, 0)] + self._encode_text(text, sample, origins[seg], split)
            if not predict[seg]:
                tokens.append((eos, 0))
            placeholder_at[seg] = len(sample.ids) + 1
            for index, sub in tokens:
                sample.ids.append(index)
                sample.subs.append(sub)
                sample.segments.append(seg)
                sample.context.append(0 if predict[seg] else 1)
        sample.segment_rel = self._segment_rel(depths, parents)

        if training or not has_answer:
            if max_length is not None:
                for values in (sample.ids, sample.subs, sample.segments, sample.context):
                    del values[max_length:]
            return sample
        return self._generation_layout(sample, answer_leaves, placeholder_at, max_length)

    def _flatten_tree(self, item: dict, training: bool):
        """The segments of a CPM-Bee dict: root, then every key followed by its value, depth first (the original's
        order). Returns per segment its text, depth, parent, whether it is predicted and where it comes from (for
        errors), and the `(segment, path below "<ans>")` of each answer leaf. In the generation layout an answer
        leaf's text is replaced by `<ans_N>`, as the original does, so that segments and ext numbering match.
        More than `max_segments` segments is an error, raised before the rest is read."""
        texts, depths, parents, predict, origins = ["<root>"], [0], [-1], [False], ["data"]
        answer_leaves: list[tuple[int, tuple]] = []

        def add(text: str, depth: int, parent: int, predicted: bool, origin: str) -> int:
            if len(texts) >= self.max_segments:
                raise ValueError(
                    f"the CPM-Bee dict has more than {self.max_segments} segments (root, keys and leaves), the "
                    "tokenizer's max_segments: its segment relations grow with the square of that number. Merge "
                    "leaves into fewer keys, or raise tokenizer.max_segments (about 8 * n * n bytes per item)"
                )
            texts.append(text)
            depths.append(depth)
            parents.append(parent)
            predict.append(predicted)
            origins.append(origin)
            return len(texts) - 1

        # An explicit stack of (remaining entries, depth, parent segment, inside "<ans>", path) instead of
        # recursion: nesting depth is bounded by max_segments, not by Python's recursion limit.
        stack = [(iter(item.items()), 1, 0, False, ())]
        while stack:
            entries, depth, parent, in_answer, path = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            key, value = entry
            if not isinstance(key, str):
                raise ValueError(f"key {key!r} of {_path_str(path)} is not a str")
            key_segment = add(key, depth, parent, False, f"key {key!r} of {_path_str(path)}")
            value_in_answer, value_path = in_answer or (depth == 1 and key == _ANS), path + (key,)
            if isinstance(value, dict):
                stack.append((iter(value.items()), depth + 1, key_segment, value_in_answer, value_path))
                continue
            if value_in_answer and not training:
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{_path_str(value_path)} must be a str or None, got {type(value).__name__}")
                answer_leaves.append((len(texts), value_path[1:]))
                value = f"<ans_{len(answer_leaves)}>"
            elif isinstance(value, (list, tuple)):
                raise ValueError(f"{_path_str(value_path)} is a {type(value).__name__}: CPM-Bee dict leaves must be "
                                 "str (lists are not supported)")
            elif not isinstance(value, str):
                raise ValueError(f"{_path_str(value_path)} must be a str, got {type(value).__name__}")
            add(value, depth + 1, key_segment, value_in_answer, _path_str(value_path))
        return texts, depths, parents, predict, origins, answer_leaves

    def _generation_layout(self, sample: _Sample, answer_leaves: list, placeholder_at: dict, max_length: int | None):
        """Cut a laid-out dict to the original's prompt: its context tokens (of the first `max_length` tokens, the
        original's cut), then one `<s>` opening the first answer leaf that survived the cut."""
        cut = len(sample.ids) if max_length is None else min(max_length, len(sample.ids))
        sample.answers = [(seg, path) for seg, path in answer_leaves if placeholder_at[seg] < cut]
        if not sample.answers:
            raise ValueError(f"no answer left to predict: truncation to max_length={max_length} cut off '<ans>'")
        keep = [p for p in range(cut) if sample.context[p]]
        sample.ids = [sample.ids[p] for p in keep] + [self.bos_token_id]
        sample.subs = [sample.subs[p] for p in keep] + [0]
        sample.segments = [sample.segments[p] for p in keep] + [sample.answers[0][0]]
        sample.context = [1] * len(keep) + [0]
        return sample

    def _segment_rel(self, depths: list[int], parents: list[int]) -> list[list[int]]:
        """Bucket of every segment pair from their tree distance through the lowest common ancestor. Segments are
        in depth-first order (a parent before its children), so for each segment `a` one pass finds the lowest
        ancestor of `a` above every other segment: O(n * n) in all."""
        n, cap = len(depths), self.max_segment_depth - 1
        rel = [[0] * n for _ in range(n)]
        meet = [0] * n
        for a in range(n):
            on_path = set()
            node = a
            while node >= 0:
                on_path.add(node)
                node = parents[node]
            for b in range(1, n):
                meet[b] = b if b in on_path else meet[parents[b]]
            for b in range(a + 1, n):
                lowest = depths[meet[b]]
                up, down = min(depths[a] - lowest, cap), min(depths[b] - lowest, cap)
                rel[a][b] = _bucket(up, down, self.max_segment_depth)
                rel[b][a] = _bucket(down, up, self.max_segment_depth)
        return rel

    # ------------------------------------------------------------------ batch ext table

    def _ext_table(self, samples: list[_Sample]):
        """The batch ext table, built as the original's batch packing does: per sample, per token name in
        order of first appearance, each sub > 0, deduplicated over the batch by (base id, sub); the `<ans>`
        name is skipped. Pairs still missing from it (only `<ans_N>` typed into a context) are appended
        after, belonging to no row. Returns the (id, sub) -> column map, the columns each row owns and the
        per-row decode tables (id -> string)."""
        offset = self.ext_offset
        columns: dict[tuple[int, int], int] = {}
        owned, strings = [], []
        for sample in samples:
            own, table = set(), {}
            for name, subs in sample.names.items():
                if name == _ANS:
                    continue
                base = self._piece_id(name)
                for piece, sub in subs.items():
                    if sub == 0:
                        table[base] = piece
                        continue
                    column = columns.setdefault((base, sub), len(columns))
                    own.add(column)
                    table[offset + column] = piece
            owned.append(own)
            strings.append(table)
        ans_id = self._piece_id(_ANS)
        for sample, table in zip(samples, strings):
            by_sub = {sub: piece for piece, sub in sample.names.get(_ANS, {}).items()}
            for index, sub in zip(sample.ids, sample.subs):
                if sub and (index, sub) not in columns:
                    columns[(index, sub)] = len(columns)
                if sub and index == ans_id:
                    table.setdefault(offset + columns[(index, sub)], by_sub[sub])
        return columns, owned, strings

    def _encode_batch(self, data: Any, training: bool = False, max_length: int | None = None,
                      split_special_tokens: bool = False):
        items = data if isinstance(data, (list, tuple)) else [data]
        if len(items) == 0:
            raise ValueError("empty batch: pass a str, a CPM-Bee dict or a non-empty list of them")
        samples = []
        for i, item in enumerate(items):
            try:
                samples.append(self._encode_item(item, training, max_length, split_special_tokens))
            except ValueError as error:
                raise ValueError(f"item {i}: {error}" if len(items) > 1 else str(error)) from None
        return samples

    # ------------------------------------------------------------------ __call__

    def __call__(
        self,
        text: Any = None,
        text_pair: Any = None,
        text_target: Any = None,
        text_pair_target: Any = None,
        *,
        return_labels: bool = False,
        **kwargs,
    ) -> BatchEncoding:
        r"""
        Encode plain text as any transformers tokenizer does, or CPM-Bee dicts into the model's structured inputs.

        Plain text (a `str`, a list of them, words with `is_split_into_words=True`, or ids) goes through
        transformers' own encoding: `input_ids` (pieces missing from the vocabulary become `<unk>`) and
        `attention_mask`, lists unless `return_tensors` is given, one row per string, no padding or truncation
        unless asked, and the usual options (`return_special_tokens_mask`, `return_token_type_ids`, `stride`, ...).

        A CPM-Bee dict, or a list of items holding one (its strings are then laid out as CPM-Bee text: their
        tokens only, segment 0, all context), or any input with `return_labels=True`, is laid out as CPM-Bee
        reads it:

        - dict, default (generation): the original's prompt: every context token of the dict laid out with the
          answer leaves replaced by `<ans_N>` placeholders (so their text is ignored), then one `<s>` in the
          segment of the first answer leaf, `context_mask` 0. A dict without `"<ans>"` is all context.
          [`answer_segments`] lists all answer leaves when there are several.
        - dict with `return_labels=True` (training): the whole dict with the answer text in place, answer tokens
          `context_mask` 0; `labels[p]` is the id of token `p + 1` (`</s>` where that token is `<s>` or `p` is
          last) at answer positions and -100 elsewhere.

        Keys (`torch.long` tensors with `return_tensors="pt"`; lists otherwise, without the batch level for a
        single dict): `input_ids` [B, L] (ids >= `ext_offset` are columns of the ext table), `attention_mask`,
        `segment_ids`, `context_mask` [B, L], `segment_rel` [B, S, S], `ext_table_ids`, `ext_table_sub`,
        `ext_table_mask` [B, E] (the table is the same in every row; the mask marks the entries of the row's own
        item, which decoding may produce), `unk_allowed` [B] (1 when the item holds an unknown piece, so `<unk>`
        may be produced), `labels` [B, L]; on request `token_type_ids` (zeros), `special_tokens_mask` and `length`.
        Entries for `<ans_N>` typed into a context come after all others and have mask 0 in every row.

        Args:
            text: a str, a CPM-Bee dict or a list of them. CPM-Bee reads one input: `text_pair`, `text_target` and
                `text_pair_target` are refused (put the parts into one CPM-Bee dict).
            return_labels (`bool`): use the training layout and add `labels`.
            return_tensors (`"pt"`, `"np"` or `None`): `None` (the default) gives Python lists.
            padding (`False` by default, `True`/`"longest"` or `"max_length"`): pads with `<pad>`, segment 0,
                context 0, attention 0, label -100 on `padding_side` (default `self.padding_side`, `"left"`).
            max_length, truncation: for dicts, with `truncation=True`, keep the first `max_length` tokens of the
                laid-out dict before the answer is cut out (the original's `max_inp_length`); answer leaves cut off
                are dropped (not supported with `return_labels=True`). `max_length` is also the length for
                `padding="max_length"`.
            pad_to_multiple_of (`int`): round the padded length up to a multiple of it.
        """
        for name, value in (("text_pair", text_pair), ("text_target", text_target),
                            ("text_pair_target", text_pair_target)):
            if value is not None:
                raise ValueError(f"{name} is not supported by CpmBeeTokenizer: CPM-Bee reads one input, put the "
                                 "parts into one CPM-Bee dict (e.g. {'question': ..., 'context': ...})")
        if text is None:
            raise ValueError("nothing to encode: pass a str, a CPM-Bee dict or a list of them")
        if isinstance(text, (list, tuple)) and len(text) == 0:
            raise ValueError("empty batch: pass a str, a CPM-Bee dict or a non-empty list of them")
        if not isinstance(text, (str, dict, list, tuple)):
            raise ValueError(f"each item must be a str or a CPM-Bee dict, got {type(text).__name__}")
        kwargs = {**(kwargs.pop("tokenizer_kwargs", None) or {}), **kwargs}
        if return_labels or _is_structured(text):
            return self._encode_dicts(text, return_labels=return_labels, **kwargs)
        return super().__call__(text, **kwargs)

    def _encode_plus(self, text, text_pair=None, is_split_into_words: bool = False, **kwargs) -> BatchEncoding:
        """transformers' plain-text path (also `encode`). Pairs, given directly or as tuples in a batch, are refused.
        Words (`is_split_into_words=True`) are read as if each followed a space, so that they encode as the words
        of a sentence do (no vocabulary piece spans a space boundary)."""
        if text_pair is not None:
            raise ValueError("text pairs are not supported by CpmBeeTokenizer: CPM-Bee reads one input, put the "
                             "parts into one CPM-Bee dict (e.g. {'question': ..., 'context': ...})")
        if is_split_into_words and isinstance(text, str):
            text = [text]  # one word (transformers unwraps one-word lists in a batch)
        if is_split_into_words and isinstance(text, (list, tuple)) and text and isinstance(text[0], str):
            split = kwargs.get("split_special_tokens")
            text = self.convert_tokens_to_ids(
                [piece for word in text for piece in self.tokenize(" " + word, split_special_tokens=split)])
        return super()._encode_plus(text, is_split_into_words=is_split_into_words, **kwargs)

    def _encode_dicts(
        self,
        text: Any,
        return_labels: bool = False,
        add_special_tokens: bool = True,
        padding: bool | str | PaddingStrategy = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | TensorType | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        split_special_tokens: bool | None = None,
        verbose: bool = True,
        **kwargs,
    ) -> BatchEncoding:
        """The CPM-Bee layout of dicts (see [`__call__`]). `add_special_tokens` and `verbose` change nothing: the
        `<s>`/`</s>` around each segment are the layout itself."""
        padding, truncation, return_tensors = (
            value.value if hasattr(value, "value") else value for value in (padding, truncation, return_tensors))
        cut = self._check_dict_options(return_labels, padding_side, max_length, truncation, return_tensors, kwargs)
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        samples = self._encode_batch(text, training=return_labels, max_length=cut, split_special_tokens=split)
        columns, owned, _ = self._ext_table(samples)
        rows = [self._row(sample, columns, return_labels, bool(return_token_type_ids),
                          return_special_tokens_mask) for sample in samples]
        lengths = [len(row["input_ids"]) for row in rows]
        out = self._pad_rows(rows, padding, max_length, pad_to_multiple_of, padding_side or self.padding_side,
                             return_tensors)
        out.update(self._batch_tables(samples, columns, owned))
        if return_attention_mask is False:
            del out["attention_mask"]
        if return_length:
            out["length"] = lengths
        if return_tensors is None and not isinstance(text, (list, tuple)):
            return BatchEncoding(self._order({key: value[0] for key, value in out.items()}))
        return self._to_batch_encoding(out, len(samples), len(columns), return_tensors)

    @staticmethod
    def _check_dict_options(return_labels, padding_side, max_length, truncation, return_tensors, kwargs) -> int | None:
        """Validate the options of the dict layout (`kwargs` are the remaining ones) and return the truncation
        length."""
        for key in _PLAIN_TEXT_ONLY:
            if kwargs.pop(key, None):
                raise ValueError(f"{key} applies to plain text only: a CPM-Bee dict is laid out whole")
        kwargs.pop("sanitize_control_tokens", None)  # chat-template marking: dicts hold no template text
        if kwargs:
            raise TypeError(f"CpmBeeTokenizer got unsupported arguments for CPM-Bee dicts: {sorted(kwargs)}")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if truncation in (None, False, "do_not_truncate"):
            return None
        if return_labels:
            raise ValueError("truncation is not supported with return_labels=True")
        if max_length is None:
            raise ValueError("truncation=True needs max_length")
        if int(max_length) < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        return int(max_length)

    def _row(self, sample: _Sample, columns: dict, return_labels: bool, token_type_ids: bool = False,
             special_tokens_mask: bool = False) -> dict[str, list]:
        """One unpadded row: ids (ext pieces as `ext_offset + column`), segments, context and, for training, labels
        (`labels[p]` is the next token's id at answer positions, `</s>` before a `<s>` or at the end)."""
        offset, eos, bos = self.ext_offset, self.eos_token_id, self.bos_token_id
        ids = [index if sub == 0 else offset + columns[(index, sub)] for index, sub in zip(sample.ids, sample.subs)]
        row = {"input_ids": ids, "attention_mask": [1] * len(ids), "segment_ids": list(sample.segments),
               "context_mask": list(sample.context)}
        if return_labels:
            labels = [_IGNORE_INDEX] * len(ids)
            for p in range(len(ids)):
                if sample.context[p] == 0:
                    labels[p] = eos if p + 1 == len(ids) or sample.ids[p + 1] == bos else ids[p + 1]
            row["labels"] = labels
        if token_type_ids:
            row["token_type_ids"] = [0] * len(ids)
        if special_tokens_mask:
            row["special_tokens_mask"] = self.get_special_tokens_mask(ids, already_has_special_tokens=True)
        return row

    def _pad_rows(self, rows, padding, max_length, pad_to_multiple_of, padding_side, return_tensors) -> dict:
        """Per-token keys of the batch: rows padded with `<pad>`, segment 0, context 0, attention 0, label -100,
        token type 0, special-token mask 1."""
        lengths = [len(row["input_ids"]) for row in rows]
        target = max(lengths)
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(target, int(max_length))
        elif padding not in (True, "longest", False, "do_not_pad", None):
            raise ValueError(f"padding must be True/'longest', 'max_length' or False, got {padding!r}")
        do_pad = padding not in (False, "do_not_pad", None)
        if do_pad and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if not do_pad and return_tensors is not None and len(set(lengths)) > 1:
            raise ValueError("items have different lengths: use padding=True to return tensors")

        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "segment_ids": 0, "context_mask": 0,
                "labels": _IGNORE_INDEX, "token_type_ids": 0, "special_tokens_mask": 1}
        out: dict[str, list] = {key: [] for key in rows[0]}
        for row, length in zip(rows, lengths):
            extra = target - length if do_pad else 0
            for key in out:
                pad = [fill[key]] * extra
                out[key].append(pad + row[key] if padding_side == "left" else row[key] + pad)
        return out

    def _batch_tables(self, samples: list[_Sample], columns: dict, owned: list) -> dict[str, list]:
        """Per-row `segment_rel` (zero-padded to the largest), the shared ext table with each row's mask, and
        `unk_allowed`."""
        size = max(len(sample.segment_rel) for sample in samples)
        segment_rel = [[r + [0] * (size - len(r)) for r in sample.segment_rel]
                       + [[0] * size for _ in range(size - len(sample.segment_rel))] for sample in samples]
        table = sorted(columns.items(), key=lambda kv: kv[1])
        return {
            "segment_rel": segment_rel,
            "ext_table_ids": [[index for (index, _), _ in table] for _ in samples],
            "ext_table_sub": [[sub for (_, sub), _ in table] for _ in samples],
            "ext_table_mask": [[int(column in own) for _, column in table] for own in owned],
            "unk_allowed": [int(self.unk_token in sample.names) for sample in samples],
        }

    _KEY_ORDER = ("input_ids", "token_type_ids", "attention_mask", "segment_ids", "context_mask", "segment_rel",
                  "ext_table_ids", "ext_table_sub", "ext_table_mask", "unk_allowed", "labels", "special_tokens_mask",
                  "length")

    @classmethod
    def _order(cls, out: dict) -> dict:
        return {key: out[key] for key in cls._KEY_ORDER if key in out}

    @classmethod
    def _to_batch_encoding(cls, out: dict, batch: int, table_size: int, return_tensors) -> BatchEncoding:
        """Order the keys and convert to `return_tensors` (`None`: lists; ext tables keep their [B, E] shape)."""
        out = cls._order(out)
        if return_tensors is None:
            return BatchEncoding(out)
        tensors = {}
        for key, value in out.items():
            tensor = torch.tensor(value, dtype=torch.long)
            if key.startswith("ext_table"):
                tensor = tensor.view(batch, table_size)
            tensors[key] = tensor.numpy() if return_tensors == "np" else tensor
        return BatchEncoding(tensors)

    # ------------------------------------------------------------------ answers

    def answer_segments(self, data: Any, max_length: int | None = None, return_paths: bool = False):
        """Answer leaves of the generation layout in the order they are generated (the original's
        `predict_segments`): per item, the list of their segment ids, or with `return_paths=True` of
        `(segment_id, path)` pairs, `path` being the tuple of keys below `"<ans>"` (`()` when `"<ans>"` holds a
        str; the original's `answer_placeholders`). One list for one item, a list of lists for a list.
        `max_length` as in `__call__(truncation=True)`."""
        samples = self._encode_batch(data, max_length=max_length)
        result = [list(s.answers) if return_paths else [seg for seg, _ in s.answers] for s in samples]
        return result if isinstance(data, (list, tuple)) else result[0]

    def get_ext_tables(self, data: Any, max_length: int | None = None):
        """Per item, the id -> string table that decodes its generated ids (the original's `rev_ext_table`):
        batch ext ids of its ext pieces, and the base id of each sub-0 piece (e.g. `<unk>` -> its first
        unknown piece). The batch must be the same list, in the same order, that was encoded."""
        samples = self._encode_batch(data, max_length=max_length)
        _, _, strings = self._ext_table(samples)
        return strings if isinstance(data, (list, tuple)) else strings[0]

    def decode_answers(self, data: Any, generated_ids: Any, max_length: int | None = None):
        """Write generated answers into a deep copy of each item, as the original's `generate` does.

        `generated_ids` holds, per item, either the stream of ids generated after the prompt (a list, or a
        tensor [B, T]; 1-D for a single item) or a list with one id list per answer leaf (as a per-slot beam
        search returns). In a stream, answer leaves are filled in order: an answer ends at `</s>` (dropped); a
        `<s>` right after it (the next leaf's opening token) is skipped; after the last leaf the rest is
        ignored; trailing `<pad>` ids are dropped. In per-leaf lists a trailing `</s>` is dropped and an empty
        list means nothing was generated (`[</s>]` is an empty answer). Leaves with nothing generated are set to `None`. Text is CPM-Bee
        text (the original's decode: `<` comes out as `<<`; see [`unescape`])."""
        single = not isinstance(data, (list, tuple))
        items = [data] if single else list(data)
        if hasattr(generated_ids, "tolist"):
            generated_ids = generated_ids.tolist()
        generated_ids = list(generated_ids)
        if single and not (len(generated_ids) == 1 and _is_sequence(generated_ids[0])):
            generated_ids = [generated_ids]  # one stream, or one item's per-leaf lists
        if len(generated_ids) != len(items):
            raise ValueError(f"got {len(generated_ids)} generated sequences for {len(items)} items")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or _ANS not in item:
                raise ValueError(f"item {i} is not a CPM-Bee dict with an '<ans>' key")
        samples = self._encode_batch(items, max_length=max_length)
        _, _, strings = self._ext_table(samples)

        results = []
        for i, (item, sample, table, ids) in enumerate(zip(items, samples, strings, generated_ids)):
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            if ids and _is_sequence(ids[0]):
                answers = self._split_slots(ids, len(sample.answers), i)
            else:
                answers = self._split_stream([int(index) for index in ids], len(sample.answers))
            filled = copy.deepcopy(item)
            for (_, path), tokens in zip(sample.answers, answers):
                text = None if tokens is None else self.decode(tokens, ext_table=table)
                if not path:
                    filled[_ANS] = text
                    continue
                node = filled[_ANS]
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = text
            results.append(filled)
        return results[0] if single else results

    def _split_stream(self, ids: list[int], count: int) -> list[list[int] | None]:
        """Cut a generated stream into the ids of each answer leaf (see [`decode_answers`])."""
        bos, eos = self.bos_token_id, self.eos_token_id
        while ids and ids[-1] == self.pad_token_id:
            ids.pop()
        answers: list[list[int] | None] = [None] * count
        current, opening = 0, False
        for index in ids:
            if current >= count:
                break
            if opening and index == bos:
                opening = False
                continue
            opening = False
            if answers[current] is None:
                answers[current] = []
            if index == eos:
                current += 1
                opening = True
                continue
            answers[current].append(index)
        return answers

    def _split_slots(self, slots: list, count: int, item: int) -> list[list[int] | None]:
        """Per-leaf id lists: drop a trailing `</s>`; an empty list is a leaf with nothing generated."""
        if len(slots) > count:
            raise ValueError(f"item {item}: {len(slots)} answer lists for {count} answer leaves")
        answers: list[list[int] | None] = [None] * count
        for k, tokens in enumerate(slots):
            tokens = [int(index) for index in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]
            if not tokens:
                continue
            if tokens[-1] == self.eos_token_id:
                tokens.pop()
            answers[k] = tokens
        return answers

    def post_process_generation(self, data: Any, sequences: Any, prompt_length: int, max_length: int | None = None):
        """[`decode_answers`] for the output of `generate`: `sequences` [B, prompt_length + T] (or 1-D for one
        item) holds the prompt (`input_ids`, padding included) followed by the generated ids."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        if sequences and not isinstance(sequences[0], (list, tuple)):
            sequences = [sequences]
        generated = [list(row[prompt_length:]) for row in sequences]
        if not isinstance(data, (list, tuple)):
            if len(generated) != 1:
                raise ValueError(f"got {len(generated)} sequences for one item")
            generated = generated[0]
        return self.decode_answers(data, generated, max_length=max_length)


__all__ = ["CpmBeeTokenizer"]
