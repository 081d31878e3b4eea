"""Processor of VisCPM-Chat: one image plus a question (and the chat history) to model inputs.

The original `VisCPMChat.chat()` asks CPM-Bee with the structured prompt

    {"image": "<unk>" * 64, "context": history, "question": question, "<ans>": ""}

(keys in that order; history is `"User: " + q + "\\n" + "AI: " + a + "\\n"` per past turn) and replaces the 64
`<unk>` embeddings of the image leaf with the vision features. This processor builds the same prompt, encodes it with
[`CpmBeeTokenizer`] (same ids, segments and ext table as the original) and the image with [`VisCPMImageProcessor`]
(same pixels), and says where the image slots are (`image_bound`).

User text is always text: the question and the history are escaped (`<` becomes CPM-Bee's `<<`), so a `<`, `<ans>`
or `<unk>` typed by a user stays literal. (The original inserts them raw: `a<b` raises, `<unk>` becomes an extra
image-like slot, `<ans>`/`<s>` become control tokens.) For text without `<` the encoding is the original's.

Only torch, transformers and the standard library (plus sibling files) are imported: it ships as remote code.
"""

from collections import OrderedDict
from typing import Any

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_viscpm import VisCPMImageProcessor
from .tokenization_cpmbee import CpmBeeTokenizer


_IMAGE_SEGMENT = 2  # "<root>" is segment 0, the "image" key 1, its leaf 2 (the image leaf always comes first)
_IMAGE_PART_KEYS = ("image", "url", "path", "base64")


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value


def _is_conversation(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_message(m) for m in value)


class VisCPMChatProcessor(ProcessorMixin):
    r"""
    VisCPM-Chat processor: [`VisCPMImageProcessor`] + [`CpmBeeTokenizer`].

    `processor(images=image, text=question, context=history)` returns a [`BatchFeature`] with the tokenizer's tensors
    (`input_ids`, `attention_mask`, `segment_ids`, `context_mask`, `segment_rel`, `ext_table_ids`, `ext_table_sub`,
    `ext_table_mask`, `unk_allowed`), `pixel_values` [B, 3, 224, 224] and `image_bound` [B, 2] (start, end) of the
    image slots in each (padded) row. `text` may also be a chat (list of messages) or a prompt dict from
    [`apply_chat_template`].

    Args:
        image_processor ([`VisCPMImageProcessor`]), tokenizer ([`CpmBeeTokenizer`]).
        query_num (`int`, defaults to 64): number of image slots (the model's query tokens).
        max_length (`int`, defaults to 3000): prompt limit, the original's `max_inp_length` (`None`: no limit).
        chat_template: unused (chats are laid out in code, see [`apply_chat_template`]); kept for the API.
    """

    def __init__(self, image_processor=None, tokenizer=None, query_num: int = 64, max_length: int | None = 3000,
                 chat_template=None, **kwargs):
        if image_processor is None or tokenizer is None:
            raise ValueError("VisCPMChatProcessor needs an image_processor and a tokenizer")
        if int(query_num) < 1:
            raise ValueError(f"query_num must be positive, got {query_num}")
        self.query_num = int(query_num)
        self.max_length = None if max_length is None else int(max_length)
        # Decode tables of recent prompts (see `post_process_image_text_to_text`).
        self._recent_tables: OrderedDict = OrderedDict()
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + ["pixel_values", "image_bound"]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # Load the two parts by class, so that no Auto registration is needed (also as remote code).
        kwargs.pop("trust_remote_code", None)
        return [
            VisCPMImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs),
            CpmBeeTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs),
        ]

    # ------------------------------------------------------------------ prompts

    def build_prompt(self, question: str, context: str = "") -> dict:
        """The original's prompt dict for a raw question and raw history (both escaped here)."""
        for name, value in (("question", question), ("context", context)):
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a str, got {type(value).__name__}")
        escape = self.tokenizer.escape
        return {"image": "<unk>" * self.query_num, "context": escape(context), "question": escape(question),
                "<ans>": ""}

    @staticmethod
    def _content_text_and_images(message: dict, where: str) -> tuple[str, list]:
        content = message.get("content")
        if content is None:
            return "", []
        if isinstance(content, str):
            return content, []
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"{where}: content must be a str or a list of parts, got {type(content).__name__}")
        texts, images = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}: a text part needs a str 'text'")
                texts.append(part["text"])
            elif kind == "image":
                images.append(next((part[key] for key in _IMAGE_PART_KEYS if part.get(key) is not None), None))
            else:
                raise ValueError(f"{where}: unsupported content part {part!r} (VisCPM-Chat takes 'text' and "
                                 "'image' parts)")
        return "\n".join(texts), images

    def conversation_to_prompt(self, messages: list[dict]) -> tuple[str, str, Any]:
        """`(question, context, image)` of a chat: the last user turn is the question, earlier user/assistant pairs
        form the history in the original's format, and the (at most one) image part gives the image (`None` for a
        bare `{"type": "image"}` placeholder or no image part). Texts are returned raw (not escaped)."""
        if not _is_conversation(messages):
            raise ValueError("a chat must be a non-empty list of {'role': ..., 'content': ...} messages")
        turns, images = [], []
        for i, message in enumerate(messages):
            role = message["role"]
            expected = "user" if i % 2 == 0 else "assistant"
            if role == "system":
                raise ValueError("VisCPM-Chat has no system prompt: remove the 'system' message")
            if role not in ("user", "assistant"):
                raise ValueError(f"message {i}: unknown role {role!r} (use 'user' and 'assistant')")
            if role != expected:
                raise ValueError(f"message {i} has role {role!r}, expected {expected!r}: VisCPM-Chat turns alternate "
                                 "user/assistant, starting with the user")
            text, found = self._content_text_and_images(message, f"message {i}")
            turns.append(text)
            images.extend(found)
        if messages[-1]["role"] != "user":
            raise ValueError("the chat must end with a user message: VisCPM-Chat cannot continue an assistant message")
        if len(images) > 1:
            raise ValueError(f"the chat has {len(images)} image parts: VisCPM-Chat sees one image per conversation")
        context = "".join(f"User: {q}\nAI: {a}\n" for q, a in zip(turns[:-1:2], turns[1::2]))
        return turns[-1], context, (images[0] if images else None)

    def apply_chat_template(self, conversation, chat_template=None, tokenize: bool = False, return_dict: bool = False,
                            return_tensors: str | None = "pt", add_generation_prompt: bool = True,
                            continue_final_message: bool = False, processor_kwargs: dict | None = None, **kwargs):
        """
        Lay out a chat (or a list of chats) as VisCPM-Chat prompts.

        Messages use the standard form `{"role": "user" | "assistant", "content": str | [{"type": "image", ...},
        {"type": "text", "text": ...}]}`; image parts may hold the image under `"image"`, `"url"`, `"path"` or
        `"base64"`. The last user message is the question, earlier turns the history (see
        [`conversation_to_prompt`]). There is no Jinja template: the layout is fixed by the original.

        With `tokenize=False` returns the prompt dict (a list for a list of chats), which `__call__` accepts as
        `text`. With `tokenize=True` returns the encoded [`BatchFeature`] (`return_dict=True`) or its `input_ids`.
        `continue_final_message` (an assistant prefill) is not supported; `add_generation_prompt` is implied.
        """
        if chat_template is not None:
            raise ValueError("VisCPM-Chat lays out chats in code and takes no chat_template")
        if continue_final_message:
            raise ValueError("VisCPM-Chat cannot continue an assistant message (no assistant prefill)")
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and all(
            _is_conversation(c) for c in conversation)
        conversations = list(conversation) if batched else [conversation]
        if not tokenize:
            prompts = []
            for chat in conversations:
                question, context, _ = self.conversation_to_prompt(chat)
                prompts.append(self.build_prompt(question, context))
            return prompts if batched else prompts[0]
        call_kwargs = {**(processor_kwargs or {}), **kwargs}
        for key in ("tokenize", "return_dict", "add_generation_prompt", "sanitize_control_tokens"):
            call_kwargs.pop(key, None)
        out = self(text=conversations if batched else conversations[0], return_tensors=return_tensors, **call_kwargs)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ __call__

    def _items(self, text, context) -> tuple[list[dict], list, bool]:
        """Prompt dicts, per-item images found in chats, and whether the input was a batch."""
        if text is None:
            raise ValueError("text is required: a question, a list of questions, a chat or a list of chats")
        if isinstance(text, str) or isinstance(text, dict) or _is_conversation(text):
            texts, batched = [text], False
        elif isinstance(text, (list, tuple)) and len(text) > 0:
            texts, batched = list(text), True
        else:
            raise ValueError(f"text must be a str, a chat, a prompt dict or a non-empty list of them, got {text!r}")
        if context is None:
            contexts = [None] * len(texts)
        elif isinstance(context, str):
            if batched:
                raise ValueError("give one context per question (a list) for a batch")
            contexts = [context]
        else:
            contexts = list(context)
            if len(contexts) != len(texts):
                raise ValueError(f"got {len(contexts)} contexts for {len(texts)} questions")

        prompts, chat_images = [], []
        for i, (item, history) in enumerate(zip(texts, contexts)):
            where = f"item {i}: " if batched else ""
            if _is_conversation(item):
                if history is not None:
                    raise ValueError(f"{where}a chat carries its own history: do not pass context with it")
                question, history, image = self.conversation_to_prompt(item)
                prompts.append(self.build_prompt(question, history))
                chat_images.append(image)
            elif isinstance(item, dict):
                if history is not None:
                    raise ValueError(f"{where}a prompt dict carries its own context: do not pass context with it")
                keys = list(item)
                if not keys or keys[0] != "image" or item["image"] != "<unk>" * self.query_num or "<ans>" not in item:
                    raise ValueError(f"{where}a prompt dict must start with 'image': '<unk>' * {self.query_num} and "
                                     "have an '<ans>' key (build it with apply_chat_template or build_prompt)")
                prompts.append(item)
                chat_images.append(None)
            elif isinstance(item, str):
                prompts.append(self.build_prompt(item, "" if history is None else history))
                chat_images.append(None)
            else:
                raise ValueError(f"{where}expected a question str, a chat or a prompt dict, got {type(item).__name__}")
        return prompts, chat_images, batched

    def _images_per_item(self, images, chat_images: list, batched: bool) -> list | None:
        n = len(chat_images)
        if images is None:
            given = [None] * n
        elif not batched:
            if isinstance(images, (list, tuple)):
                if len(images) != 1:
                    raise ValueError(f"got {len(images)} images for one question: VisCPM-Chat takes one image")
                images = images[0]
            given = [images]
        else:
            if not isinstance(images, (list, tuple)) and not (hasattr(images, "ndim") and images.ndim == 4):
                raise ValueError(f"got one image for {n} questions: pass a list with one image per question")
            given = list(images)
            if len(given) != n:
                raise ValueError(f"got {len(given)} images for {n} questions: pass one image per question")
        merged = []
        for i, (explicit, from_chat) in enumerate(zip(given, chat_images)):
            if explicit is not None and from_chat is not None:
                raise ValueError(f"item {i}: the image is given both in the chat and as `images`")
            merged.append(explicit if explicit is not None else from_chat)
        if all(image is None for image in merged):
            return None
        missing = [i for i, image in enumerate(merged) if image is None]
        if missing:
            raise ValueError(f"items {missing} have no image while others do: give an image for every item, or "
                             "none (then pass the model `vision_hidden_states`)")
        return merged

    def __call__(
        self,
        images: Any = None,
        text: Any = None,
        context: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        images_kwargs: dict | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Encode (image, question[, context]) items for VisCPM-Chat.

        Args:
            images: one image (any input [`VisCPMImageProcessor`] takes) per item; `None` encodes the text only
                (reuse image features through the model's `vision_hidden_states`). Images inside chat messages are
                used too.
            text: a question (`str`, the empty question is allowed as in the original), a chat (list of messages, see
                [`apply_chat_template`]), a prompt dict, or a list of these (a batch, padded).
            context: the raw history of each question (`"User: q\\nAI: a\\n"` per turn, as `chat()` returns it);
                `None` or `""` for a first turn.
            return_tensors (`"pt"`, `"np"` or `None`).
            padding, padding_side, pad_to_multiple_of: as [`CpmBeeTokenizer`] (left padding by default).
            max_length: prompt limit in tokens; `None` uses `self.max_length` (3000, the original's; set it to `None`
                for no limit). A longer prompt is an error naming its length: the original would cut its end, answer
                slot included, and fail.
            images_kwargs: extra arguments of the image processor.

        Returns:
            [`BatchFeature`] with the tokenizer's keys, `pixel_values` (when there are images) and `image_bound`.
        """
        for key in ("add_special_tokens", "truncation", "return_attention_mask", "verbose", "videos", "audio"):
            value = kwargs.pop(key, None)
            if key in ("videos", "audio") and value is not None:
                raise ValueError(f"VisCPM-Chat does not take {key}")
        if kwargs:
            raise TypeError(f"VisCPMChatProcessor got unsupported arguments: {sorted(kwargs)}")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        limit = self.max_length if max_length is None else int(max_length)

        prompts, chat_images, batched = self._items(text, context)
        images = self._images_per_item(images, chat_images, batched)

        encoding = self.tokenizer(prompts, return_tensors="pt", padding=padding, padding_side=padding_side,
                                  pad_to_multiple_of=pad_to_multiple_of)
        lengths = encoding["attention_mask"].sum(-1)
        if limit is not None:
            for i, length in enumerate(lengths.tolist()):
                # The original lays out the whole dict, answer placeholder `<ans_1>` last, and cuts it at
                # max_inp_length: it keeps an answer slot only if that placeholder survives the cut.
                if length + 1 > limit:
                    where = f"item {i}: " if batched else ""
                    raise ValueError(f"{where}the prompt is {length + 1} tokens, over max_length={limit} (the "
                                     "original's max_inp_length): shorten the context, e.g. drop the oldest turns")
        data = dict(encoding)
        data["image_bound"] = self._image_bound(encoding)
        self._remember(prompts, encoding, data["image_bound"])

        if images is not None:
            pixels = self.image_processor(images, return_tensors="pt", **(images_kwargs or {}))
            data["pixel_values"] = pixels["pixel_values"]
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        elif return_tensors is None:
            data = {key: value.tolist() for key, value in data.items()}
        return BatchFeature(data=data)

    def _image_bound(self, encoding) -> torch.Tensor:
        """(start, end) of the `<unk>` slots of the image leaf in each row: its tokens minus `<s>` and `</s>`."""
        in_image = (encoding["segment_ids"] == _IMAGE_SEGMENT) & encoding["attention_mask"].bool()
        bounds = []
        for row, mask in enumerate(in_image):
            positions = mask.nonzero().flatten()
            start, end = int(positions[0]) + 1, int(positions[-1])
            if end - start != self.query_num or len(positions) != self.query_num + 2:
                raise ValueError(f"row {row}: the image leaf has {len(positions) - 2} slots, expected {self.query_num}")
            bounds.append((start, end))
        return torch.tensor(bounds, dtype=torch.long)

    # ------------------------------------------------------------------ decoding

    _MAX_REMEMBERED = 64

    def _remember(self, prompts: list[dict], encoding, image_bound: torch.Tensor) -> None:
        """Keep the decode table and image slots of these prompts, keyed by their unpadded ids, for decoding later."""
        tables = self.tokenizer.get_ext_tables(prompts)
        for ids, mask, table, (start, end) in zip(encoding["input_ids"], encoding["attention_mask"], tables,
                                                  image_bound.tolist()):
            mask = mask.bool()
            key = tuple(ids[mask].tolist())
            offset = int(mask.nonzero()[0]) if mask.any() else 0
            self._recent_tables.pop(key, None)
            self._recent_tables[key] = (table, start - offset, end - offset)
            while len(self._recent_tables) > self._MAX_REMEMBERED:
                self._recent_tables.popitem(last=False)

    def _table_for(self, ids: list[int]) -> tuple[dict, int, int, int]:
        """Decode table, image slots and length of the most recent remembered prompt that `ids` starts with."""
        for key in reversed(self._recent_tables):
            if len(key) <= len(ids) and tuple(ids[: len(key)]) == key:
                table, start, end = self._recent_tables[key]
                return table, start, end, len(key)
        return {}, 0, 0, 0

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True,
                                        ext_tables: list[dict] | None = None, **kwargs) -> list[str]:
        """
        Decode rows of ids (prompts, or prompts followed by generated ids) to CPM-Bee text, as the original decodes.

        Ids of the batch ext table (>= vocab size: out-of-vocabulary pieces the model copies) are decoded through the
        table of the row's prompt: `ext_tables[i]` if given (see [`CpmBeeTokenizer.get_ext_tables`]), otherwise the
        table of the most recent prompt encoded by this processor that the row starts with; ids no table explains
        are dropped. Left padding is removed. Used by `pipeline("image-text-to-text")` on both the prompt and the
        output, whose difference is the answer.
        """
        kwargs.pop("clean_up_tokenization_spaces", None)
        if hasattr(generated_outputs, "tolist"):
            generated_outputs = generated_outputs.tolist()
        rows = [generated_outputs] if generated_outputs and isinstance(generated_outputs[0], int) else generated_outputs
        if ext_tables is not None and len(ext_tables) != len(rows):
            raise ValueError(f"got {len(ext_tables)} ext tables for {len(rows)} rows")
        pad, vocab_size = self.tokenizer.pad_token_id, self.tokenizer.vocab_size
        texts = []
        for i, row in enumerate(rows):
            row = [int(index) for index in row]
            start = 0
            while start < len(row) and row[start] == pad:
                start += 1
            row = row[start:]
            if ext_tables is not None:
                table, start, end = ext_tables[i] or {}, 0, 0
            else:
                # The image slots of a known prompt are left out: they are `<unk>`, which the original's table maps
                # to the first unknown piece of the text (right for generated ids, wrong over the image).
                table, start, end, _ = self._table_for(row)
            row = row[:start] + row[end:]
            row = [index for index in row if index < vocab_size or index in table]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=skip_special_tokens, ext_table=table, **kwargs))
        return texts


__all__ = ["VisCPMChatProcessor"]
