"""`VisCPMChat`: the original VisCPM-Chat interface over the Hugging Face model and processor.

    chat = VisCPMChat.from_pretrained("viscpm-chat-hf", dtype=torch.float16, device="cuda")
    answer, context, vision_hidden_states = chat.chat(image, "这张图片里有什么？")
    answer, context, _ = chat.chat(image, "What colour is it?", context=context,
                                   vision_hidden_states=vision_hidden_states)

The defaults are the original's (beam 3, temperature 0.7, repetition penalty 1.1, length penalty 3, the
original's ``max_length=512`` as ``original_max_length``, the prompt limited to 3000 tokens) and so is the decoding:
they are the converted folder's generation config, which `generate()` and the pipeline read too, so the answer
string equals the original's for the same weights. Unlike the original, what the user types is
always text: a ``<`` or ``<ans>`` in a question cannot change the prompt's structure.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from .conversion.original_format import resolve_original_format
from .modeling.processing_viscpm_chat import chat_turn
from .modeling.tokenization_cpmbee import CpmBeeTokenizer
from .safety import load_image_safety_checker

logger = logging.getLogger(__name__)


class ChatResponse(tuple):
    """``(answer, context, vision_hidden_states)``, as the original returns, plus ``nsfw_detected``: True when
    the image safety checker flagged the image (None when no checker is configured)."""

    def __new__(cls, answer: str, context: str, vision_hidden_states: torch.Tensor, nsfw_detected: bool | None):
        response = super().__new__(cls, (answer, context, vision_hidden_states))
        response.nsfw_detected = nsfw_detected
        return response

    answer = property(lambda self: self[0])
    context = property(lambda self: self[1])
    vision_hidden_states = property(lambda self: self[2])


class VisCPMChat:
    """Multi-turn chat about an image with a converted VisCPM-Chat folder (a drop-in for the original class)."""

    def __init__(self, model, processor, image_safety_checker=None, safety_feature_extractor=None):
        self.model = model.eval()
        self.processor = processor
        self.image_safety_checker = image_safety_checker
        self.safety_feature_extractor = safety_feature_extractor

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        image_safety_checker: bool | str | os.PathLike | None = None,
        variant: str | None = None,
        adapter: str | os.PathLike | list | dict | None = None,
        **kwargs,
    ) -> "VisCPMChat":
        """Load a converted folder (see ``conversion/convert_viscpm_chat.py``) or a Hub repo in that format.

        Args:
            dtype: e.g. ``torch.float16``; default: as saved.
            device: where to run (default: CUDA when available, else CPU); ignored with ``device_map``.
            device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread the model over several GPUs).
            image_safety_checker: ``True`` for the original's checker (``CompVis/stable-diffusion-safety-checker``
                with the ``openai/clip-vit-base-patch32`` image processor), or a repo id / folder holding a
                ``StableDiffusionSafetyChecker`` (and, optionally, its CLIP image processor); off by default.
            variant: for an original-format repo, folder or ``.pt`` (``openbmb/VisCPM-Chat``: ``"v1.1"``,
                ``"balance"``, ``"zhplus"``), which checkpoint to fetch and convert once into a cache folder (see
                `viscpm.conversion.original_format`); for a converted one, transformers' weights variant.
            adapter: a language adapter (peft folder or Hub repo), a list of them or a ``{name: path}`` dict; the
                model becomes a `peft.PeftModel` with the first one active (``chat.model.set_adapter(name)``
                switches, see `viscpm.adapters.load_language_adapters`).
        """
        pretrained_model_name_or_path = resolve_original_format(pretrained_model_name_or_path, "chat", variant, kwargs)
        load_kwargs = dict(kwargs)
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        model = AutoModelForImageTextToText.from_pretrained(pretrained_model_name_or_path, **load_kwargs)
        if device_map is None:
            model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if adapter is not None:
            from .adapters import load_language_adapters

            model = load_language_adapters(model, adapter)
        processor = AutoProcessor.from_pretrained(pretrained_model_name_or_path)
        checker, extractor = _load_safety_checker(image_safety_checker, model.device)
        return cls(model, processor, checker, extractor)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def chat(
        self,
        image: Any,
        question: str,
        context: str = "",
        vision_hidden_states: torch.Tensor | None = None,
        **generation_overrides,
    ) -> ChatResponse:
        """Answer ``question`` about ``image``; returns ``(answer, context, vision_hidden_states)``.

        ``context`` is the history this method returned for the previous turn (``"User: q\\nAI: a\\n"`` per
        turn); ``vision_hidden_states`` from a previous turn about the same image skips the vision encoder.
        ``generation_overrides`` use transformers' names (``num_beams``, ``temperature``,
        ``repetition_penalty``, ``length_penalty``, ``max_new_tokens``, ``do_sample``, ``top_p``, ...) plus
        ``original_max_length`` (the original's own length limit) and ``decode_mode``; ``max_new_tokens`` caps
        the answer's tokens. See `VisCPMChatForConditionalGeneration.generate` for how each is read.
        """
        return self.batch_chat(
            [image], [question], [context],
            vision_hidden_states=vision_hidden_states, **generation_overrides,
        )[0]

    def batch_chat(
        self,
        images: list,
        questions: list[str],
        contexts: list[str] | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        **generation_overrides,
    ) -> list[ChatResponse]:
        """`chat` for several (image, question, context) items at once, padded into one batch."""
        if isinstance(questions, str) or not isinstance(questions, (list, tuple)):
            raise ValueError("questions must be a list of strings (use chat() for one question)")
        contexts = list(contexts) if contexts is not None else [""] * len(questions)
        if not (len(images) == len(questions) == len(contexts)) or not questions:
            raise ValueError(
                f"got {len(images)} images, {len(questions)} questions and {len(contexts)} contexts: pass one of "
                "each per item"
            )
        for question, context in zip(questions, contexts):
            if not isinstance(question, str) or not isinstance(context, str):
                raise ValueError("questions and contexts must be strings")

        pixel_values = None
        if vision_hidden_states is None:
            if any(image is None for image in images):
                raise ValueError("no image: pass one (PIL image, array, tensor or file path), or the "
                                 "vision_hidden_states of an earlier turn about it")
            pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        flags = self._check_images(images) if self.image_safety_checker is not None else [None] * len(images)

        inputs = self.processor(text=list(questions), context=contexts, return_tensors="pt").to(self.device)
        with torch.no_grad():
            if vision_hidden_states is None:
                vision_hidden_states = self.model.get_vision_hidden_states(pixel_values.to(self.device))
            out = self.model.generate(**inputs, vision_hidden_states=vision_hidden_states, **generation_overrides)
        prompts = [self.processor.build_prompt(q, c) for q, c in zip(questions, contexts)]
        decoded = self.processor.tokenizer.decode_answers(prompts, out[:, inputs["input_ids"].shape[1]:].tolist())

        responses = []
        for row, (question, context, data) in enumerate(zip(questions, contexts, decoded)):
            answer = data["<ans>"] or ""
            # Our contexts are plain text (the processor escapes them); the answer string is CPM-Bee text.
            history = context + chat_turn(question, CpmBeeTokenizer.unescape(answer))
            states = vision_hidden_states[row: row + 1] if vision_hidden_states.shape[0] > 1 else vision_hidden_states
            responses.append(ChatResponse(answer, history, states, flags[row]))
        return responses

    def _check_images(self, images) -> list[bool]:
        """Run the image safety checker; flagged images are answered all the same (as the original does), but the
        response says so and a warning is logged."""
        pil = [self.processor.image_processor.to_pil(image) for image in images]
        clip_input = self.safety_feature_extractor(pil, return_tensors="pt")["pixel_values"]
        checker = self.image_safety_checker
        arrays = np.stack([np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0 for image in pil])
        with torch.no_grad():
            _, flags = checker(images=arrays, clip_input=clip_input.to(checker.device, checker.dtype))
        flags = [bool(flag) for flag in flags]
        if any(flags):
            logger.warning("the image safety checker flagged %d of %d input image(s)", sum(flags), len(flags))
        return flags


class _StopWhenSet:
    """A stopping criterion: every sequence is done once ``event`` is set (the reader of a stream has left)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _join(worker: threading.Thread) -> None:
    """Wait for ``worker``; a second Ctrl-C meanwhile is raised once it has ended (a thread still inside torch
    when Python exits aborts the process)."""
    interrupt = None
    while worker.is_alive():
        try:
            worker.join()
        except KeyboardInterrupt as error:
            interrupt = error
    if interrupt is not None:
        raise interrupt


class _UnescapedText:
    """The tokenizer as the streamer sees it: decoded text comes out as plain text (``<<`` back to ``<``)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids, **kwargs) -> str:
        return self._tokenizer.unescape(self._tokenizer.decode(ids, **kwargs))


def streams(generation_config, options: dict) -> bool:
    """Whether answers decoded with ``options`` over ``generation_config`` can stream, token by token: one beam in
    transformers' loop (the original beam search ranks whole answers at the end)."""
    do_sample = options.get("do_sample", generation_config.do_sample)
    original = options.get("original_beam_search", getattr(generation_config, "original_beam_search", False))
    beams = options.get("num_beams", generation_config.num_beams)
    return beams == 1 and (do_sample or not original)


class ChatSession:
    """A conversation about one image: keeps the history and the image features between turns.

    ``ask(question, on_text)`` calls ``on_text`` with each new piece of the answer as it is generated when the
    decoding can stream (one beam, transformers' loop), and otherwise once with the whole answer.
    """

    def __init__(self, chat, image=None, **generation_options):
        self.chat = chat
        self.options = generation_options
        self.set_image(image)

    @property
    def streams(self) -> bool:
        return streams(self.chat.model.generation_config, self.options)

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.context = ""
        self.vision_hidden_states = None
        self.turns: list[tuple[str, str]] = []

    def set_image(self, image) -> None:
        """Talk about another image from now on; the history is cleared."""
        self.image = image
        self.reset()

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer ``question`` (plain text) about the image; returns the answer as plain text."""
        if on_text is None:
            self._check(question)
            return self._store(question, self._chat(question))
        for piece in self.stream(question):
            on_text(piece)
        return self.turns[-1][1]

    def stream(self, question: str) -> Iterator[str]:
        """Yield the answer to ``question`` piece by piece as it is generated (in one piece when the decoding
        cannot stream); the history is updated once the answer is complete. A caller that stops reading (an
        error, Ctrl-C, a closed generator) stops the generation too, at its next step."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        self._check(question)
        if not self.streams:
            yield self._store(question, self._chat(question))
            return
        processor = self.chat.processor
        table = processor.tokenizer.get_ext_tables(processor.build_prompt(question, self.context))
        streamer = TextIteratorStreamer(_UnescapedText(processor.tokenizer), skip_prompt=True,
                                        skip_special_tokens=True, ext_table=table)
        stop = threading.Event()
        criteria = StoppingCriteriaList([*self.options.get("stopping_criteria", []), _StopWhenSet(stop)])
        result: dict[str, Any] = {}

        def generate():
            try:
                result["response"] = self._chat(question, streamer=streamer, stopping_criteria=criteria)
            except BaseException as error:  # re-raised in the caller's thread
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.set()
            _join(worker)
        if "error" in result:
            raise result["error"]
        self._store(question, result["response"])

    def _check(self, question: str) -> None:
        if self.image is None:
            raise ValueError("no image: give one first")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question: ask something about the image")

    def _chat(self, question: str, **extra):
        return self.chat.chat(self.image, question, context=self.context,
                              vision_hidden_states=self.vision_hidden_states, **{**self.options, **extra})

    def _store(self, question: str, response) -> str:
        self.context, self.vision_hidden_states = response.context, response.vision_hidden_states
        text = self.chat.processor.tokenizer.unescape(response.answer)
        self.turns.append((question, text))
        return text


def _load_safety_checker(option, device):
    if option is None or option is False:
        return None, None
    checker, extractor = load_image_safety_checker(None if option is True else option)
    return checker.to(device).eval(), extractor


__all__ = ["ChatResponse", "ChatSession", "VisCPMChat"]
