"""LLaVA-bench: a judge model scores the model's answers against reference answers (the protocol of LLaVA's
``eval_gpt_review_visual.py`` and ``summarize_gpt_review.py``, which VisCPM's published figures follow).

The protocol. For each question the judge (GPT-4 in the papers) gets, in one user message, the image's context
(its captions, and object boxes when the context file has them: the judge never sees the image), the question, the
reference answer as "Assistant 1" and the model's answer as "Assistant 2", then the rule of the question's category
(rate helpfulness, relevance, accuracy and level of detail on a 1-10 scale; first line: the two scores). Per
category, the score is ``mean(model) / mean(reference) * 100`` over the questions the judge scored; the two means
(1-10 scale; LLaVA's script prints them times 10) come with it, and an ``all`` row pools every question.

Unlike LLaVA's script, a reply whose first line is not two scores is counted as *unparseable* and left out of the
means (LLaVA averages it in as ``-1, -1``), and a judge call that fails (timeout, HTTP error, a reply that is not a
chat completion) is retried, then counted as *failed*; the next run retries it.

The files (LLaVA-bench's own format, e.g. ``liuhaotian/llava-bench-in-the-wild``; a Chinese bench is the same files
translated):

    questions.jsonl      {"question_id", "image", "text", "category"} per line
    answers_gpt4.jsonl   {"question_id", "text"}: the reference answers (Assistant 1)
    context.jsonl        {"image", "caption"} (a string or a list; optional "instances": [{"category", "bbox"}])
    images/              the images the questions name
    rule.json            optional: {"llava_bench_<category>": {"role", "prompt"}, ...}; without it, `DEFAULT_RULE`

The run is resumable: the model's answers and the judge's reviews go to ``answers.jsonl`` and ``reviews.jsonl`` in
the output folder, one line per question, appended and flushed as each arrives, so an interrupted run loses at most
the line being written; a rerun reuses every answer, and every review of the same answer by the same judge.

HTTP is the standard library's ``urllib.request``: the OpenAI chat-completions protocol is one JSON POST, and this
keeps the evaluation free of dependencies the package does not already have (httpx is no longer a dependency of
huggingface_hub, so it may be absent). Nothing here imports torch; `local_chat_answerer` uses a loaded model.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.client
import json
import math
import mimetypes
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ANSWERS_FILE",
    "DEFAULT_FILES",
    "DEFAULT_RULE",
    "JUDGE_SYSTEM_PROMPT",
    "RESULTS_FILE",
    "REVIEWS_FILE",
    "BenchError",
    "EndpointError",
    "LlavaBench",
    "Question",
    "build_judge_messages",
    "check_images",
    "chat_endpoint_answerer",
    "chat_endpoint_judge",
    "format_table",
    "judge_answers",
    "load_bench",
    "load_records",
    "local_chat_answerer",
    "parse_scores",
    "post_chat_completion",
    "run_llava_bench",
    "summarize",
    "write_answers",
]

DEFAULT_FILES = {"questions": "questions.jsonl", "references": "answers_gpt4.jsonl", "context": "context.jsonl",
                 "images": "images", "rules": "rule.json"}
"""The file names inside a bench folder (LLaVA-bench-in-the-wild's)."""
ANSWERS_FILE, REVIEWS_FILE, RESULTS_FILE = "answers.jsonl", "reviews.jsonl", "results.json"

JUDGE_SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
"""The judge's system message in LLaVA's protocol."""
JUDGE_TEMPERATURE, JUDGE_MAX_TOKENS = 0.2, 1024
"""LLaVA's judge settings."""

DEFAULT_RULE = {
    "role": "Assistant",
    "prompt": (
        "Above are a user's question about an image and the answers of two AI assistants. The user could see the "
        "image; you cannot, so the image is described to you by the sentences (and any object boxes) under "
        "[Context].\nPlease judge both answers for their helpfulness, relevance, accuracy and level of detail. Give "
        "each assistant one overall score from 1 to 10, where a higher score means a better answer.\nOn the first "
        "line, write only the two scores, Assistant 1's and then Assistant 2's, separated by a space.\nFrom the next "
        "line on, explain your judgement in detail. Be impartial: the order in which the answers appear must not "
        "influence your scores."
    ),
}
"""The rule used for every category when no rule file is given: the LLaVA-bench rule in our own words."""


class BenchError(ValueError):
    """A problem with the bench files, the cache or the run that the user can fix; the message is one line."""


class EndpointError(Exception):
    """An OpenAI-compatible endpoint did not answer. ``retryable``: worth another try (timeouts, 429, 5xx, broken
    replies); ``fatal``: no other request will fare better (wrong URL, key or model), so the run stops."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = True, fatal: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retryable, self.fatal, self.retry_after = status, retryable, fatal, retry_after


# ----------------------------------------------------------------------------------------------------------------
# The bench files
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    question_id: int | str
    image: str
    text: str
    category: str
    where: str = ""
    """``file:line`` of the question, for messages."""

    @property
    def key(self) -> str:
        return str(self.question_id)


@dataclass
class LlavaBench:
    """The loaded bench: questions in file order, reference answers and contexts, the rule of each category."""

    questions: list[Question]
    references: dict[str, str]
    """Reference answer text by question key (``str(question_id)``)."""
    contexts: dict[str, str]
    """The judge's description of each image (captions, then boxes), by image name."""
    image_dir: Path
    rules: dict[str, dict]
    """``{"role", "prompt"}`` by category."""
    files: dict[str, str] = field(default_factory=dict)
    """Where each part came from (for the results file)."""

    def image_path(self, question: Question) -> Path:
        return self.image_dir / question.image

    def missing_images(self) -> list[Question]:
        return [question for question in self.questions if not self.image_path(question).is_file()]

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(question.category for question in self.questions))


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of a JSON-lines file; a line that is not a JSON object is
    a `BenchError` naming ``file:line``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise BenchError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BenchError(f"cannot read {path}: {error}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(record, dict):
            raise BenchError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _field(record: dict, name: str, where: str, kinds: tuple[type, ...] = (str,)):
    value = record.get(name)
    if value is None:
        raise BenchError(f"{where}: no {name!r} field")
    if not isinstance(value, kinds) or isinstance(value, bool):
        wanted = " or ".join(kind.__name__ for kind in kinds)
        raise BenchError(f"{where}: {name!r} must be a {wanted}, got {type(value).__name__}")
    return value


def _context_text(record: dict, where: str) -> str:
    """The judge's view of an image: the caption(s), then one ``category: bbox`` line per object when given."""
    caption = record.get("caption")
    if isinstance(caption, list) and all(isinstance(line, str) for line in caption):
        caption = "\n".join(caption)
    if not isinstance(caption, str):
        raise BenchError(f"{where}: 'caption' must be a string or a list of strings")
    instances = record.get("instances") or []
    if not isinstance(instances, list):
        raise BenchError(f"{where}: 'instances' must be a list of {{category, bbox}} objects")
    boxes = []
    for instance in instances:
        if not isinstance(instance, dict) or "category" not in instance or "bbox" not in instance:
            raise BenchError(f"{where}: each of 'instances' needs 'category' and 'bbox'")
        boxes.append(f"{instance['category']}: {json.dumps(instance['bbox'])}")
    return caption + ("\n\n" + "\n".join(boxes) if boxes else "")


def _load_rules(path: Path | None, categories: list[str]) -> dict[str, dict]:
    if path is None:
        return {category: dict(DEFAULT_RULE) for category in categories}
    try:
        table = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise BenchError(f"rule file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BenchError(f"cannot read the rule file {path}: {error}") from None
    if not isinstance(table, dict):
        raise BenchError(f"{path}: expected a JSON object of rules by category")
    rules = {}
    for category in categories:
        names = (f"llava_bench_{category}", category, "default")
        rule = next((table[name] for name in names if name in table), None)
        if rule is None:
            raise BenchError(f"{path} has no rule for category {category!r} (looked for the keys "
                             f"{', '.join(map(repr, names))})")
        if not isinstance(rule, dict) or not isinstance(rule.get("prompt"), str):
            raise BenchError(f"{path}: the rule for {category!r} must be an object with a 'prompt' string")
        rules[category] = {"role": str(rule.get("role") or "Assistant"), "prompt": rule["prompt"]}
    return rules


def load_bench(bench_dir: str | os.PathLike | None = None, *, questions=None, references=None, context=None,
               images=None, rules=None) -> LlavaBench:
    """Load a LLaVA-bench: the files of ``bench_dir`` by their usual names (`DEFAULT_FILES`), each replaceable by
    its own path. ``rules`` defaults to ``bench_dir/rule.json`` when it exists, else `DEFAULT_RULE` for every
    category. Checks what can be checked without the images: every line, unique question ids, a reference answer
    for each question, a context for each image, a rule for each category."""
    base = Path(bench_dir) if bench_dir is not None else None
    paths: dict[str, Path | None] = {}
    for part, given in (("questions", questions), ("references", references), ("context", context),
                        ("images", images), ("rules", rules)):
        if given is not None:
            paths[part] = Path(given)
        elif base is not None and (part != "rules" or (base / DEFAULT_FILES[part]).is_file()):
            paths[part] = base / DEFAULT_FILES[part]
        elif part == "rules":
            paths[part] = None
        else:
            raise BenchError(f"no {part} given: pass the bench folder or the {part} path")
    if base is not None and not base.is_dir():
        raise BenchError(f"bench folder {base} not found")
    if not paths["images"].is_dir():
        raise BenchError(f"image folder {paths['images']} not found")

    loaded, seen = [], {}
    for number, record in read_jsonl(paths["questions"]):
        where = f"{paths['questions']}:{number}"
        question = Question(_field(record, "question_id", where, (int, str)), _field(record, "image", where),
                            _field(record, "text", where), _field(record, "category", where), where)
        if question.key in seen:
            raise BenchError(f"{where}: question_id {question.question_id!r} is also on line {seen[question.key]}")
        seen[question.key] = number
        loaded.append(question)
    if not loaded:
        raise BenchError(f"{paths['questions']} holds no questions")

    answers: dict[str, str] = {}
    for number, record in read_jsonl(paths["references"]):
        where = f"{paths['references']}:{number}"
        key = str(_field(record, "question_id", where, (int, str)))
        answers[key] = _field(record, "text", where)
    contexts: dict[str, str] = {}
    for number, record in read_jsonl(paths["context"]):
        where = f"{paths['context']}:{number}"
        image = _field(record, "image", where)
        if image in contexts:
            raise BenchError(f"{where}: a second context for image {image!r}")
        contexts[image] = _context_text(record, where)
    for question in loaded:
        if question.key not in answers:
            raise BenchError(f"{paths['references']} has no reference answer for question {question.question_id!r} "
                             f"({question.where})")
        if question.image not in contexts:
            raise BenchError(f"{paths['context']} has no context for image {question.image!r} ({question.where})")
    categories = list(dict.fromkeys(question.category for question in loaded))
    return LlavaBench(loaded, answers, contexts, paths["images"], _load_rules(paths["rules"], categories),
                      files={part: str(path) if path is not None else "(built-in)" for part, path in paths.items()})


# ----------------------------------------------------------------------------------------------------------------
# The judge's prompt and its reply
# ----------------------------------------------------------------------------------------------------------------


def build_judge_messages(question: str, context: str, reference: str, answer: str, rule: dict) -> list[dict]:
    """The chat messages of one review: the system message, then the context, the question, the reference answer
    (``[<role> 1]``), the model's answer (``[<role> 2]``) and the rule (``[System]``), as in LLaVA's protocol."""
    role = rule.get("role") or "Assistant"
    content = (f"[Context]\n{context}\n\n"
               f"[Question]\n{question}\n\n"
               f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
               f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
               f"[System]\n{rule['prompt']}\n\n")
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": content}]


_SCORE_SEPARATORS = re.compile(r"[\s,]+")


def parse_scores(reply: str) -> tuple[float, float] | None:
    """The two scores on the first non-blank line of a judge's reply (separated by spaces or a comma, markdown
    bold allowed), each a number from 0 to 10; None when that line is anything else."""
    if not isinstance(reply, str):
        return None
    line = next((line for line in reply.splitlines() if line.strip()), "")
    tokens = [token for token in _SCORE_SEPARATORS.split(line.replace("*", "").strip()) if token]
    if len(tokens) != 2:
        return None
    try:
        scores = tuple(float(token) for token in tokens)
    except ValueError:
        return None
    if not all(math.isfinite(score) and 0 <= score <= 10 for score in scores):
        return None
    return scores


# ----------------------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoints
# ----------------------------------------------------------------------------------------------------------------


def chat_completions_url(base: str) -> str:
    """``base`` as the openai client takes it (``http://host:port/v1``), or the full ``.../chat/completions`` URL."""
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def _headers(api_key: str | None) -> dict:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _open(request: urllib.request.Request, timeout: float, url: str) -> bytes:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        try:
            detail = error.read().decode("utf-8", "replace")
            detail = json.loads(detail).get("error", {}).get("message", detail)
        except Exception:  # the body is only for the message
            detail = ""
        status = error.code
        retry_after = None
        try:
            retry_after = float(error.headers.get("Retry-After", ""))
        except (TypeError, ValueError):
            pass
        fatal = status in (401, 403, 404)
        hint = {401: " (check the API key)", 403: " (check the API key)",
                404: " (check the URL: the base as for the openai client, e.g. http://host:port/v1, and the model)"}
        raise EndpointError(f"HTTP {status} from {url}: {str(detail)[:200]}{hint.get(status, '')}", status,
                            retryable=status in (408, 409, 429) or status >= 500, fatal=fatal,
                            retry_after=retry_after) from None
    except (TimeoutError, socket.timeout):
        raise EndpointError(f"no reply from {url} within {timeout:g} s") from None
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise EndpointError(f"no reply from {url} within {timeout:g} s") from None
        raise EndpointError(f"cannot reach {url}: {reason}") from None


def post_chat_completion(url: str, payload: dict, api_key: str | None = None, timeout: float = 120.0) -> str:
    """POST a chat-completions request; returns the first choice's message text, or raises `EndpointError`."""
    url = chat_completions_url(url)
    request = urllib.request.Request(url, data=json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                                     headers=_headers(api_key), method="POST")
    body = _open(request, timeout, url)
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(f"the reply of {url} is not a chat completion: {body[:120]!r}") from None
    if not isinstance(content, str):
        raise EndpointError(f"the reply of {url} has no message text")
    return content


def list_models(base: str, api_key: str | None = None, timeout: float = 30.0) -> list[str]:
    """The model ids of an OpenAI-compatible endpoint (``GET {base}/models``)."""
    url = base.rstrip("/").removesuffix("/chat/completions") + "/models"
    body = _open(urllib.request.Request(url, headers=_headers(api_key)), timeout, url)
    try:
        return [model["id"] for model in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"the reply of {url} is not a model list: {body[:120]!r}", retryable=False) from None


def chat_endpoint_judge(url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                        temperature: float = JUDGE_TEMPERATURE, max_tokens: int = JUDGE_MAX_TOKENS
                        ) -> Callable[[list[dict]], str]:
    """A judge: messages in, the reply's text out, from an OpenAI-compatible endpoint with LLaVA's settings."""

    def judge(messages: list[dict]) -> str:
        return post_chat_completion(url, {"model": model, "messages": messages, "temperature": temperature,
                                          "max_tokens": max_tokens}, api_key, timeout)

    return judge


def chat_endpoint_answerer(url: str, model: str, api_key: str | None = None, timeout: float = 600.0,
                           max_tokens: int | None = None, extra: dict | None = None
                           ) -> Callable[[Question, Path], str]:
    """An answerer that asks an OpenAI-compatible VisCPM-Chat server (e.g. ``viscpm api``): the image as a base64
    ``data:`` URL, then the question. Without ``max_tokens`` or ``extra`` decoding fields, ``viscpm api`` answers
    with the folder's beam search, the answer `VisCPMChat.chat` gives."""

    def answer(question: Question, image: Path) -> str:
        mime = mimetypes.guess_type(image.name)[0] or "image/png"
        url_data = f"data:{mime};base64," + base64.b64encode(image.read_bytes()).decode("ascii")
        payload: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url_data}}, {"type": "text", "text": question.text}]}]}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        payload.update(extra or {})
        return post_chat_completion(url, payload, api_key, timeout)

    return answer


def local_chat_answerer(chat, **generation_overrides) -> Callable[[Question, Path], str]:
    """An answerer over a loaded `viscpm.VisCPMChat`: ``chat.chat(image, question)`` (the folder's beam search
    unless ``generation_overrides`` say otherwise), as plain text."""

    def answer(question: Question, image: Path) -> str:
        import PIL.Image

        try:
            with PIL.Image.open(image) as opened:
                picture = opened.convert("RGB")
        except (OSError, PIL.Image.DecompressionBombError) as error:
            raise BenchError(f"cannot read image {image} ({question.where}): {error}") from None
        response = chat.chat(picture, question.text, **generation_overrides)
        return chat.processor.tokenizer.unescape(response.answer)

    return answer


def _retrying(call: Callable[[], str], retries: int, retry_wait: float) -> str:
    """``call()``, tried ``1 + retries`` times while it fails with a retryable `EndpointError` (waiting
    ``retry_wait * 2**attempt`` seconds, or what Retry-After says, up to 60 s); the last error is raised."""
    for attempt in range(retries + 1):
        try:
            return call()
        except EndpointError as error:
            if error.fatal or not error.retryable or attempt == retries:
                raise
            wait = retry_wait * 2**attempt
            if error.retry_after is not None:
                wait = max(wait, error.retry_after)
            time.sleep(min(wait, 60.0))
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------------------------
# The cache: JSON lines, appended and flushed per record
# ----------------------------------------------------------------------------------------------------------------


def load_records(path: Path) -> dict[str, dict]:
    """The records of a cache file by question key (a later line replaces an earlier one). A last line cut short
    (the run was killed while writing it) is dropped and cut from the file, so that appending continues cleanly;
    a damaged line elsewhere is a `BenchError` naming ``file:line``."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        head, _, tail = data.rpartition(b"\n")
        try:
            json.loads(tail)
            data += b"\n"  # complete, only the newline is missing
            with open(path, "ab") as handle:
                handle.write(b"\n")
        except ValueError:
            data = head + b"\n" if head else b""
            with open(path, "r+b") as handle:
                handle.truncate(len(data))
    records: dict[str, dict] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = str(record["question_id"])
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"{path}:{number}: damaged cache line; fix or delete it (or the file) and run "
                             "again") from None
        records[key] = record
    return records


class _Appender:
    """Appends one JSON record per line and flushes it at once."""

    def __init__(self, path: Path):
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _bar(total: int, initial: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="q", disable=not progress, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------------
# Answering and judging
# ----------------------------------------------------------------------------------------------------------------


def write_answers(bench: LlavaBench, answerer: Callable[[Question, Path], str], path: Path, model_id: str,
                  skip: set[str] = frozenset(), retries: int = 2, retry_wait: float = 2.0,
                  max_consecutive_failures: int = 5, progress: bool = True) -> tuple[dict[str, dict], dict[str, str]]:
    """The model's answer to each question (those in ``skip`` aside), from the cache ``path`` or the
    ``answerer``; each new one is appended to ``path`` at once. Returns ``(answers by key, failures by key)``: a
    question whose answerer raised `EndpointError` (after ``retries``) is a failure, not cached, asked again by the
    next run; ``max_consecutive_failures`` of them in a row, or any other error, stop the run with the cache
    intact."""
    cached = load_records(path)
    for record in cached.values():
        if record.get("model_id") != model_id:
            raise BenchError(f"{path} holds answers of model {record.get('model_id')!r}, not {model_id!r}: use "
                             "another --output-dir for another model (or delete the file)")
    todo = [q for q in bench.questions if q.key not in skip and q.key not in cached]
    answers = {q.key: cached[q.key] for q in bench.questions if q.key in cached and q.key not in skip}
    failures: dict[str, str] = {}
    appender = _Appender(path)
    bar = _bar(len(todo) + len(answers), len(answers), "answering", progress)
    consecutive = 0
    try:
        for question in todo:
            try:
                text = _retrying(lambda: answerer(question, bench.image_path(question)), retries, retry_wait)
            except EndpointError as error:
                if error.fatal:
                    raise
                failures[question.key] = str(error)
                consecutive += 1
                if max_consecutive_failures and consecutive >= max_consecutive_failures:
                    raise EndpointError(f"the model failed {consecutive} questions in a row (last: {error}); check "
                                        "it and run again: the answers done are kept", fatal=True) from None
            else:
                consecutive = 0
                record = {"question_id": question.question_id, "prompt": question.text, "text": text,
                          "model_id": model_id, "category": question.category}
                appender.write(record)
                answers[question.key] = record
            bar.update(1)
    finally:
        bar.close()
        appender.close()
    return answers, failures


def judge_answers(bench: LlavaBench, answers: dict[str, dict], judge: Callable[[list[dict]], str], path: Path,
                  judge_model: str, concurrency: int = 4, retries: int = 2, retry_wait: float = 2.0,
                  max_consecutive_failures: int = 5, progress: bool = True) -> dict[str, dict]:
    """A review of each answer: from the cache ``path`` when it reviews the same answer by the same judge, else
    from ``judge`` (``concurrency`` requests at once), appended to ``path`` as it arrives. Returns the reviews by
    key; ``status`` is ``ok`` (``scores`` = [reference, model]), ``unparseable`` or ``failed`` (after ``retries``;
    the next run asks again). ``max_consecutive_failures`` failed questions in a row stop the run (with the cache
    intact): the judge is down or misconfigured, and waiting out every question would not help."""
    cached = load_records(path)
    for record in cached.values():
        if record.get("judge_model") != judge_model:
            raise BenchError(f"{path} holds reviews by judge {record.get('judge_model')!r}, not {judge_model!r}: "
                             "use another --output-dir for another judge (or delete the file)")
    reviews, todo = {}, []
    for question in bench.questions:
        answer = answers.get(question.key)
        if answer is None:
            continue
        old = cached.get(question.key)
        if old is not None and old.get("status") != "failed" and old.get("answer_sha") == _sha(answer["text"]):
            reviews[question.key] = old
        else:
            todo.append(question)

    def review(question: Question) -> dict:
        answer = answers[question.key]["text"]
        messages = build_judge_messages(question.text, bench.contexts[question.image],
                                        bench.references[question.key], answer, bench.rules[question.category])
        record = {"question_id": question.question_id, "category": question.category, "judge_model": judge_model,
                  "answer_sha": _sha(answer)}
        try:
            content = _retrying(lambda: judge(messages), retries, retry_wait)
        except EndpointError as error:
            if error.fatal:
                raise
            return {**record, "status": "failed", "error": str(error), "content": None, "scores": None}
        scores = parse_scores(content)
        return {**record, "status": "ok" if scores else "unparseable", "content": content,
                "scores": list(scores) if scores else None}

    appender = _Appender(path)
    bar = _bar(len(todo) + len(reviews), len(reviews), "judging", progress)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="judge")
    consecutive = 0
    try:
        futures = [pool.submit(review, question) for question in todo]
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            appender.write(record)
            reviews[str(record["question_id"])] = record
            bar.update(1)
            consecutive = consecutive + 1 if record["status"] == "failed" else 0
            if max_consecutive_failures and consecutive >= max_consecutive_failures:
                raise EndpointError(f"the judge failed {consecutive} questions in a row (last: {record['error']}); "
                                    "check it and run again: the reviews done are kept", fatal=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        appender.close()
    return reviews


# ----------------------------------------------------------------------------------------------------------------
# The results
# ----------------------------------------------------------------------------------------------------------------


def _row(statuses: list[str], scores: list[list[float]]) -> dict:
    reference = sum(pair[0] for pair in scores) / len(scores) if scores else None
    model = sum(pair[1] for pair in scores) / len(scores) if scores else None
    return {"n": len(statuses), "n_scored": len(scores), "n_unparseable": statuses.count("unparseable"),
            "n_failed": statuses.count("failed"), "n_skipped": statuses.count("skipped"),
            "reference_mean": reference, "model_mean": model,
            "relative_score": 100.0 * model / reference if scores and reference else None}


def summarize(bench: LlavaBench, reviews: dict[str, dict], skipped: set[str] = frozenset()) -> dict:
    """The results by category and ``all``: ``n`` questions, ``n_scored``, ``n_unparseable`` (reply without two
    scores), ``n_failed`` (no answer or no reply from the judge), ``n_skipped`` (image missing), the reference's and
    the model's mean scores over the scored questions (1-10) and ``relative_score`` = model / reference * 100; with
    the question ids of each kind of trouble."""
    statuses: dict[str, str] = {}
    for question in bench.questions:
        if question.key in skipped:
            statuses[question.key] = "skipped"
        else:
            statuses[question.key] = reviews.get(question.key, {}).get("status", "failed")
    categories = {}
    for category in [*bench.categories, "all"]:
        members = [q for q in bench.questions if category == "all" or q.category == category]
        pairs = [reviews[q.key]["scores"] for q in members if statuses[q.key] == "ok"]
        categories[category] = _row([statuses[q.key] for q in members], pairs)
    ids = {kind: [q.question_id for q in bench.questions if statuses[q.key] == kind]
           for kind in ("unparseable", "failed", "skipped")}
    return {"categories": categories, **{f"{kind}_question_ids": value for kind, value in ids.items()}}


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(summary: dict) -> str:
    """The results as a text table: one row per category, then ``all``."""
    header = ("category", "n", "scored", "unparseable", "failed", "skipped", "reference", "model", "relative")
    rows = [header]
    for category, row in summary["categories"].items():
        rows.append((category, str(row["n"]), str(row["n_scored"]), str(row["n_unparseable"]), str(row["n_failed"]),
                     str(row["n_skipped"]), _number(row["reference_mean"], 2), _number(row["model_mean"], 2),
                     _number(row["relative_score"], 1)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)


def check_images(bench: LlavaBench, skip_missing: bool = False) -> set[str]:
    """The keys of the questions whose image is missing, to skip; without ``skip_missing``, any missing image is a
    `BenchError` naming it (and its question's ``file:line``)."""
    missing = bench.missing_images()
    if missing and not skip_missing:
        names = ", ".join(f"{bench.image_path(q)} ({q.where})" for q in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BenchError(f"image not found: {names}{more}; add the image(s), or pass --skip-missing-images to count "
                         "those questions as skipped")
    return {q.key for q in missing}


def run_llava_bench(bench: LlavaBench, output_dir: str | os.PathLike, answerer: Callable[[Question, Path], str],
                    model_id: str, judge: Callable[[list[dict]], str], judge_model: str,
                    skip_missing_images: bool = False, concurrency: int = 4, retries: int = 2,
                    retry_wait: float = 2.0, max_consecutive_failures: int = 5, progress: bool = True,
                    extra_results: dict | None = None) -> dict:
    """Answer, judge and summarize, resuming from ``output_dir``'s cache; writes ``results.json`` there and
    returns it. A missing image is a `BenchError` naming it, or, with ``skip_missing_images``, a skipped question
    (counted in ``n_skipped``)."""
    output_dir = Path(output_dir)
    skipped = check_images(bench, skip_missing_images)
    output_dir.mkdir(parents=True, exist_ok=True)
    answers, answer_failures = write_answers(bench, answerer, output_dir / ANSWERS_FILE, model_id, skipped, retries,
                                             retry_wait, max_consecutive_failures, progress)
    reviews = judge_answers(bench, answers, judge, output_dir / REVIEWS_FILE, judge_model, concurrency, retries,
                            retry_wait, max_consecutive_failures, progress)
    for key, error in answer_failures.items():
        reviews[key] = {"status": "failed", "error": f"no answer: {error}"}
    summary = summarize(bench, reviews, skipped)
    results = {"benchmark": "llava-bench", "model": model_id, "judge": judge_model, "score_scale": "1-10",
               "files": bench.files, **(extra_results or {}), **summary}
    temp = output_dir / f".{RESULTS_FILE}.tmp{os.getpid()}"
    temp.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, output_dir / RESULTS_FILE)
    return results
