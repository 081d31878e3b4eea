"""Tokenizer of CPM-Bee, the bilingual language model under VisCPM.

CPM-Bee reads *structured* input: a nested dict of strings (the "CPM-Bee dict") is laid out as a tree of
segments, each `<s> tokens </s>`, and the top-level key `"<ans>"` marks the part the model has to write.
This module turns such dicts (or plain strings) into the tensors the model consumes, with the same token
ids, segment numbering, segment relations and ext-table numbering as the original VisCPM code, and turns
generated ids back into answers written into the dict.

Text conventions (the original's): in every string, `<<` is a literal `<` and `<name>` is a special token.
Pieces missing from the vocabulary and numbered specials (`<unk_2>`, `<option_1>`, ...) are represented by
a base token plus a `sub` index; pairs with `sub > 0` live in a per-batch *ext table* and appear in
`input_ids` as `vocab_size + column`.

Only torch, transformers and the standard library are imported: the file also ships as remote code.
"""

import copy
import os
from typing import Any

import torch
from transformers import BatchEncoding, PreTrainedTokenizer


VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt"}

# How the vocabulary file spells the two whitespace tokens.
_FILE_FORMS = {"</n>": "\n", "</_>": " "}
_ANS = "<ans>"
_IGNORE_INDEX = -100


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

    Calling it on one item or a list of items (a plain `str`, or a CPM-Bee dict of nested dicts with `str`
    leaves) returns a [`BatchEncoding`] with `input_ids`, `attention_mask`, `segment_ids`, `context_mask`,
    `segment_rel`, `ext_table_ids`, `ext_table_sub`, `ext_table_mask`, `unk_allowed` (and `labels` with
    `return_labels=True`). See [`~CpmBeeTokenizer.__call__`].

    Args:
        vocab_file (`str`): one token per line; `</n>` stands for a newline and `</_>` for a space.
        bos_token, eos_token, pad_token, unk_token (`str`): `<s>`, `</s>`, `<pad>`, `<unk>`.
        padding_side (`str`, defaults to `"left"`): left padding suits generation.
        max_segment_depth (`int`, defaults to 8): depth cap of the segment-relation buckets.
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
        **kwargs,
    ):
        self.vocab_file = vocab_file
        self.max_segment_depth = int(max_segment_depth)
        self._load_vocab(vocab_file)
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                            ("unk_token", unk_token)):
            if str(token) not in self.encoder:
                raise ValueError(f"{name} {str(token)!r} is not in the vocabulary {vocab_file}")
        kwargs.setdefault("special_tokens_pattern", "none")
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            padding_side=padding_side,
            max_segment_depth=max_segment_depth,
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

    def _split(self, text: str) -> list[tuple[str, int]]:
        """Cut CPM-Bee text into `(piece, vocabulary id)`; the id is -1 for out-of-vocabulary pieces and for
        special tokens missing from the vocabulary. Runs of unknown characters form one piece."""
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
            self._cut_plain("".join(plain), out)
            plain = []
            special = text[at:close + 1]
            out.append((special, self.encoder.get(special, -1)))
            pos = close + 1
        self._cut_plain("".join(plain), out)
        return out

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
        if name not in self.encoder:
            raise ValueError(f"unknown special token {piece!r}: neither it nor its base {name!r} is in the "
                             "vocabulary (write '<<' for a literal '<')")
        return name

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Pieces of CPM-Bee text (escapes resolved, special tokens kept whole). Raises `ValueError` on malformed
        text or an unknown special token."""
        pieces = self._split(text)
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
            index = self.encoder.get(_special_base(token))
        return self.encoder[self.unk_token] if index is None else index

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
        escaped, negative ids are skipped. Ids at or above `vocab_size` need `ext_table`."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ext_table = ext_table or {}
        parts = []
        for index in token_ids:
            index = int(index)
            if index in ext_table:
                parts.append(ext_table[index])
            elif index < 0:
                continue
            elif index >= self.vocab_size:
                raise ValueError(f"id {index} refers to the batch ext table (ids >= {self.vocab_size}); pass "
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

    def _encode_text(self, text: str, sample: _Sample, where: str) -> list[tuple[int, int]]:
        """(base id, sub) of each piece of one string, numbering ext pieces in the sample's name tables."""
        try:
            pieces = self._split(text)
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
            tokens.append((self.encoder[name], sub))
        return tokens

    def _encode_item(self, item: Any, training: bool, max_length: int | None) -> _Sample:
        """Encode one item into the generation layout (default) or the training layout."""
        sample = _Sample()
        if isinstance(item, str):
            for index, sub in self._encode_text(item, sample, "text"):
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
            tokens = [(bos, 0)] + self._encode_text(text, sample, origins[seg])
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

    @staticmethod
    def _flatten_tree(item: dict, training: bool):
        """The segments of a CPM-Bee dict: root, then every key followed by its value, depth first (the original's
        order). Returns per segment its text, depth, parent, whether it is predicted and where it comes from (for
        errors), and the `(segment, path below "<ans>")` of each answer leaf. In the generation layout an answer
        leaf's text is replaced by `<ans_N>`, as the original does, so that segments and ext numbering match."""
        texts, depths, parents, predict, origins = ["<root>"], [0], [-1], [False], ["data"]
        answer_leaves: list[tuple[int, tuple]] = []

        def walk(node: Any, depth: int, parent: int, in_answer: bool, path: tuple) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if not isinstance(key, str):
                        raise ValueError(f"key {key!r} of {_path_str(path)} is not a str")
                    texts.append(key)
                    depths.append(depth)
                    parents.append(parent)
                    predict.append(False)
                    origins.append(f"key {key!r} of {_path_str(path)}")
                    walk(value, depth + 1, len(texts) - 1, in_answer or (depth == 1 and key == _ANS), path + (key,))
                return
            if in_answer and not training:
                if node is not None and not isinstance(node, str):
                    raise ValueError(f"{_path_str(path)} must be a str or None, got {type(node).__name__}")
                answer_leaves.append((len(texts), path[1:]))
                node = f"<ans_{len(answer_leaves)}>"
            elif isinstance(node, (list, tuple)):
                raise ValueError(f"{_path_str(path)} is a {type(node).__name__}: CPM-Bee dict leaves must be str "
                                 "(lists are not supported)")
            elif not isinstance(node, str):
                raise ValueError(f"{_path_str(path)} must be a str, got {type(node).__name__}")
            texts.append(node)
            depths.append(depth)
            parents.append(parent)
            predict.append(in_answer)
            origins.append(_path_str(path))

        walk(item, 1, 0, False, ())
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
        """Bucket of every segment pair from their tree distance through the lowest common ancestor."""
        n, cap = len(depths), self.max_segment_depth - 1
        chains = []
        for seg in range(n):
            chains.append((chains[parents[seg]] + (seg,)) if parents[seg] >= 0 else (seg,))
        rel = [[0] * n for _ in range(n)]
        for a in range(n):
            chain_a = chains[a]
            for b in range(a + 1, n):
                chain_b = chains[b]
                common = 0
                for x, y in zip(chain_a, chain_b):
                    if x != y:
                        break
                    common += 1
                up, down = min(depths[a] - common + 1, cap), min(depths[b] - common + 1, cap)
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
        vocab_size = self.vocab_size
        columns: dict[tuple[int, int], int] = {}
        owned, strings = [], []
        for sample in samples:
            own, table = set(), {}
            for name, subs in sample.names.items():
                if name == _ANS:
                    continue
                base = self.encoder[name]
                for piece, sub in subs.items():
                    if sub == 0:
                        table[base] = piece
                        continue
                    column = columns.setdefault((base, sub), len(columns))
                    own.add(column)
                    table[vocab_size + column] = piece
            owned.append(own)
            strings.append(table)
        ans_id = self.encoder.get(_ANS, -1)
        for sample, table in zip(samples, strings):
            by_sub = {sub: piece for piece, sub in sample.names.get(_ANS, {}).items()}
            for index, sub in zip(sample.ids, sample.subs):
                if sub and (index, sub) not in columns:
                    columns[(index, sub)] = len(columns)
                if sub and index == ans_id:
                    table.setdefault(vocab_size + columns[(index, sub)], by_sub[sub])
        return columns, owned, strings

    def _encode_batch(self, data: Any, training: bool = False, max_length: int | None = None):
        items = data if isinstance(data, (list, tuple)) else [data]
        if len(items) == 0:
            raise ValueError("empty batch: pass a str, a CPM-Bee dict or a non-empty list of them")
        samples = []
        for i, item in enumerate(items):
            try:
                samples.append(self._encode_item(item, training, max_length))
            except ValueError as error:
                raise ValueError(f"item {i}: {error}" if len(items) > 1 else str(error)) from None
        return samples

    # ------------------------------------------------------------------ __call__

    def __call__(
        self,
        text: Any = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        return_labels: bool = False,
        padding_side: str | None = None,
        max_length: int | None = None,
        truncation: bool | str | None = None,
        pad_to_multiple_of: int | None = None,
        **kwargs,
    ) -> BatchEncoding:
        r"""
        Encode one item or a list of items into model inputs (one row per item).

        An item is CPM-Bee text (`str`) or a CPM-Bee dict. Layouts:

        - `str`: its tokens only (no `<s>`/`</s>`), segment 0, all context, `segment_rel` `[[0]]`.
        - dict, default (generation): the original's prompt: every context token of the dict laid out with the
          answer leaves replaced by `<ans_N>` placeholders (so their text is ignored), then one `<s>` in the
          segment of the first answer leaf, `context_mask` 0. A dict without `"<ans>"` is all context.
          [`answer_segments`] lists all answer leaves when there are several.
        - dict with `return_labels=True` (training): the whole dict with the answer text in place, answer tokens
          `context_mask` 0; `labels[p]` is the id of token `p + 1` (`</s>` where that token is `<s>` or `p` is
          last) at answer positions and -100 elsewhere.

        Returned tensors (`torch.long`): `input_ids` [B, L] (ids >= `vocab_size` are columns of the ext table),
        `attention_mask`, `segment_ids`, `context_mask` [B, L], `segment_rel` [B, S, S], `ext_table_ids`,
        `ext_table_sub`, `ext_table_mask` [B, E] (the table is the same in every row; the mask marks the
        entries of the row's own item, which decoding may produce), `unk_allowed` [B] (1 when the item holds
        an unknown piece, so `<unk>` may be produced) and `labels` [B, L]. Entries for `<ans_N>` typed into a
        context come after all others and have mask 0 in every row.

        Args:
            text: the item or list of items.
            return_tensors (`"pt"`, `"np"` or `None`): `None` gives Python lists.
            padding (`True`/`"longest"`, `"max_length"` or `False`): pads with `<pad>`, segment 0, context 0,
                attention 0, label -100.
            return_labels (`bool`): use the training layout and add `labels`.
            padding_side (`"left"` or `"right"`): defaults to `self.padding_side` (`"left"`).
            max_length, truncation: with `truncation=True`, keep the first `max_length` tokens of the laid-out
                dict before the answer is cut out (the original's `max_inp_length`); answer leaves cut off are
                dropped. Not supported with `return_labels=True`. `max_length` is also the length for
                `padding="max_length"`.
            pad_to_multiple_of (`int`): round the padded length up to a multiple of it.
        """
        cut = self._check_call_options(text, return_labels, padding_side, max_length, truncation, kwargs)
        padding_side = padding_side or self.padding_side
        samples = self._encode_batch(text, training=return_labels, max_length=cut)
        columns, owned, _ = self._ext_table(samples)
        rows = [self._row(sample, columns, return_labels) for sample in samples]
        out = self._pad_rows(rows, padding, max_length, pad_to_multiple_of, padding_side, return_tensors)
        out.update(self._batch_tables(samples, columns, owned))
        return self._to_batch_encoding(out, len(samples), len(columns), return_tensors)

    @staticmethod
    def _check_call_options(text, return_labels, padding_side, max_length, truncation, kwargs) -> int | None:
        """Validate the call's options (`kwargs` are the unnamed ones) and return the truncation length."""
        for key in ("text_pair", "text_target", "text_pair_target"):
            if kwargs.pop(key, None) is not None:
                raise ValueError(f"{key} is not supported by CpmBeeTokenizer: put everything in one CPM-Bee dict")
        # Standard arguments that change nothing here (always given, or harmless at their defaults).
        for key in ("add_special_tokens", "return_attention_mask", "verbose", "split_special_tokens"):
            kwargs.pop(key, None)
        for key in ("return_token_type_ids", "stride", "is_split_into_words", "return_overflowing_tokens",
                    "return_special_tokens_mask", "return_offsets_mapping", "return_length", "tokenizer_kwargs"):
            if key in kwargs and not kwargs[key]:
                del kwargs[key]
        if kwargs:
            raise TypeError(f"CpmBeeTokenizer.__call__ got unsupported arguments: {sorted(kwargs)}")
        if text is None:
            raise ValueError("nothing to encode: pass a str, a CPM-Bee dict or a list of them")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if truncation in (None, False, "do_not_truncate"):
            return None
        if return_labels:
            raise ValueError("truncation is not supported with return_labels=True")
        if max_length is None:
            raise ValueError("truncation=True needs max_length")
        if int(max_length) < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        return int(max_length)

    def _row(self, sample: _Sample, columns: dict, return_labels: bool) -> dict[str, list]:
        """One unpadded row: ids (ext pieces as `vocab_size + column`), segments, context and, for training, labels
        (`labels[p]` is the next token's id at answer positions, `</s>` before a `<s>` or at the end)."""
        vocab_size, eos, bos = self.vocab_size, self.eos_token_id, self.bos_token_id
        ids = [index if sub == 0 else vocab_size + columns[(index, sub)] for index, sub in zip(sample.ids, sample.subs)]
        row = {"input_ids": ids, "segment_ids": list(sample.segments), "context_mask": list(sample.context)}
        if return_labels:
            labels = [_IGNORE_INDEX] * len(ids)
            for p in range(len(ids)):
                if sample.context[p] == 0:
                    labels[p] = eos if p + 1 == len(ids) or sample.ids[p + 1] == bos else ids[p + 1]
            row["labels"] = labels
        return row

    def _pad_rows(self, rows, padding, max_length, pad_to_multiple_of, padding_side, return_tensors) -> dict:
        """Per-token keys of the batch: rows padded with `<pad>`, segment 0, context 0, attention 0, label -100."""
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
                "labels": _IGNORE_INDEX}
        out: dict[str, list] = {key: [] for key in ("input_ids", "attention_mask", "segment_ids", "context_mask")}
        if "labels" in rows[0]:
            out["labels"] = []
        for row, length in zip(rows, lengths):
            extra = target - length if do_pad else 0
            row["attention_mask"] = [1] * length
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

    @staticmethod
    def _to_batch_encoding(out: dict, batch: int, table_size: int, return_tensors) -> BatchEncoding:
        """Order the keys and convert to `return_tensors` (`None`: lists; ext tables keep their [B, E] shape)."""
        order = ["input_ids", "attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids",
                 "ext_table_sub", "ext_table_mask", "unk_allowed", "labels"]
        out = {key: out[key] for key in order if key in out}
        if return_tensors is None:
            return BatchEncoding(out)
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
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
