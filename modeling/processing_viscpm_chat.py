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

Training (TRL's `SFTTrainer` and its vision-language collator): a chat that ends with the assistant's answer
encodes, through [`~VisCPMChatProcessor.apply_chat_template`], as the same prompt followed by the answer and `</s>`,
with `assistant_masks` on what the model has to write (see there).

Decoding is stateless: [`~VisCPMChatProcessor.post_process_image_text_to_text`] reads everything from the ids it is
given (see there for the one thing ids cannot carry: the spelling of out-of-vocabulary pieces).

Only torch, transformers and the standard library (plus sibling files) are imported: it ships as remote code.
"""

import base64
import binascii
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import (
    ImagesKwargs,
    MultiModalData,
    ProcessingKwargs,
    ProcessorMixin,
    TextKwargs,
)

from .image_processing_viscpm import VisCPMImageProcessor
from .tokenization_cpmbee import CpmBeeTokenizer


_IMAGE_SEGMENT = 2  # "<root>" is segment 0, the "image" key 1, its leaf 2 (the image leaf always comes first)


def chat_turn(question: str, answer: str) -> str:
    """One turn of the conversation history (the prompt's ``context``) in the original's plain-text format."""
    return f"User: {question}\nAI: {answer}\n"
_IMAGE_PART_KEYS = ("image", "url", "path", "base64")
_UNSPELLABLE = "\ufffd"  # what an out-of-vocabulary piece decodes to when no table spells it (see decoding)
# Every keyword `__call__` understands: transformers' processing kwargs, flat or grouped by modality.
_CALL_KWARGS = (set(ProcessingKwargs.__annotations__) | set(TextKwargs.__annotations__)
                | set(ImagesKwargs.__annotations__) | {"common_kwargs"})


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value


def _is_conversation(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_message(m) for m in value)


def _image_from_part(part: dict) -> Any:
    """The image of a chat content part: a PIL image, array, tensor, path or URL as given; base64 as bytes."""
    key = next((key for key in _IMAGE_PART_KEYS if part.get(key) is not None), None)
    if key != "base64":
        return None if key is None else part[key]
    data = part["base64"]
    if isinstance(data, str) and data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("an image part's 'base64' is not valid base64 data") from None


class VisCPMChatProcessor(ProcessorMixin):
    r"""
    VisCPM-Chat processor: [`VisCPMImageProcessor`] + [`CpmBeeTokenizer`].

    `processor(images=image, text=question, context=history)` returns a [`BatchFeature`] with the tokenizer's keys
    (`input_ids`, `attention_mask`, `segment_ids`, `context_mask`, `segment_rel`, `ext_table_ids`, `ext_table_sub`,
    `ext_table_mask`, `unk_allowed`), `pixel_values` [B, 3, 224, 224] and `image_bound` [B, 2] (start, end) of the
    image slots in each (padded) row, one row per item. `text` may also be a chat (list of messages) or a prompt dict
    from [`apply_chat_template`]. Defaults (overridable per call, as transformers' processing kwargs): prompts of a
    batch are padded on the tokenizer's side (left) and come back as torch tensors.

    Args:
        image_processor ([`VisCPMImageProcessor`]), tokenizer ([`CpmBeeTokenizer`]).
        query_num (`int`, defaults to 64): number of image slots (the model's query tokens).
        max_prompt_length (`int`, defaults to 3000): prompt limit, the original's `max_inp_length` (`None`: no
            limit). A longer prompt is an error naming its length: the original would cut its end, answer slot
            included, and fail.
        chat_template: unused (chats are laid out in code, see [`apply_chat_template`]); kept for the API.
    """

    # transformers' processor-level defaults of the processing kwargs (see `ProcessorMixin._merge_kwargs`).
    text_kwargs = {"padding": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(self, image_processor=None, tokenizer=None, query_num: int = 64,
                 max_prompt_length: int | None = 3000, chat_template=None, **kwargs):
        if image_processor is None or tokenizer is None:
            raise ValueError("VisCPMChatProcessor needs an image_processor and a tokenizer")
        if int(query_num) < 1:
            raise ValueError(f"query_num must be positive, got {query_num}")
        self.query_num = int(query_num)
        self.max_prompt_length = None if max_prompt_length is None else int(max_prompt_length)
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

    @classmethod
    def get_processor_dict(cls, *args, **kwargs):
        processor_dict, kwargs = super().get_processor_dict(*args, **kwargs)
        if "max_length" in processor_dict:  # folders saved before the limit was renamed max_prompt_length
            processor_dict.setdefault("max_prompt_length", processor_dict.pop("max_length"))
        return processor_dict, kwargs

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
                images.append(_image_from_part(part))
            else:
                raise ValueError(f"{where}: unsupported content part {part!r} (VisCPM-Chat takes 'text' and "
                                 "'image' parts)")
        return "\n".join(texts), images

    def conversation_to_prompt(self, messages: list[dict]) -> tuple[str, str, Any]:
        """`(question, context, image)` of a chat: the last user turn is the question, earlier user/assistant pairs
        form the history in the original's format, and the (at most one) image part gives the image (`None` for a
        bare `{"type": "image"}` placeholder or no image part). Texts are returned raw (not escaped)."""
        question, context, image, _ = self._read_chat(messages, answered=False)
        return question, context, image

    def _read_chat(self, messages: list[dict], answered: bool) -> tuple[str, str, Any, str | None]:
        """`(question, context, image, answer)` of a chat (see [`conversation_to_prompt`]); `answer` is the final
        assistant message when the chat ends with one and `answered` allows it (a training example), else `None`."""
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
        answer = None
        if messages[-1]["role"] != "user":
            if not answered:
                raise ValueError("the chat must end with a user message: VisCPM-Chat cannot continue an assistant "
                                 "message (a chat ending with its answer is a training example: encode it with "
                                 "apply_chat_template(..., tokenize=True))")
            answer = turns.pop()
        if len(images) > 1:
            raise ValueError(f"the chat has {len(images)} image parts: VisCPM-Chat sees one image per conversation")
        context = "".join(chat_turn(q, a) for q, a in zip(turns[:-1:2], turns[1::2]))
        return turns[-1], context, (images[0] if images else None), answer

    def training_prompt(self, question: str, answer: str, context: str = "") -> dict:
        """The prompt dict of one answered turn: [`build_prompt`]'s with the (escaped) answer in `<ans>`."""
        if not isinstance(answer, str):
            raise ValueError(f"answer must be a str, got {type(answer).__name__}")
        return {**self.build_prompt(question, context), "<ans>": self.tokenizer.escape(answer)}

    def apply_chat_template(self, conversation, chat_template=None, tools=None, documents=None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            return_assistant_tokens_mask: bool = False, tokenize: bool = False,
                            return_tensors: str | None = "auto", return_dict: bool = False,
                            processor_kwargs: dict | None = None, **kwargs):
        """
        Lay out a chat (or a list of chats) as VisCPM-Chat prompts, the prompts `chat()` builds.

        Messages use the standard form `{"role": "user" | "assistant", "content": str | [{"type": "image", ...},
        {"type": "text", "text": ...}]}`; image parts may hold the image under `"image"`, `"url"`, `"path"` or
        `"base64"`. The last user message is the question, earlier turns the history (see
        [`conversation_to_prompt`]). There is no Jinja template: the layout is fixed by the original, and the prompt
        always ends by opening the answer (whatever `add_generation_prompt` says).

        A chat that ends with an assistant message is a training example (what TRL's `SFTTrainer` and its
        vision-language collator pass): that message is the answer of the last question, laid out in CPM-Bee's
        training layout (the prompt `chat()` asks with the answer in place, `context_mask` 0 on it) and closed by
        `</s>`, so that next-token labels (`labels = input_ids`, shifted by the loss) also teach the model to stop.
        With `return_assistant_tokens_mask=True` the encoding has `assistant_masks`: 1 on the answer's tokens and
        that `</s>` (what the model has to write), 0 on the prompt, the answer's opening `<s>` and padding; a chat
        ending with a user message has none. A batch cannot mix answered and unanswered chats.

        With `tokenize=False` returns the prompt dict (a list for a list of chats): the one `__call__` accepts as
        `text`, or for an answered chat [`training_prompt`]'s dict. With `tokenize=True` returns the processor's
        [`BatchFeature`] (`return_dict=True`) or its `input_ids`; `processor_kwargs` and further keyword arguments go
        to `__call__` (`return_tensors="auto"`: its default). `continue_final_message` (an assistant prefill),
        `tools` and `documents` are not supported.
        """
        unsupported = {"chat_template": chat_template, "tools": tools, "documents": documents,
                       "continue_final_message": continue_final_message}
        for name, value in unsupported.items():
            if value:
                reason = ("cannot continue an assistant message (no assistant prefill)"
                          if name == "continue_final_message" else "lays out chats in code and has no use for it")
                raise ValueError(f"VisCPM-Chat {reason}: drop {name}")
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True (the mask is "
                             "the encoding's 'assistant_masks')")
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and all(
            _is_conversation(c) for c in conversation)
        conversations = list(conversation) if batched else [conversation]
        chats = []
        for i, chat in enumerate(conversations):
            try:
                chats.append(self._read_chat(chat, answered=True))
            except ValueError as error:
                raise ValueError(f"chat {i}: {error}" if batched else str(error)) from None
        answered = [answer is not None for *_, answer in chats]
        if any(answered) and add_generation_prompt:
            raise ValueError("add_generation_prompt=True asks for a new answer, but the chat ends with its answer: "
                             "drop the final assistant message, or add_generation_prompt")
        if any(answered) and not all(answered):
            raise ValueError("a batch mixes chats that end with their answer (training) and chats that end with a "
                             "question (generation): encode them apart")
        if not tokenize:
            prompts = [self.build_prompt(q, c) if a is None else self.training_prompt(q, a, c) for q, c, _, a in chats]
            return prompts if batched else prompts[0]
        call_kwargs = {**(processor_kwargs or {}), **kwargs}
        call_kwargs.pop("sanitize_control_tokens", None)  # chats are always escaped here
        if return_tensors != "auto":
            call_kwargs["return_tensors"] = return_tensors
        if not all(answered):
            out = self(text=conversations if batched else conversations[0], **call_kwargs)
            if return_assistant_tokens_mask:
                ids = out["input_ids"]
                out["assistant_masks"] = ids * 0 if hasattr(ids, "shape") else [[0] * len(row) for row in ids]
            return out if return_dict else out["input_ids"]
        eos = self.tokenizer.eos_token
        prompts = [{**self.training_prompt(q, a, c), "<ans>": self.tokenizer.escape(a) + eos} for q, c, _, a in chats]
        out = self._encode(prompts, [image for _, _, image, _ in chats], batched, None, call_kwargs,
                           training=True, assistant_masks=return_assistant_tokens_mask)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ __call__

    def _items(self, text, context) -> tuple[list[dict], list, bool]:
        """Prompt dicts, per-item images found in chats, and whether the input was a batch."""
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

    @staticmethod
    def _one_image(value, where: str):
        """An item's image: the image itself, or a per-sample list holding at most one (`[]`: none)."""
        if not isinstance(value, (list, tuple)):
            return value
        if len(value) > 1:
            raise ValueError(f"{where}got {len(value)} images: VisCPM-Chat takes one image per item")
        return value[0] if value else None

    def _images_per_item(self, images, chat_images: list, batched: bool) -> list | None:
        n = len(chat_images)
        if images is None:
            given = [None] * n
        elif not batched:
            image = images
            if isinstance(image, (list, tuple)):
                if len(image) > 1:
                    raise ValueError(f"got {len(image)} images for one question: VisCPM-Chat takes one image")
                image = self._one_image(image[0], "") if image else None  # [img] or [[img]]
            given = [image]
        else:
            if not isinstance(images, (list, tuple)) and not (hasattr(images, "ndim") and images.ndim == 4):
                raise ValueError(f"got one image for {n} questions: pass a list with one image per question")
            given = list(images)
            if len(given) != n:
                raise ValueError(f"got {len(given)} images for {n} questions: pass one image per question")
            given = [self._one_image(image, f"item {i}: ") for i, image in enumerate(given)]
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

    def __call__(self, images: Any | None = None, text: Any | None = None, context: str | list[str] | None = None,
                 **kwargs) -> BatchFeature:
        """
        Encode (image, question[, context]) items for VisCPM-Chat.

        Args:
            images: one image (any input [`VisCPMImageProcessor`] takes) per item, or per-item lists holding one
                (`[[img], [img]]`); `None` encodes the text only (reuse image features through the model's
                `vision_hidden_states`). Images inside chat messages are used too. Without `text`, only
                `pixel_values` are returned.
            text: a question (`str`, the empty question is allowed as in the original), a chat (list of messages, see
                [`apply_chat_template`]), a prompt dict, or a list of these (a batch).
            context: the raw history of each question (`"User: q\\nAI: a\\n"` per turn, as `chat()` returns it);
                `None` or `""` for a first turn.
            kwargs: transformers' processing kwargs, flat (`padding=...`, `do_rescale=...`) or grouped
                (`text_kwargs={...}`, `images_kwargs={...}`, `common_kwargs={...}`): text ones go to
                [`CpmBeeTokenizer`] (`padding`, `padding_side`, `max_length`, `pad_to_multiple_of`, `truncation`,
                ...), image ones to [`VisCPMImageProcessor`]; `return_tensors` (`"pt"` by default, `"np"`, `None`
                for lists); `return_mm_token_type_ids=True` adds `mm_token_type_ids` (1 on the image slots).

        Returns:
            [`BatchFeature`] with the tokenizer's keys, `image_bound`, and `pixel_values` when there are images.
        """
        self._check_call_kwargs(kwargs)
        prompts, chat_images, batched = ([], [], False) if text is None else self._items(text, context)
        return self._encode(prompts, chat_images, batched, images, kwargs, text=text is not None)

    def _check_call_kwargs(self, kwargs: dict) -> None:
        """Refuse (before anything is encoded) the modalities and keyword arguments `__call__` does not take."""
        for key in ("videos", "audio"):
            if kwargs.pop(key, None) is not None:
                raise ValueError(f"VisCPM-Chat does not take {key}")
        unknown = sorted(set(kwargs) - _CALL_KWARGS - set(self.image_processor.valid_kwargs.__annotations__))
        if unknown:
            raise TypeError(f"VisCPMChatProcessor got unsupported arguments: {unknown}")
        if kwargs.get("return_text_replacement_offsets"):
            raise ValueError("return_text_replacement_offsets: VisCPM-Chat replaces no placeholder text")

    def _encode(self, prompts: list[dict], chat_images: list, batched: bool, images, kwargs: dict,
                text: bool = True, training: bool = False, assistant_masks: bool = False) -> BatchFeature:
        """`__call__`'s encoding of prompt dicts (and images); `training`: the tokenizer's training layout (answers
        in place; its CPM-Bee-aligned `labels` are not returned), `assistant_masks`: add the answer-token mask."""
        self._check_call_kwargs(kwargs)
        merged = self._merge_kwargs(ProcessingKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        text_kwargs.pop("return_mm_token_type_ids", None)
        return_tensors = text_kwargs.pop("return_tensors", None)
        if not text:
            if images is None:
                raise ValueError("nothing to process: pass text (a question, a chat or a prompt dict) and/or images")
            return self.image_processor(images, **images_kwargs)

        images = self._images_per_item(images, chat_images, batched)
        limit = None
        if training and text_kwargs.pop("truncation", None) not in (None, False, "do_not_truncate"):
            limit = text_kwargs.get("max_length")  # a limit, not a cut: a cut answer would train a wrong ending
        encoding = self.tokenizer(prompts, return_tensors=return_tensors, return_labels=training, **text_kwargs)
        encoding.pop("labels", None)
        rows = {key: encoding[key].tolist() if hasattr(encoding[key], "tolist") else encoding[key]
                for key in ("input_ids", "segment_ids", "context_mask")}
        masks = encoding.get("attention_mask", [[1] * len(ids) for ids in rows["input_ids"]])
        masks = masks.tolist() if hasattr(masks, "tolist") else masks
        self._check_prompt_lengths([sum(mask) for mask in masks], batched)
        for i, length in enumerate(sum(mask) for mask in masks):
            if limit is not None and length > int(limit):
                where = f"item {i}: " if batched else ""
                raise ValueError(f"{where}the example is {length} tokens, over max_length={limit}: a training example "
                                 "is not cut; raise max_length (or set it to None), or shorten the chat")
        bounds = self._image_bound(rows["segment_ids"], masks)
        data = dict(encoding)
        data["image_bound"] = self._as(bounds, return_tensors)
        if merged.get("return_mm_token_type_ids"):
            types = [[int(start <= p < end) for p in range(len(ids))] for ids, (start, end) in
                     zip(rows["input_ids"], bounds)]
            data["mm_token_type_ids"] = self._as(types, return_tensors)
        if assistant_masks:
            # The answer is the run of real tokens outside the context; its first token (`<s>`) is given, not
            # written, so a token counts when the one before it is an answer token too.
            answer = [[int(real and not ctx) for real, ctx in zip(mask, context)]
                      for mask, context in zip(masks, rows["context_mask"])]
            data["assistant_masks"] = self._as([[int(a and p > 0 and row[p - 1]) for p, a in enumerate(row)]
                                                for row in answer], return_tensors)
        if images is not None:
            images_kwargs["return_tensors"] = return_tensors
            data["pixel_values"] = self.image_processor(images, **images_kwargs)["pixel_values"]
        return BatchFeature(data=data)

    @staticmethod
    def _as(values: list, return_tensors):
        """Integer rows as `return_tensors` asks (lists for `None`)."""
        if return_tensors == "pt":
            return torch.tensor(values, dtype=torch.long)
        if return_tensors == "np":
            return np.array(values, dtype=np.int64)
        return values

    def _check_prompt_lengths(self, lengths: list[int], batched: bool) -> None:
        """The original lays out the whole dict, answer placeholder `<ans_1>` last, and cuts it at max_inp_length:
        it keeps an answer slot only if that placeholder survives the cut. A longer prompt is refused here."""
        limit = self.max_prompt_length
        if limit is None:
            return
        for i, length in enumerate(lengths):
            if length + 1 > limit:
                where = f"item {i}: " if batched else ""
                raise ValueError(f"{where}the prompt is {length + 1} tokens, over max_prompt_length={limit} (the "
                                 "original's max_inp_length): shorten the context, e.g. drop the oldest turns")

    def _image_bound(self, segment_ids: list[list[int]], masks: list[list[int]]) -> list[tuple[int, int]]:
        """(start, end) of the `<unk>` slots of the image leaf in each row: its tokens minus `<s>` and `</s>`."""
        bounds = []
        for row, (segments, mask) in enumerate(zip(segment_ids, masks)):
            positions = [p for p, (segment, real) in enumerate(zip(segments, mask)) if segment == _IMAGE_SEGMENT and real]
            start, end = positions[0] + 1, positions[-1]
            if end - start != self.query_num or len(positions) != self.query_num + 2:
                raise ValueError(f"row {row}: the image leaf has {len(positions) - 2} slots, expected {self.query_num}")
            bounds.append((start, end))
        return bounds

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image (for serving stacks such as vLLM): `query_num` slots whatever the size."""
        sizes = list(image_sizes or [])
        return MultiModalData(num_image_tokens=[self.query_num] * len(sizes), num_image_patches=[1] * len(sizes))

    # ------------------------------------------------------------------ decoding

    def _without_image_slots(self, row: list[int]) -> list[int]:
        """`row` without the image leaf's `<unk>` slots, found by the prompt's structure (`<s>`, `query_num` times
        `<unk>`, `</s>`); rows without them (generated ids alone) are returned as they are."""
        tok, n = self.tokenizer, self.query_num
        bos, eos, unk = tok.bos_token_id, tok.eos_token_id, tok.unk_token_id
        for at in range(len(row) - n - 1):
            if row[at] == bos and row[at + n + 1] == eos and all(index == unk for index in row[at + 1:at + n + 1]):
                return row[:at + 1] + row[at + n + 1:]
        return row

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True,
                                        ext_tables: list[dict] | None = None, **kwargs) -> list[str]:
        """
        Decode rows of ids (prompts, or prompts followed by generated ids, as `generate` returns them) to CPM-Bee text,
        as the original decodes them. Used by `pipeline("image-text-to-text")` on both the prompt and the output,
        whose difference is the answer.

        Stateless: each row is decoded from its own ids. Left padding is removed, and so are the image slots of a
        prompt (found by its structure). Ids cannot spell what is *outside* the vocabulary: a piece of the prompt that
        the vocabulary lacks is `<unk>` or an ext id (>= `tokenizer.ext_offset`), and the model may copy it into the
        answer. Such ids decode to U+FFFD unless `ext_tables[i]` (from `tokenizer.get_ext_tables(prompt_dicts)`, the
        table `VisCPMChat.chat()` uses) spells them for row `i`. `generated_outputs` may also be a `generate` output
        with `.sequences`.
        """
        kwargs.pop("clean_up_tokenization_spaces", None)
        sequences = getattr(generated_outputs, "sequences", generated_outputs)
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        rows = [sequences] if sequences and isinstance(sequences[0], int) else list(sequences)
        if ext_tables is not None and len(ext_tables) != len(rows):
            raise ValueError(f"got {len(ext_tables)} ext tables for {len(rows)} rows")
        tok = self.tokenizer
        texts = []
        for i, row in enumerate(rows):
            row = [int(index) for index in row]
            start = 0
            while start < len(row) and row[start] == tok.pad_token_id:
                start += 1
            row = self._without_image_slots(row[start:])
            table = {index: _UNSPELLABLE for index in row if index >= tok.ext_offset or index == tok.unk_token_id}
            table.update((ext_tables[i] or {}) if ext_tables is not None else {})
            texts.append(tok.decode(row, skip_special_tokens=skip_special_tokens, ext_table=table, **kwargs))
        return texts


__all__ = ["VisCPMChatProcessor"]
