"""`viscpm api`: VisCPM-Chat (and VisCPM-Paint) behind an OpenAI-compatible HTTP API, on FastAPI + uvicorn.

    viscpm api viscpm-chat-hf --paint viscpm-paint-hf --port 8000 --api-key "$KEY"

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/images/generations`` (with ``--paint``), ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /health`` (no key needed: for load balancers).

Chat. ``messages`` hold ``text`` and ``image_url`` parts; an image is a base64 ``data:`` URL (a local path or
``file://`` URL with ``--allow-local-images``, an ``http(s)://`` URL with ``--allow-remote-images``). VisCPM-Chat
talks about one image per conversation: the last user message is the question, earlier user/assistant turns are the
history, laid out by the processor exactly as `VisCPMChat.chat` lays out its ``context`` (a system message, no image
or a second image is a 400 that says so). Vision features of recently seen images are cached by image content, so
the later turns of a conversation do not encode the image again. The server keeps no conversation state.

Decoding, from the request (``decoding`` is an extra field: ``extra_body={"decoding": ...}`` in the openai client):

    neither temperature nor top_p       the original beam search with the folder's settings: chat()'s answer
    decoding="beam"                     the same, explicitly (temperature, if given, is the beam temperature;
                                        num_beams and repetition_penalty are extra fields)
    temperature=0 / decoding="greedy"   transformers' greedy search
    temperature>0 or top_p              sampling with them (decoding="sample"); ``seed`` makes it reproducible

Greedy search and sampling stream token by token (``stream=true``); the beam search streams its answer as one chunk
when it is complete. ``max_tokens`` / ``max_completion_tokens`` is ``max_new_tokens``; ``stop`` ends an answer at
the first of up to 4 strings (greedy and sampling stop generating there); ``n`` answers per request (identical
ones for the deterministic decodings); ``usage`` counts the prompt's tokens (image slots included) and the answer's.

Batching. One worker thread runs the model. Chat requests with the same decoding settings that arrive within
``--batch-wait-ms`` of each other run as one `VisCPMChat.batch_chat` call of up to ``--max-batch-size`` answers;
a batched answer is the answer the request gets alone. The wait happens only when the server is busy (requests
queued or coming in, or the last batch had several), so a lone client's requests start at once. Sampling with a ``seed`` runs alone (its random numbers are
its own). If a batch fails, its requests run again one by one, so one bad request fails alone.

Limits (each a clear error; see `ApiLimits`): request body, image bytes and pixels (checked on the header, before
decoding: decompression bombs), prompt characters and tokens, ``max_tokens``, ``n``, queued requests (503 when
full), and Paint's prompt, size, steps and image count. Errors are OpenAI's error JSON,
``{"error": {"message", "type", "param", "code"}}``. A client that disconnects frees its place: a queued request
is dropped, a streaming greedy/sampled answer stops generating. SIGTERM (or Ctrl-C) stops accepting connections,
finishes the requests in flight and exits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import errno
import hashlib
import hmac
import io
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from viscpm.chat import streams as can_stream
from viscpm.conversion.common import first_line

from .common import SEED_MAX, AppError, decoding_options, load_chat, load_paint, paint_images

__all__ = ["API_KEY_ENV", "ApiError", "ApiLimits", "Batcher", "build_app", "check_image_header", "image_bytes",
           "serve"]

logger = logging.getLogger("viscpm.api")

API_KEY_ENV = "VISCPM_API_KEY"
"""Environment variable read for the API key when ``--api-key`` is not given."""
SHUTDOWN_GRACE_S = 300
"""How long SIGTERM waits for the requests in flight before closing their connections."""
PREPARE_GRACE_S = 0.25
"""How long a batch being formed may wait, beyond ``--batch-wait-ms``, for requests that arrived within it but are
still being read and checked (their images decoded)."""


@dataclasses.dataclass(frozen=True)
class ApiLimits:
    """What one request may ask for; anything beyond is refused with an error that names the limit."""

    max_body_bytes: int = 20 * 2**20  # the JSON body, base64 images included
    max_image_bytes: int = 10 * 2**20  # one image file, decoded from base64 (or read from a path / URL)
    max_image_pixels: int = 25_000_000  # width x height, read from the header before decoding
    max_prompt_chars: int = 20_000  # the text of all messages, checked before tokenizing
    max_prompt_tokens: int = 3000  # the prompt with its image slots (the original's max_inp_length)
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_n: int = 8  # answers per chat request
    max_stop: int = 4  # stop strings
    max_queue: int = 256  # requests waiting for the model (503 beyond)
    max_images: int = 4  # pictures per image request
    max_paint_steps: int = 100
    max_paint_size: int = 1024  # pixels per side
    max_paint_prompt_chars: int = 1000
    vision_cache: int = 64  # images whose vision features are kept


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.json(), status_code=self.status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# ----------------------------------------------------------------------------------------------------------------
# Request bodies
# ----------------------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Body):
    url: str
    detail: str | None = None


class _Part(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class _Message(_Body):
    role: str
    content: str | list[_Part] | None = None
    name: str | None = None


class _StreamOptions(_Body):
    include_usage: bool = False


_UNSUPPORTED = {  # OpenAI fields VisCPM cannot honour: refused when set to anything but their neutral value
    "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
    "function_call": "function calls", "logprobs": "log probabilities", "top_logprobs": "log probabilities",
    "logit_bias": "logit bias", "audio": "audio output", "prediction": "predicted outputs",
    "reasoning_effort": "reasoning settings", "web_search_options": "web search",
}


class ChatCompletionRequest(_Body):
    model: str
    messages: list[_Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: _StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: dict | None = None
    modalities: list[str] | None = None
    # extra fields (openai client: extra_body={...})
    decoding: Literal["beam", "greedy", "sample"] | None = None
    num_beams: int | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    # accepted and ignored: they change nothing in the answer
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # refused when set (see _UNSUPPORTED)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class ImageGenerationRequest(_Body):
    model: str | None = None
    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    user: str | None = None
    # extra fields (openai client: extra_body={...})
    negative_prompt: str | None = None
    steps: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None


async def _read_json(request: Request, schema: type[BaseModel], limits: ApiLimits):
    """The body, size-limited while it is read, parsed as JSON and validated against ``schema``."""
    limit = limits.max_body_bytes
    too_large = ApiError(413, f"the request body is over the limit of {limit} bytes; send a smaller image (the body "
                              "holds it in base64)", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as error:
        raise _bad(f"the request body is not valid JSON ({first_line(error)})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise _bad("the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        # Of a union's alternatives (a message's content: a str or a list of parts), the one that got furthest.
        problem = max(error.errors(), key=lambda problem: len(problem["loc"]))
        param = ".".join(str(part) for part in problem["loc"] if not str(part).startswith(("str", "list["))) or None
        if param and param.endswith(".content") and len(problem["loc"]) == 4:
            raise _bad(f"{param} must be a string or a list of parts ({{'type': 'text', 'text': ...}} or "
                       "{'type': 'image_url', 'image_url': {'url': ...}})", param, "invalid_value") from None
        if problem["type"] == "extra_forbidden":
            raise _bad(f"unrecognized request argument: {param}", param, "unknown_parameter") from None
        if problem["type"] == "missing":
            raise _bad(f"missing required parameter: {param}", param, "missing_required_parameter") from None
        raise _bad(f"{param}: {problem['msg']}", param, "invalid_value") from None


def _in_range(value, low, high, param: str, what: str = "") -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(f"{param} must be a finite number, got {value}", param, "invalid_value")
    if not low <= value <= high:
        raise _bad(f"{param} must be between {low} and {high}{what}, got {value}", param, "invalid_value")


def _check_seed(seed: int | None) -> None:
    _in_range(seed, 0, SEED_MAX, "seed")


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def _too_big(what: str, size: int, limits: ApiLimits) -> ApiError:
    return ApiError(413, f"{what} is {size} bytes, over the limit of {limits.max_image_bytes}; send a smaller image",
                    "messages", "image_too_large")


def _data_url_bytes(url: str, limits: ApiLimits) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise _bad("an image data URL must be base64: data:image/png;base64,...", "messages", "invalid_image_url")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > limits.max_image_bytes + 2:
        raise _too_big("the image", len(payload) * 3 // 4, limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the image data URL is not valid base64", "messages", "invalid_base64") from None


def _local_bytes(url: str, limits: ApiLimits) -> bytes:
    path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
    if not path.is_file():
        raise _bad(f"image file {path} not found (paths are read on the server)", "messages", "invalid_image_url")
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise _too_big(f"image file {path}", size, limits)
    return path.read_bytes()


def _remote_bytes(url: str, limits: ApiLimits, timeout: float = 10.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read(limits.max_image_bytes + 1)
    except urllib.error.HTTPError as error:
        raise _bad(f"could not fetch the image {url}: HTTP {error.code}", "messages", "invalid_image_url") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise _bad(f"could not fetch the image {url}: {first_line(reason)}", "messages",
                   "invalid_image_url") from None
    if len(data) > limits.max_image_bytes:
        raise _too_big(f"the image at {url}", len(data), limits)
    return data


def image_bytes(url: str, limits: ApiLimits, allow_local: bool = False, allow_remote: bool = False) -> bytes:
    """The bytes of an ``image_url``: a base64 data URL, or (when allowed) a local path or an http(s) URL."""
    if url.startswith("data:"):
        return _data_url_bytes(url, limits)
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise _bad("remote image URLs are off on this server: send the image as a base64 data URL (or start "
                       "the server with --allow-remote-images)", "messages", "invalid_image_url")
        return _remote_bytes(url, limits)
    if url.startswith("file://") or url.startswith(("/", "~", ".")):
        if not allow_local:
            raise _bad("local image paths are off on this server: send the image as a base64 data URL (or start "
                       "the server with --allow-local-images)", "messages", "invalid_image_url")
        return _local_bytes(url, limits)
    raise _bad(f"unsupported image URL {url[:40]!r}...: send a base64 data URL (data:image/png;base64,...)",
               "messages", "invalid_image_url")


def check_image_header(data: bytes, limits: ApiLimits) -> None:
    """Refuse what is not an image, or has too many pixels, from its header alone (before decoding it)."""
    import PIL.Image

    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except PIL.Image.DecompressionBombError:
        width = height = None
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise _bad("the image is not an image file PIL can read: send a PNG, JPEG, WebP, GIF or BMP",
                   "messages", "invalid_image_format") from None
    if width is None or width * height > limits.max_image_pixels:
        size = "over PIL's decompression-bomb limit" if width is None else f"{width}x{height} = {width * height}"
        raise ApiError(413, f"the image is {size} pixels, over the limit of {limits.max_image_pixels}; send a "
                            "smaller image (VisCPM-Chat sees 224x224 anyway)", "messages", "image_too_large")


# ----------------------------------------------------------------------------------------------------------------
# Generation: the one place that knows how `VisCPMChat.batch_chat` reaches `generate()`
# ----------------------------------------------------------------------------------------------------------------


def _encode_image(chat, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision features of one preprocessed image, as `VisCPMChat.batch_chat` computes them (``[1, q, d]``)."""
    with torch.no_grad():
        return chat.model.get_vision_hidden_states(pixel_values.to(chat.device))


class _Row:
    """One generated answer of a batch: its text as it grows, cut at the first stop string."""

    def __init__(self, job, index: int):
        self.job, self.index, self.stops = job, index, job.stops
        self.sent = ""  # text already passed to the job
        self.stopped = False  # a stop string was reached
        self.tokens = None  # generated tokens, counted by the streamer (transformers' loop only)

    @property
    def done(self) -> bool:
        return self.stopped or self.job.cancelled.is_set()

    def _cut(self, text: str) -> tuple[str, bool]:
        """``text`` up to the first stop string, and whether one was found."""
        ends = [text.find(stop) for stop in self.stops if stop in text]
        return (text[:min(ends)], True) if ends else (text, False)

    def update(self, text: str, final: bool = False) -> None:
        """New text of the answer so far: pass on what cannot be the start of a stop string."""
        if self.stopped:
            return
        text, self.stopped = self._cut(text)
        if not (final or self.stopped):
            hold = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
            text = text[:len(text) - hold]
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.on_text(self, text[len(self.sent):])
            self.sent = text

    def finish(self, answer: str) -> tuple[str, bool]:
        """The final answer (plain text, cut at a stop string) and whether a stop string ended it."""
        text, stopped = self._cut(answer)
        self.stopped = self.stopped or stopped
        self.update(text, final=True)
        return text, self.stopped


class _RowStreamer(BaseStreamer):
    """transformers' streamer for a whole batch: each row's text goes to its `_Row` as it is generated."""

    def __init__(self, tokenizer, tables: list[dict], rows: list[_Row], eos_token_id: int):
        self.tokenizer, self.tables, self.rows, self.eos = tokenizer, tables, rows, eos_token_id
        self.ids: list[list[int]] = [[] for _ in rows]
        self.ended = [False] * len(rows)
        self.prompt_seen = False

    def _text(self, row: int) -> str:
        return self.tokenizer.unescape(self.tokenizer.decode(self.ids[row], ext_table=self.tables[row]))

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        for row, tokens in enumerate(value.reshape(len(self.rows), -1).tolist()):
            if self.ended[row]:
                continue
            for token in tokens:
                if token == self.eos:
                    self.ended[row] = True
                    break
                self.ids[row].append(token)
            self.rows[row].tokens = len(self.ids[row])
            self.rows[row].update(self._text(row))

    def end(self) -> None:
        for row in range(len(self.rows)):
            self.rows[row].tokens = len(self.ids[row])


class _StopRows(StoppingCriteria):
    """Ends the rows whose answer reached a stop string or whose client went away."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


def _generate_rows(chat, rows: list[_Row], options: dict, streams: bool) -> list:
    """Run ``rows`` (each a (question, context, image features) of its job) as one `VisCPMChat.batch_chat` call.

    With transformers' decoding loop (``streams``: greedy search or sampling) a streamer passes each row's text on as
    it is generated and a stopping criterion ends the rows that reached a stop string or lost their client; the
    original beam search takes neither and runs to the end."""
    questions, contexts = [row.job.question for row in rows], [row.job.context for row in rows]
    states = torch.cat([row.job.states for row in rows])
    extra = {}
    if streams:
        tokenizer = chat.processor.tokenizer
        # ext ids are numbered per batch: the tables must come from the batch's prompts, in order
        tables = tokenizer.get_ext_tables([chat.processor.build_prompt(q, c) for q, c in zip(questions, contexts)])
        extra = dict(streamer=_RowStreamer(tokenizer, tables, rows, tokenizer.eos_token_id),
                     stopping_criteria=StoppingCriteriaList([_StopRows(rows)]))
    return chat.batch_chat([row.job.image for row in rows], questions, contexts, vision_hidden_states=states,
                           **options, **extra)


def _count_tokens(tokenizer, row: _Row, text: str) -> int:
    """Tokens of an answer: as generated when the streamer counted them, otherwise ``text`` tokenized again."""
    if row.tokens is not None and not row.stopped:
        return row.tokens
    return len(tokenizer.tokenize(tokenizer.escape(text)))


# ----------------------------------------------------------------------------------------------------------------
# Jobs and the batching worker
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    """A request waiting for the model. ``emit`` passes events to the request's handler from the worker thread:
    ``("text", choice, piece)``, ``("done", result)``, ``("error", ApiError)``."""

    emit: Callable[[tuple], None] | None = None
    key: Any = None  # jobs with equal keys (not None) may run in one batch
    rows: int = 1
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    streamed: bool = False  # text has been passed on (it cannot be taken back by a retry)

    def fail(self, error: ApiError) -> None:
        self.emit(("error", error))


@dataclasses.dataclass(eq=False)
class _ChatJob(_Job):
    question: str = ""
    context: str = ""
    image: bytes | None = None  # kept only for an image safety checker (the model uses `states`)
    image_key: str = ""
    pixel_values: torch.Tensor | None = None
    states: torch.Tensor | None = None
    options: dict = dataclasses.field(default_factory=dict)
    streams: bool = False  # transformers' loop: text as it is generated
    seed: int | None = None
    stops: list = dataclasses.field(default_factory=list)
    max_tokens: int = 0
    choices: int = 1  # n; `rows` is n for sampling, 1 for the deterministic decodings (copied)

    def on_text(self, row: _Row, piece: str) -> None:
        self.streamed = True
        for choice in range(row.index, self.choices, self.rows):
            self.emit(("text", choice, piece))


@dataclasses.dataclass(eq=False)
class _PaintJob(_Job):
    prompt: str = ""
    negative_prompt: str | None = None
    steps: int = 50
    seed: int | None = None
    size: int | None = None
    guidance_scale: float = 7.5


class Batcher:
    """The worker thread that runs every model call, batching compatible chat jobs (see the module docstring)."""

    def __init__(self, chat, painter=None, max_batch_size: int = 8, batch_wait_ms: float = 50.0,
                 limits: ApiLimits = ApiLimits()):
        self.chat, self.painter, self.limits = chat, painter, limits
        self.max_batch_size, self.batch_wait = max(1, int(max_batch_size)), max(0.0, batch_wait_ms) / 1000.0
        self._pending: list[_Job] = []
        self._arriving: list[float] = []  # when the requests now being read and checked came in
        self._last_batch = 1  # requests in the last chat batch
        self._cond = threading.Condition()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {"batches": 0, "largest_batch": 0, "running": 0, "cancelled": 0, "completed": 0,
                      "images_encoded": 0}

    # -- public, any thread

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="viscpm-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def arriving(self) -> float:
        """Note a request being read and checked before its `submit` (a companion the batch forming may wait for);
        pass the returned stamp to `arrived` once it is submitted or refused."""
        with self._cond:
            stamp = time.monotonic()
            self._arriving.append(stamp)
            return stamp

    def arrived(self, stamp: float) -> None:
        with self._cond:
            self._arriving.remove(stamp)
            self._cond.notify_all()

    def submit(self, job: _Job) -> None:
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down; retry on another replica", code="shutting_down")
            if len(self._pending) >= self.limits.max_queue:
                raise ApiError(503, f"the server is busy ({len(self._pending)} requests queued); retry later",
                               code="server_busy")
            self._pending.append(job)
            self._cond.notify_all()

    def cached_states(self, key: str) -> torch.Tensor | None:
        with self._cache_lock:
            states = self._cache.get(key)
            if states is not None:
                self._cache.move_to_end(key)
            return states

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- the worker

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self.stats["running"] = sum(job.rows for job in batch)
            try:
                if isinstance(batch[0], _PaintJob):
                    self._paint(batch[0])
                else:
                    self._chat_batch(batch)
            except BaseException as error:  # never let the worker die: fail the batch
                logger.exception("the model worker failed")
                for job in batch:
                    job.fail(_internal(error))
            finally:
                self.stats["running"] = 0

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return None
                first = self._pending.pop(0)
                if first.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    continue
                break
            batch, rows = [first], first.rows
            if first.key is None or self.max_batch_size == 1:
                return batch
            # Companions are waited for only when some are likely: the server is busy (others queued or arriving,
            # or the last batch had several requests); a lone client's requests start at once.
            busy = self._pending or self._arriving or self._last_batch > 1
            deadline = time.monotonic() + (self.batch_wait if busy else 0.0)
            while True:
                for job in [job for job in self._pending if job.key == first.key]:
                    if rows + job.rows > self.max_batch_size:
                        break
                    self._pending.remove(job)
                    if job.cancelled.is_set():
                        self.stats["cancelled"] += 1
                        continue
                    batch.append(job)
                    rows += job.rows
                now = time.monotonic()
                # Requests that arrived in time but are still being read and checked are waited for (briefly).
                expected = any(stamp <= deadline for stamp in self._arriving) and now < deadline + PREPARE_GRACE_S
                if rows >= self.max_batch_size or self._stopping or (now >= deadline and not expected):
                    self._last_batch = len(batch)
                    return batch
                self._cond.wait((deadline if now < deadline else deadline + PREPARE_GRACE_S) - now)

    def _states(self, job: _ChatJob) -> torch.Tensor:
        states = job.states if job.states is not None else self.cached_states(job.image_key)
        if states is None:
            states = _encode_image(self.chat, job.pixel_values)
            self.stats["images_encoded"] += 1
            with self._cache_lock:
                self._cache[job.image_key] = states
                while len(self._cache) > self.limits.vision_cache:
                    self._cache.popitem(last=False)
        job.pixel_values = None
        return states

    def _chat_batch(self, jobs: list[_ChatJob]) -> None:
        ready = []
        for job in jobs:
            try:
                job.states = self._states(job)
                ready.append(job)
            except Exception as error:
                job.fail(_internal(error, "encoding the image failed"))
        if not ready:
            return
        try:
            self._chat(ready)
        except Exception as error:
            if len(ready) == 1:
                ready[0].fail(_chat_error(error))
                return
            logger.warning("a batch of %d failed (%s); running its requests one by one", len(ready), first_line(error))
            for job in ready:
                if job.streamed or job.cancelled.is_set():
                    job.fail(_chat_error(error))
                    continue
                try:
                    self._chat([job])
                except Exception as alone:
                    job.fail(_chat_error(alone))

    def _chat(self, jobs: list[_ChatJob]) -> None:
        rows = [_Row(job, index) for job in jobs for index in range(job.rows)]
        if jobs[0].seed is not None:
            torch.manual_seed(jobs[0].seed)
        responses = _generate_rows(self.chat, rows, jobs[0].options, jobs[0].streams)
        tokenizer = self.chat.processor.tokenizer
        results: dict[int, list] = {id(job): [None] * job.rows for job in jobs}
        for row, response in zip(rows, responses):
            text, stopped = row.finish(tokenizer.unescape(response.answer))
            tokens = _count_tokens(tokenizer, row, text)
            reason = "stop" if stopped or tokens < row.job.max_tokens else "length"
            results[id(row.job)][row.index] = (text, tokens, reason)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        for job in jobs:
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                logger.info("a request was cancelled (its client went away) after %d generated tokens",
                            max(result[1] for result in results[id(job)]))
            self.stats["completed"] += 1
            done = results[id(job)]
            job.emit(("done", [done[choice % job.rows] for choice in range(job.choices)]))

    def _paint(self, job: _PaintJob) -> None:
        try:
            images, _ = paint_images(self.painter, job.prompt, job.negative_prompt, steps=job.steps, seed=job.seed,
                                     size=job.size, num_images=job.rows, guidance_scale=job.guidance_scale)
        except AppError as error:
            job.fail(_bad(str(error), "prompt"))
            return
        except Exception as error:
            job.fail(_internal(error, "painting failed"))
            return
        self.stats["completed"] += 1
        job.emit(("done", images))


def _internal(error: BaseException, what: str = "generation failed") -> ApiError:
    if isinstance(error, ApiError):
        return error
    return ApiError(500, f"{what}: {type(error).__name__}: {first_line(error)[:300]}", code="internal_error")


def _chat_error(error: Exception) -> ApiError:
    """A generation error: a ValueError is about the request's values (400), anything else the server's (500)."""
    if isinstance(error, ValueError):
        return _bad(first_line(error)[:500], code="invalid_value")
    return _internal(error)


# ----------------------------------------------------------------------------------------------------------------
# Chat requests
# ----------------------------------------------------------------------------------------------------------------


class _ChatRequestParser:
    """Turns a validated chat request into a `_ChatJob` (in a worker thread of the event loop: images are decoded
    and tokens counted here, outside the model thread)."""

    def __init__(self, chat, batcher: Batcher, limits: ApiLimits, allow_local: bool, allow_remote: bool):
        self.chat, self.batcher, self.limits = chat, batcher, limits
        self.allow_local, self.allow_remote = allow_local, allow_remote
        config = chat.model.generation_config
        self.default_max_tokens = min(int(getattr(config, "max_new_tokens", None) or 512), limits.max_tokens)

    def messages(self, request: ChatCompletionRequest) -> tuple[str, str, str]:
        """``(question, context, image URL)``, laid out by the processor as `VisCPMChat.chat` lays them out."""
        if not request.messages:
            raise _bad("messages is empty: send at least one user message with an image and a question", "messages")
        converted, chars = [], 0
        for message in request.messages:
            content = message.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.type == "text":
                        if part.text is None:
                            raise _bad("a text part needs 'text'", "messages")
                        parts.append({"type": "text", "text": part.text})
                        chars += len(part.text)
                    else:
                        if part.image_url is None:
                            raise _bad("an image_url part needs 'image_url': {'url': ...}", "messages")
                        parts.append({"type": "image", "url": part.image_url.url})
                content = parts
            elif isinstance(content, str):
                chars += len(content)
            converted.append({"role": message.role, "content": content})
        if chars > self.limits.max_prompt_chars:
            raise _bad(f"the messages hold {chars} characters of text, over the limit of "
                       f"{self.limits.max_prompt_chars}; drop the oldest turns", "messages", "context_length_exceeded")
        try:
            question, context, image = self.chat.processor.conversation_to_prompt(converted)
        except ValueError as error:
            raise _bad(str(error), "messages") from None
        if image is None:
            raise _bad("no image: VisCPM-Chat answers questions about an image; add an image_url part (a base64 "
                       "data URL) to a user message", "messages", "missing_image")
        return question, context, image

    def decoding(self, request: ChatCompletionRequest, max_tokens: int) -> tuple[dict, bool]:
        """Generation overrides for `VisCPMChat.chat` and whether they sample (see the module docstring)."""
        temperature, top_p = request.temperature, request.top_p
        _in_range(temperature, 0.0, 2.0, "temperature")
        _in_range(top_p, 0.0, 1.0, "top_p")
        if top_p is not None and top_p <= 0:
            raise _bad("top_p must be above 0", "top_p", "invalid_value")
        _in_range(request.num_beams, 1, 8, "num_beams")
        _in_range(request.top_k, 1, 1000, "top_k")
        _in_range(request.repetition_penalty, 0.5, 2.0, "repetition_penalty")
        mode = request.decoding
        if mode is None:
            mode = "beam" if temperature is None and top_p is None else "greedy" if temperature == 0 else "sample"
        if mode == "greedy":
            if temperature not in (None, 0) or top_p not in (None, 1) or request.top_k is not None:
                raise _bad("greedy search takes no temperature, top_p or top_k; ask for decoding='sample'",
                           "decoding", "invalid_value")
            if request.num_beams not in (None, 1):
                raise _bad("greedy search decodes one beam; drop num_beams or ask for decoding='beam'", "num_beams")
            temperature = top_p = None
        elif temperature == 0:
            raise _bad(f"temperature 0 means greedy search; {mode} decoding needs a temperature above 0",
                       "temperature", "invalid_value")
        if mode == "beam" and (top_p is not None or request.top_k is not None):
            raise _bad("top_p and top_k apply to sampling; set a temperature above 0 (or decoding='sample') to "
                       "sample", "top_p", "invalid_value")
        try:
            options = decoding_options(mode, num_beams=request.num_beams, max_new_tokens=max_tokens,
                                       temperature=temperature, top_p=top_p, top_k=request.top_k,
                                       repetition_penalty=request.repetition_penalty)
        except AppError as error:
            raise _bad(str(error), "decoding") from None
        return options, mode == "sample"

    def image(self, url: str) -> tuple[bytes, str, torch.Tensor | None, torch.Tensor | None]:
        """``(bytes, cache key, pixel values, cached features)``: a cached image is not decoded again."""
        data = image_bytes(url, self.limits, self.allow_local, self.allow_remote)
        key = hashlib.sha256(data).hexdigest()
        states = self.batcher.cached_states(key)
        if states is not None:
            return data, key, None, states
        check_image_header(data, self.limits)
        try:
            pixels = self.chat.processor.image_processor(data, return_tensors="pt")["pixel_values"]
        except (ValueError, OSError) as error:
            raise _bad(f"cannot use the image: {first_line(error)}", "messages", "invalid_image_format") from None
        return data, key, pixels, None

    def job(self, request: ChatCompletionRequest) -> tuple[_ChatJob, int]:
        """The job for ``request`` and its prompt's token count."""
        for field, what in _UNSUPPORTED.items():
            if getattr(request, field) not in (None, False, [], {}):
                raise _bad(f"{field}: VisCPM-Chat does not support {what}", field, "unsupported_parameter")
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(request, field) not in (None, 0, 0.0):
                raise _bad(f"{field} is not supported; use repetition_penalty (an extra field, default: the "
                           "model's 1.1)", field, "unsupported_parameter")
        if request.response_format not in (None, {"type": "text"}):
            raise _bad("response_format: VisCPM-Chat answers in text only", "response_format",
                       "unsupported_parameter")
        if request.modalities not in (None, ["text"]):
            raise _bad("modalities: VisCPM-Chat answers in text only", "modalities", "unsupported_parameter")
        limits = self.limits
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        _in_range(max_tokens, 1, limits.max_tokens, param, " (this server's limit)")
        max_tokens = max_tokens or self.default_max_tokens
        _in_range(request.n, 1, limits.max_n, "n", " (this server's limit)")
        _check_seed(request.seed)
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > limits.max_stop or any(not stop or len(stop) > 100 for stop in stops):
            raise _bad(f"stop takes up to {limits.max_stop} non-empty strings of at most 100 characters", "stop")
        options, samples = self.decoding(request, max_tokens)
        question, context, url = self.messages(request)
        tokens = self._prompt_tokens(question, context)
        data, key, pixels, states = self.image(url)
        rows = request.n if samples else 1
        streams = can_stream(self.chat.model.generation_config, options)
        seeded = samples and request.seed is not None
        batch_key = None if seeded else tuple(sorted(options.items()))
        checked = getattr(self.chat, "image_safety_checker", None) is not None  # it reads the image itself
        job = _ChatJob(key=batch_key, rows=rows, question=question, context=context,
                       image=data if checked else None, image_key=key, pixel_values=pixels, states=states,
                       options=options, streams=streams, seed=request.seed if seeded else None, stops=stops,
                       max_tokens=max_tokens, choices=request.n)
        return job, tokens

    def _prompt_tokens(self, question: str, context: str) -> int:
        """Tokens of the prompt, image slots included; over the limit as the processor counts it (one more, for
        the original's answer placeholder) is an error."""
        processor = self.chat.processor
        tokens = len(processor.tokenizer([processor.build_prompt(question, context)])["input_ids"][0])
        if tokens + 1 > self.limits.max_prompt_tokens:
            raise _bad(f"the prompt is {tokens + 1} tokens, over the limit of {self.limits.max_prompt_tokens}; drop "
                       "the oldest turns", "messages", "context_length_exceeded")
        return tokens


# ----------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------


class _Events:
    """The events of one job, passed from the model thread to the request's coroutine."""

    def __init__(self, request: Request):
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job: _Job | None = None

    def emit(self, event: tuple) -> None:  # from the model thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def next(self) -> tuple:
        """The next event; a client that went away cancels the job (``None`` is returned)."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    self.cancel()
                    return None

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancelled.set()

    def submit(self, job: _Job, batcher: Batcher) -> None:
        job.emit, self.job = self.emit, job
        batcher.submit(job)

    async def result(self):
        """The job's result (its error is raised); ``None`` when the client went away."""
        while True:
            event = await self.next()
            if event is None or event[0] == "done":
                return event and event[1]
            if event[0] == "error":
                raise event[1]


class _ApiKey:
    """ASGI middleware: every path but /health needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                message = ("missing API key: send Authorization: Bearer <key>" if not given else
                           "incorrect API key provided")
                error = ApiError(401, message, code="invalid_api_key", type="invalid_request_error")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "viscpm"}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(chat, painter=None, chat_name: str = "viscpm-chat", paint_name: str = "viscpm-paint",
              api_key: str | None = None, limits: ApiLimits = ApiLimits(), max_batch_size: int = 8,
              batch_wait_ms: float = 50.0, allow_local_images: bool = False,
              allow_remote_images: bool = False) -> FastAPI:
    """The FastAPI app around a loaded `VisCPMChat` (and optionally a `VisCPMPaint`)."""
    batcher = Batcher(chat, painter, max_batch_size, batch_wait_ms, limits)
    parser = _ChatRequestParser(chat, batcher, limits, allow_local_images, allow_remote_images)
    if limits.max_prompt_tokens > (chat.processor.max_prompt_length or 0):
        chat.processor.max_prompt_length = limits.max_prompt_tokens
    created = int(time.time())
    models = {chat_name: "chat", **({paint_name: "paint"} if painter is not None else {})}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="VisCPM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    if api_key:
        app.add_middleware(_ApiKey, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = (f"unknown path {request.url.path}: this server answers POST /v1/chat/completions, POST "
                       "/v1/images/generations, GET /v1/models and GET /health")
            return ApiError(404, message, code="unknown_url").response()
        if error.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        return ApiError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return _internal(error, "unexpected error").response()

    def check_model(name: str | None, kind: str) -> None:
        if name not in models:
            served = ", ".join(models)
            raise ApiError(404, f"the model {name!r} does not exist on this server; it serves: {served}", "model",
                           "model_not_found")
        if models[name] != kind:
            where = "/v1/chat/completions" if models[name] == "chat" else "/v1/images/generations"
            raise ApiError(422, f"{name} is a {models[name]} model: use {where}", "model", "wrong_model_kind")

    @app.get("/health")
    async def health():
        status = "shutting down" if batcher.stopping else "ok"
        body = {"status": status, "queued": batcher.queued, **batcher.stats}
        return JSONResponse(body, status_code=503 if batcher.stopping else 200)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(name, created) for name in models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in models:
            raise ApiError(404, f"the model {name!r} does not exist on this server", "model", "model_not_found")
        return _model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        stamp = batcher.arriving()
        try:
            body = await _read_json(request, ChatCompletionRequest, limits)
            check_model(body.model, "chat")
            job, prompt_tokens = await run_in_threadpool(parser.job, body)
            events = _Events(request)
            events.submit(job, batcher)
        finally:
            batcher.arrived(stamp)
        reply = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                     system_fingerprint=None)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(events, reply, job.choices, prompt_tokens, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await events.result()
        if result is None:  # the client went away
            return JSONResponse({}, status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None, "finish_reason": reason} for i, (text, _, reason) in enumerate(result)]
        completion = sum(tokens for _, tokens, _ in result)
        return {**reply, "object": "chat.completion", "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    async def _stream(events: _Events, reply: dict, choices: int, prompt_tokens: int, usage: bool):
        def chunk(index: int, delta: dict, finish: str | None = None) -> str:
            body = {**reply, "object": "chat.completion.chunk",
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if usage:
                body["usage"] = None
            return _sse(body)

        finished = False
        try:
            for index in range(choices):
                yield chunk(index, {"role": "assistant", "content": "", "refusal": None})
            while True:
                event = await events.next()
                if event is None:
                    return
                if event[0] == "text":
                    yield chunk(event[1], {"content": event[2]})
                elif event[0] == "error":
                    yield _sse(event[1].json())
                    finished = True
                    return
                else:
                    break
            for index, (text, _, reason) in enumerate(event[1]):
                yield chunk(index, {}, reason)
            if usage:
                completion = sum(tokens for _, tokens, _ in event[1])
                yield _sse({**reply, "object": "chat.completion.chunk", "choices": [],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                      "total_tokens": prompt_tokens + completion}})
            yield _sse("[DONE]")
            finished = True
        finally:
            if not finished:  # the client went away (or the server is closing its connection)
                events.cancel()

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        if painter is None:
            raise ApiError(404, "this server has no image model: start it with --paint PAINT_MODEL", "model",
                           "model_not_found")
        body = await _read_json(request, ImageGenerationRequest, limits)
        check_model(body.model if body.model is not None else paint_name, "paint")
        events = _Events(request)
        events.submit(_paint_job(body, limits), batcher)
        images = await events.result()
        if images is None:
            return JSONResponse({}, status_code=499)
        data = await run_in_threadpool(lambda: [{"b64_json": _png_base64(image), "revised_prompt": None}
                                                for image in images])
        return {"created": int(time.time()), "data": data}

    return app


def _paint_job(body: ImageGenerationRequest, limits: ApiLimits) -> _PaintJob:
    if not body.prompt.strip():
        raise _bad("the prompt is empty; describe the picture", "prompt")
    if len(body.prompt) > limits.max_paint_prompt_chars:
        raise _bad(f"the prompt is {len(body.prompt)} characters, over the limit of {limits.max_paint_prompt_chars}",
                   "prompt", "context_length_exceeded")
    if body.negative_prompt is not None and len(body.negative_prompt) > limits.max_paint_prompt_chars:
        raise _bad(f"negative_prompt is over the limit of {limits.max_paint_prompt_chars} characters",
                   "negative_prompt")
    if body.response_format not in (None, "b64_json"):
        raise _bad("response_format: this server returns images as b64_json only (it hosts no files)",
                   "response_format", "unsupported_parameter")
    _in_range(body.n, 1, limits.max_images, "n", " (this server's limit)")
    _in_range(body.steps, 1, limits.max_paint_steps, "steps", " (this server's limit)")
    _in_range(body.guidance_scale, 0.0, 50.0, "guidance_scale")
    _check_seed(body.seed)
    size = None
    if body.size not in (None, "auto"):
        width, _, height = body.size.partition("x")
        if not (width.isdigit() and height.isdigit()) or width != height:
            raise _bad(f"size must be 'NxN' (square), e.g. '512x512', got {body.size!r}", "size")
        size = int(width)
        if size % 8 or not 64 <= size <= limits.max_paint_size:
            raise _bad(f"size must be a multiple of 8 between 64 and {limits.max_paint_size}, got {size}", "size")
    return _PaintJob(rows=body.n, prompt=body.prompt, negative_prompt=body.negative_prompt,
                     steps=body.steps or 50, seed=body.seed, size=size,
                     guidance_scale=7.5 if body.guidance_scale is None else body.guidance_scale)


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _model_name(path: str) -> str:
    """The id a model is served under: a local folder's name, or the Hub repo id as given."""
    local = Path(path).expanduser()
    return local.resolve().name if local.exists() else path


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, or a one-line error that says which address failed and why."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise AppError(f"cannot listen on {host}: not a valid address ({first_line(error)}); use e.g. 127.0.0.1 or "
                       "0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        hint = "the port is in use: pick another --port" if error.errno == errno.EADDRINUSE else "check --host"
        raise AppError(f"cannot listen on {host}:{port} ({error.strerror or error}); {hint}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _server(config):
    """A uvicorn server for which SIGTERM is a graceful stop: it stops accepting connections, finishes the requests
    in flight, and the process then exits normally (uvicorn would raise the signal again, ending with status 143)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return Server(config)


def serve(chat_model: str, paint_model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, dtype: str | None = None, device: str | None = None,
          max_batch_size: int = 8, batch_wait_ms: float = 50.0, limits: ApiLimits = ApiLimits(),
          allow_local_images: bool = False, allow_remote_images: bool = False, log_level: str = "info") -> None:
    """Load the models and serve the API until SIGTERM (or Ctrl-C); the requests in flight are finished first."""
    import uvicorn

    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level.upper())
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    sock = _listen(host, port)
    try:
        chat = load_chat(chat_model, dtype, device)
        painter = load_paint(paint_model, dtype, device, progress=False) if paint_model is not None else None
        app = build_app(chat, painter, _model_name(chat_model), _model_name(paint_model) if paint_model else "",
                        api_key=api_key, limits=limits, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                        allow_local_images=allow_local_images, allow_remote_images=allow_remote_images)
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("serving on %s without an API key: anyone who can reach it can use it (--api-key or "
                           "%s)", host, API_KEY_ENV)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        logger.info("VisCPM API on http://%s:%d/v1: %s%s", host, port, ", ".join(
            name for name in (_model_name(chat_model), paint_model and _model_name(paint_model)) if name),
            " (API key required)" if api_key else "")
        _server(config).run(sockets=[sock])
    finally:
        sock.close()
