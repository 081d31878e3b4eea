"""lmms-eval's model for VisCPM-Chat: ``lmms-eval --model viscpm --model_args pretrained=DIR --tasks ...``.

`pip install "viscpm-hf[eval]"` installs `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ (0.7.3) with it,
and this package's entry point (group ``lmms_eval.models``, name ``viscpm``) makes the model known to lmms-eval, so
that nothing has to be copied into lmms-eval's tree::

    lmms-eval --model viscpm --model_args pretrained=viscpm-chat-hf,dtype=float16 --tasks mme --batch_size 4
    lmms-eval --model viscpm --model_args pretrained=DIR --tasks my_task --include_path my_tasks/ --limit 8

``pretrained`` is a converted folder or Hub repo (or an original-format one, with ``variant``), loaded with
`viscpm.VisCPMChat.from_pretrained`. The other model arguments:

* ``device`` (default: CUDA when available, else CPU), ``device_map``, ``dtype`` (``float16``, ``bfloat16``,
  ``float32``; default ``auto``: as saved), ``variant``, ``adapter`` (a language adapter folder),
  ``attn_implementation``;
* ``batch_size``: items answered (or continuations scored) together;
* ``target_delimiter`` (default ``" "``): the prefix lmms-eval puts before each multiple-choice option, removed
  before scoring (see loglikelihood below);
* decoding defaults, with transformers' names (``num_beams``, ``max_new_tokens``, ``do_sample``, ``temperature``,
  ``top_p``, ``top_k``, ``repetition_penalty``, ``length_penalty``, ``original_beam_search``,
  ``original_max_length``, ``decode_mode``): what a task's ``generation_kwargs`` does not set. Unset, they are the
  folder's generation config, i.e. the original ``chat()``'s decoding (the original beam search, 3 beams).

**generate_until** answers each request with `VisCPMChat.batch_chat`: the request's context (the task's prompt) is
the question, the document's image the image, and the answer comes back as plain text (CPM-Bee's ``<<`` unescaped).
The task's ``generation_kwargs`` override the model arguments key by key:

* ``max_new_tokens``, ``num_beams``, ``do_sample``, ``top_p``, ``top_k``, ``repetition_penalty``, ... go to
  ``generate()``, which checks them (`viscpm.modeling.generation_cpmbee.check_generation_config`: a bad value is an
  error that names it, before any work);
* lmms-eval's convention for ``temperature``: ``0`` (or any temperature without ``do_sample``) means no sampling; a
  task's temperature is then dropped, as are its ``top_p``/``top_k``. Without ``do_sample``, a task temperature
  above 0 asks for sampling. With sampling, the temperature must be above 0 (an error otherwise);
* ``until`` (a string or a list of them; lmms-eval's default is ``"\\n\\n"``): the answer is cut before the first
  stop string it contains. Decoding is not stopped early for it: the original beam search ranks whole answers;
* ``image_aspect_ratio`` (LLaVA's preprocessing option, set by some tasks) is ignored: VisCPM-Chat's image processor
  has one way to resize.

Note that ``num_beams=1`` (what most tasks set) under the original beam search is the original's search with one
beam (its repetition and length penalties included), not plain greedy decoding; ``original_beam_search=False`` in
``--model_args`` gives transformers' greedy search (or sampling) instead.

**loglikelihood** (multiple-choice tasks) scores a continuation as VisCPM-Chat's answer to the context: the
processor's answered-chat layout (CPM-Bee's training layout: the prompt ``chat()`` asks, the answer in its own
segment, see `VisCPMChatProcessor.apply_chat_template`), one forward pass, and the log-probabilities of the answer's
tokens summed (the closing ``</s>`` is not counted: it is the likelihood of the continuation, not of an answer that
ends there). The distribution is the one decoding draws from: CPM-Bee's vocabulary rule (a row's ``<unk>`` and other
rows' ext-table entries masked, as ``generate()`` does) is applied first. ``is_greedy`` is whether every continuation
token is the most likely one after the tokens before it. lmms-eval puts the task's ``target_delimiter`` (a space by
default) before every choice, for models that continue the prompt's text; a VisCPM-Chat answer is a segment of its own
(after ``<s>``), so that prefix is removed first: the model argument ``target_delimiter`` (default ``" "``) says which
prefix, ``target_delimiter=`` (empty) keeps continuations as they come.

Which number is returned follows what lmms-eval 0.7.3 does with it. A multiple-choice task sends the continuation as
a string and picks the choice with the *smallest* returned value (``np.argmin`` in
``lmms_eval/api/task.py::process_results``, since its bundled models return a loss): for those requests the first
element is the negative log-likelihood, ``-sum log p``, so the chosen option is the most likely one. An
``output_type: loglikelihood`` task sends its ``doc_to_target`` (a callable) and aggregates ``perplexity`` as
``exp(-mean)``: those requests get the log-likelihood itself. The unconditional requests of ``acc_mutual_info``
(``(context, continuation)`` without an image) are refused with an error: VisCPM-Chat has no text-only prompt, and
lmms-eval ranks that metric by ``argmax`` while ranking ``acc`` by ``argmin``. Under lmms-eval 0.7, whose evaluator
would turn the ``(value, is_greedy)`` pairs into strings, each pair comes wrapped in lmms-eval's `GenerationResult`
(see `_as_response`); under 0.6 it is returned as it is.

**Images.** VisCPM-Chat sees one image per conversation. A document whose ``doc_to_visual`` gives no image (an empty
list, or ``None``) or several is an error naming the task and the document: answering without the image, or with one
of several, would lower the score without saying so.

``generate_until_multi_round`` is not supported (an error).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

try:
    from lmms_eval.api import instance as _instance
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(f"viscpm.evaluation.lmms_eval needs lmms-eval: pip install 'viscpm-hf[eval]' ({error})") \
        from error

__all__ = ["VisCPMLmms", "manifest", "DECODING_ARGS"]

_UNWRAPS_OUTPUTS = hasattr(_instance, "unwrap_generation_output")
GenerationResult = getattr(_instance, "GenerationResult", None)

MODEL_NAME = "viscpm"

DECODING_ARGS = (
    "num_beams", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
    "length_penalty", "original_beam_search", "original_max_length", "decode_mode",
)
"""Model arguments that set decoding defaults (a task's ``generation_kwargs`` override them)."""

IGNORED_GEN_KWARGS = {"image_aspect_ratio": "LLaVA's image preprocessing option; VisCPM-Chat has one"}
"""Generation keys that some lmms-eval tasks set for other models, and that mean nothing for VisCPM-Chat."""

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def _as_response(pair: tuple[float, bool]):
    """A ``(value, is_greedy)`` pair as this lmms-eval's evaluator keeps it intact.

    lmms-eval 0.7.0 and later pass every model output, loglikelihood pairs included, through
    ``lmms_eval.api.instance.unwrap_generation_output``, which turns anything but a string, a ``(str, dict)`` pair or a
    `GenerationResult` into ``str(output)``: a multiple-choice task then fails in ``process_results`` (``zip(*results)``
    over strings). A `GenerationResult` is unwrapped to its ``text`` as it is, so the pair goes in one. Releases without
    that function (0.6.x) store outputs as they come."""
    if _UNWRAPS_OUTPUTS:
        return GenerationResult(text=pair)
    return pair


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's registry entry for ``--model viscpm``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VisCPMLmms")


def _whole(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def _dtype(value):
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        if value == "auto":
            return None
        if value.removeprefix("torch.") in DTYPES:
            return DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"dtype must be auto, float16, bfloat16 or float32, got {value!r}")


@register_model(MODEL_NAME)
class VisCPMLmms(lmms):
    """VisCPM-Chat as an lmms-eval model (see the module docstring for what each request type does)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = "auto",
                 batch_size: int | str = 1, max_batch_size: int | None = None, device_map: str | None = None,
                 variant: str | None = None, adapter: str | None = None, attn_implementation: str | None = None,
                 target_delimiter: str = " ", **decoding) -> None:
        super().__init__()
        unknown = sorted(set(decoding) - set(DECODING_ARGS))
        if unknown:
            raise TypeError(f"--model_args for viscpm got unknown arguments {unknown}; it takes pretrained, device, "
                            "dtype, batch_size, device_map, variant, adapter, attn_implementation, target_delimiter "
                            f"and the decoding settings {list(DECODING_ARGS)}")
        self.batch_size_per_gpu = _whole(batch_size, "batch_size")
        if max_batch_size is not None:
            _whole(max_batch_size, "max_batch_size")
        self.decoding = dict(decoding)
        if not isinstance(target_delimiter, str):
            raise ValueError(f"target_delimiter must be a string, got {target_delimiter!r}")
        self.target_delimiter = target_delimiter

        from accelerate import Accelerator

        from ..chat import VisCPMChat

        accelerator = Accelerator()
        if accelerator.num_processes > 1:  # data parallel (`accelerate launch -m lmms_eval ...`): one model per process
            if device_map is not None:
                raise ValueError("device_map spreads one model over several devices: run a single process with it")
            device = f"cuda:{accelerator.local_process_index}"
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator
        load = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.chat = VisCPMChat.from_pretrained(pretrained, dtype=_dtype(dtype), device=device, device_map=device_map,
                                               variant=variant, adapter=adapter, **load)
        self.pretrained = pretrained

    # -- what lmms-eval reads -------------------------------------------------------------------------------------

    @property
    def model(self):
        return self.chat.model

    @property
    def processor(self):
        return self.chat.processor

    @property
    def tokenizer(self):
        return self.chat.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.chat.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- requests ---------------------------------------------------------------------------------------------------

    def _image(self, doc_to_visual, doc_id, task: str, split: str):
        """The one image of a document (an error for none or several)."""
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        if visuals is None:
            visuals = []
        elif not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        flat = []
        for visual in visuals:
            flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
        images = [visual for visual in flat if visual is not None]
        where = f"task {task!r}, split {split!r}, doc {doc_id}"
        if not images:
            raise ValueError(f"{where} has no image: VisCPM-Chat answers questions about an image, so it cannot be "
                             "scored on this document (remove such documents, e.g. with the task's process_docs)")
        if len(images) > 1 or len(flat) > 1:
            raise ValueError(f"{where} has {len(flat)} visuals: VisCPM-Chat sees one image per conversation")
        image = images[0]
        if isinstance(image, dict):
            raise ValueError(f"{where}: VisCPM-Chat takes images, not audio ({sorted(image)})")
        return image

    def _generation(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """``generate()`` overrides and the stop strings for a request's ``generation_kwargs``."""
        task = dict(gen_kwargs or {})
        until = task.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")
        for key in IGNORED_GEN_KWARGS:
            task.pop(key, None)
        sampling = task.get("do_sample", self.decoding.get("do_sample"))
        if sampling is None and "temperature" in task:
            temperature = task["temperature"]
            sampling = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0
        if not sampling:
            for key in ("temperature", "top_p", "top_k"):  # lmms-eval: without sampling these mean nothing
                task.pop(key, None)
        options = {**self.decoding, **task}
        if sampling is not None:
            options["do_sample"] = bool(sampling)
        return options, [s for s in until if s]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1] or {}, sort_keys=True, default=repr)
            groups.setdefault(key, []).append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="VisCPM-Chat answering")
        for indices in groups.values():
            options, until = self._generation(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                questions, images = [], []
                for index in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    questions.append(context)
                    images.append(self._image(doc_to_visual, doc_id, task, split))
                responses = self.chat.batch_chat(images, questions, **options)
                for index, question, response in zip(chunk, questions, responses):
                    text = self.tokenizer.unescape(response.answer)
                    for stop in until:
                        text = text.split(stop, 1)[0]
                    answers[index] = text
                    self.cache_hook.add_partial("generate_until", (question, requests[index].args[1]), text)
                progress.update(len(chunk))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        results: list[tuple[float, bool]] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="VisCPM-Chat scoring")
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            items = []
            for request in chunk:
                if len(request.args) != 6:
                    raise ValueError(
                        f"task {request.task_name!r} sent a loglikelihood request without an image "
                        f"({len(request.args)} arguments): acc_mutual_info's unconditional requests are not supported "
                        "(VisCPM-Chat has no text-only prompt); drop that metric from the task")
                context, continuation, doc_to_visual, doc_id, task, split = request.args
                negate = isinstance(continuation, str)  # multiple choice: lmms-eval takes the argmin
                if not negate:
                    continuation = continuation(self.task_dict[task][split][doc_id])
                elif self.target_delimiter and continuation.startswith(self.target_delimiter):
                    continuation = continuation[len(self.target_delimiter):]
                if not isinstance(continuation, str):
                    raise ValueError(f"task {task!r}, doc {doc_id}: the continuation must be a string, got "
                                     f"{type(continuation).__name__} {continuation!r}")
                image = self._image(doc_to_visual, doc_id, task, split)
                items.append((context, continuation, image, negate, f"task {task!r}, doc {doc_id}"))
            scores = self.continuation_logprobs([(c, a, i) for c, a, i, _, _ in items],
                                                where=[w for *_, w in items])
            for (logprob, greedy), (*_, negate, _) in zip(scores, items):
                results.append(_as_response((-logprob if negate else logprob, greedy)))
            progress.update(len(chunk))
        progress.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("viscpm: generate_until_multi_round tasks are not supported (VisCPM-Chat's lmms-eval "
                                  "model answers generate_until and loglikelihood / multiple_choice tasks)")

    # -- scoring ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def continuation_logprobs(self, items: list[tuple[str, str, Any]], where: list[str] | None = None
                              ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | question, image), is_greedy)`` for each ``(question, continuation, image)``:
        the log-likelihood itself (not lmms-eval's sign, see the module docstring), computed in one batch."""
        from ..modeling.generation_cpmbee import CpmBeeVocabMaskLogitsProcessor

        chats = []
        for i, (question, answer, image) in enumerate(items):
            if not answer:
                label = where[i] if where else f"item {i}"
                raise ValueError(f"{label}: empty continuation: nothing to score")
            chats.append([{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": question}]},
                          {"role": "assistant", "content": answer}])
        encoding = self.processor.apply_chat_template(chats, tokenize=True, return_dict=True,
                                                      return_assistant_tokens_mask=True, return_tensors="pt")
        answer_mask = encoding.pop("assistant_masks")
        ext_table_mask, unk_allowed = encoding.pop("ext_table_mask", None), encoding.pop("unk_allowed", None)
        model = self.model
        encoding = encoding.to(self.device)
        if "pixel_values" in encoding:
            encoding["pixel_values"] = encoding["pixel_values"].to(model.dtype)
        logits = model(**encoding, use_cache=False).logits
        text_config = model.config.text_config
        eos = self.tokenizer.eos_token_id
        results = []
        for row in range(logits.shape[0]):
            positions = answer_mask[row].nonzero().flatten()
            ids = encoding["input_ids"][row]
            if len(positions) < 2 or int(ids[positions[-1]]) != eos:
                raise RuntimeError("the answered-chat encoding does not end the answer with </s>")
            positions = positions[:-1].to(logits.device)  # the continuation's tokens; its closing </s> is not counted
            rule = CpmBeeVocabMaskLogitsProcessor(
                vocab_size=text_config.vocab_size, unk_token_id=text_config.unk_token_id,
                ext_table_mask=None if ext_table_mask is None else ext_table_mask[row: row + 1],
                unk_allowed=None if unk_allowed is None else unk_allowed[row: row + 1],
            )
            scores = rule(None, logits[row, positions - 1].float())  # the logits before each continuation token
            targets = ids[positions]
            logprob = torch.log_softmax(scores, dim=-1).gather(1, targets[:, None]).sum()
            greedy = bool((scores.argmax(dim=-1) == targets).all())
            value = float(logprob)
            if not math.isfinite(value):
                raise FloatingPointError(f"{where[row] if where else f'item {row}'}: the log-likelihood is {value}")
            results.append((value, greedy))
        return results
