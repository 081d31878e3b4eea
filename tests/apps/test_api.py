"""`viscpm api`: the OpenAI-compatible server, driven by the real `openai` client.

One server per module (the real command, `python -m viscpm.apps.cli api ...`, in a subprocess on 127.0.0.1 with a
free port, tiny random models); what it answers is compared with `VisCPMChat.chat` / the Paint pipeline called
in-process on the same folders. The last test stops the server with SIGTERM in the middle of a streamed answer.
"""

import base64
import concurrent.futures
import http.server
import io
import json
import math
import signal
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import openai
import PIL.Image
import pytest
import torch
from live_server import free_port, log_text, start, stop

from viscpm.apps.api import ApiError, ApiLimits, Batcher, _ChatJob, check_image_header, image_bytes
from viscpm.apps.cli import main
from viscpm.apps.common import decoding_options, load_chat, load_paint, paint_images
from viscpm.apps.demo import build_tiny_models

KEY = "test-key-123"
TOKENS = 6  # max_tokens of most requests
LIMITS = ["--max-tokens", "64", "--max-prompt-tokens", "200", "--max-image-pixels", "250000", "--max-image-mb", "1",
          "--max-body-mb", "2", "--max-batch-size", "8", "--batch-wait-ms", "100"]
GREEDY = dict(decoding_options("greedy"))
ERROR_KEYS = {"message", "type", "param", "code"}


def _png(seed: int, size=(48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _user(question: str, *images: bytes | str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image if isinstance(image, str) else _url(image)}}
             for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory, vocab_file):
    root = tmp_path_factory.mktemp("api")
    chat_dir, paint_dir = build_tiny_models(root / "models", vocab_file, seed=5)
    port = free_port()
    process = start(["api", str(chat_dir), "--paint", str(paint_dir), "--port", str(port), "--device", "cpu",
                     "--allow-local-images", *LIMITS],
                    f"http://127.0.0.1:{port}/health", root / "server.log", root, env={"VISCPM_API_KEY": KEY})
    try:
        yield {"base": f"http://127.0.0.1:{port}", "root": root, "chat_dir": chat_dir, "paint_dir": paint_dir,
               "process": process, "chat": chat_dir.name, "paint": paint_dir.name}
    finally:
        stop(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def library_chat(server):
    return load_chat(str(server["chat_dir"]), device="cpu")


def _health(server) -> dict:
    return httpx.get(server["base"] + "/health", timeout=10).json()


def _answer(library_chat, image, question, **options):
    """What `VisCPMChat.chat` answers, as plain text (the API returns plain text)."""
    response = library_chat.chat(image, question, **{"max_new_tokens": TOKENS, **options})
    return library_chat.processor.tokenizer.unescape(response.answer), response


def test_models_health_and_keys(server, client):
    assert httpx.get(server["base"] + "/health", timeout=10).status_code == 200  # no key needed
    assert [model.id for model in client.models.list()] == [server["chat"], server["paint"]]
    assert client.models.retrieve(server["chat"]).id == server["chat"]
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(server["base"] + "/v1/models", headers=headers, timeout=10)
        assert response.status_code == 401
        assert set(response.json()["error"]) == ERROR_KEYS
        assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=server["chat"], messages=[_user("hi", _png(1))])
    assert caught.value.status_code == 401 and "incorrect API key" in caught.value.message


def test_chat_answer_equals_chat(server, client, library_chat):
    image, question = _png(1), "What is <this>?"
    expected, _ = _answer(library_chat, image, question)
    reply = client.chat.completions.create(model=server["chat"], messages=[_user(question, image)],
                                           max_tokens=TOKENS)
    assert reply.object == "chat.completion" and reply.model == server["chat"]
    assert reply.choices[0].message.content == expected and expected.strip()
    assert reply.choices[0].message.role == "assistant"
    usage = reply.usage
    prompt = library_chat.processor(text=question, return_tensors="pt")
    assert usage.prompt_tokens == prompt["input_ids"].shape[1]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens > 0
    # The same image from a path on the server's disk (allowed on this server), beam search asked for by name.
    path = server["root"] / "picture.png"
    path.write_bytes(image)
    same = client.chat.completions.create(model=server["chat"], messages=[_user(question, str(path))],
                                          max_tokens=TOKENS, extra_body={"decoding": "beam"})
    assert same.choices[0].message.content == expected


def test_streamed_greedy_equals_non_streamed(server, client, library_chat):
    image, question = _png(2), "Describe the picture."
    expected, _ = _answer(library_chat, image, question, **GREEDY)
    whole = client.chat.completions.create(model=server["chat"], messages=[_user(question, image)],
                                           max_tokens=TOKENS, temperature=0)
    assert whole.choices[0].message.content == expected
    stream = client.chat.completions.create(model=server["chat"], messages=[_user(question, image)],
                                            max_tokens=TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # token by token
    assert "".join(pieces) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()

    # The original beam search (the default) streams its answer as one chunk when it is complete.
    beam, _ = _answer(library_chat, image, question)
    stream = client.chat.completions.create(model=server["chat"], messages=[_user(question, image)],
                                            max_tokens=TOKENS, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices[0].delta.content]
    assert pieces == [beam]


def test_second_turn_uses_the_history_and_the_cached_image(server, client, library_chat):
    image = _png(3)
    first_expected, first = _answer(library_chat, image, "图里是什么？")
    reply = client.chat.completions.create(model=server["chat"], messages=[_user("图里是什么？", image)],
                                           max_tokens=TOKENS)
    assert reply.choices[0].message.content == first_expected
    encoded = _health(server)["images_encoded"]
    second_expected, _ = _answer(library_chat, None, "Are you sure?", context=first.context,
                                 vision_hidden_states=first.vision_hidden_states)
    messages = [_user("图里是什么？", image), {"role": "assistant", "content": first_expected},
                {"role": "user", "content": "Are you sure?"}]
    reply = client.chat.completions.create(model=server["chat"], messages=messages, max_tokens=TOKENS)
    assert reply.choices[0].message.content == second_expected
    assert _health(server)["images_encoded"] == encoded  # the image's features came from the cache


def test_sampling_with_a_seed_and_n(server, client, library_chat):
    image, question = _png(4), "What colours?"
    kwargs = dict(model=server["chat"], messages=[_user(question, image)], max_tokens=TOKENS, temperature=0.9,
                  seed=7, n=2)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    answers = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1]
    assert answers == [choice.message.content for choice in again.choices]
    torch.manual_seed(7)
    expected = library_chat.batch_chat([image, image], [question, question],
                                       **decoding_options("sample", temperature=0.9, max_new_tokens=TOKENS))
    assert answers == [library_chat.processor.tokenizer.unescape(r.answer) for r in expected]


def test_stop_strings(server, client, library_chat):
    image, question = _png(2), "Describe the picture."
    full, _ = _answer(library_chat, image, question, **GREEDY)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[:full.find(stop)]
    kwargs = dict(model=server["chat"], messages=[_user(question, image)], max_tokens=TOKENS, temperature=0,
                  stop=[stop, "never there"])
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_image_generation(server, client):
    result = client.images.generate(model=server["paint"], prompt="一只猫", n=1, size="64x64",
                                    response_format="b64_json",
                                    extra_body={"negative_prompt": "模糊", "steps": 3, "seed": 11})
    assert len(result.data) == 1
    got = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"),
                     dtype=np.int16)
    pipe = load_paint(str(server["paint_dir"]), device="cpu", progress=False)
    expected, _ = paint_images(pipe, "一只猫", "模糊", steps=3, seed=11, size=64)
    assert got.shape == (64, 64, 3)
    assert np.abs(got - np.asarray(expected[0], dtype=np.int16)).max() <= 1
    two = client.images.generate(model=server["paint"], prompt="a dog", n=2, size="64x64",
                                 extra_body={"steps": 2, "seed": 1})
    assert len(two.data) == 2 and all(item.b64_json for item in two.data)


def _bad_requests(server) -> list:
    """(name, request, status, code or None, text in the message); request: create() kwargs or a raw httpx call."""
    good = [_user("What is it?", _png(5))]
    chat = server["chat"]
    huge = io.BytesIO()
    PIL.Image.new("RGB", (600, 600), "white").save(huge, format="PNG")
    return [
        ("no image", dict(messages=[{"role": "user", "content": "What is it?"}]), 400, "missing_image", "no image"),
        ("two images", dict(messages=[_user("Which?", _png(5), _png(6))]), 400, None, "one image per conversation"),
        ("broken base64", dict(messages=[_user("What?", "data:image/png;base64,iVBOR%%%")]), 400, "invalid_base64",
         "not valid base64"),
        ("not base64 at all", dict(messages=[_user("What?", "data:image/png,rawbytes")]), 400, "invalid_image_url",
         "must be base64"),
        ("a text file as image", dict(messages=[_user("What?", _url(b"just some text\n" * 20, "text/plain"))]), 400,
         "invalid_image_format", "not an image file"),
        ("too many pixels", dict(messages=[_user("What?", huge.getvalue())]), 413, "image_too_large",
         "600x600 = 360000 pixels, over the limit of 250000"),
        ("too many bytes", dict(messages=[_user("What?", _url(bytes(1_200_000)))]), 413, "image_too_large",
         "over the limit of 1048576"),
        ("remote URL, not allowed", dict(messages=[_user("What?", "http://127.0.0.1:9/x.png")]), 400,
         "invalid_image_url", "--allow-remote-images"),
        ("unknown model", dict(model="gpt-4o"), 404, "model_not_found", "does not exist"),
        ("paint model for chat", dict(model=server["paint"]), 422, "wrong_model_kind", "/v1/images/generations"),
        ("negative max_tokens", dict(max_tokens=-5), 400, "invalid_value", "max_tokens must be between 1 and 64"),
        ("max_tokens over the limit", dict(max_completion_tokens=65), 400, "invalid_value", "between 1 and 64"),
        ("n too large", dict(n=50), 400, "invalid_value", "n must be between 1 and 8"),
        ("temperature too high", dict(temperature=3.0), 400, "invalid_value", "temperature"),
        ("top_p above 1", dict(temperature=0.9, top_p=2.0), 400, "invalid_value", "top_p"),
        ("top_p zero", dict(temperature=0.9, top_p=0.0), 400, "invalid_value", "top_p must be above 0"),
        ("negative top_k", dict(temperature=0.9, extra_body={"top_k": -1}), 400, "invalid_value", "top_k"),
        ("temperature NaN", lambda http: http.post(  # the OpenAI client refuses to send NaN; JSON parsers accept it
            "/v1/chat/completions", content=json.dumps({"model": chat, "messages": good, "temperature": math.nan}),
            headers={"Content-Type": "application/json"}), 400, "invalid_value", "temperature"),
        ("greedy with beams", dict(extra_body={"decoding": "greedy", "num_beams": 2}), 400, None, "one beam"),
        ("system message", dict(messages=[{"role": "system", "content": "Be brief."}, *good]), 400, None,
         "no system prompt"),
        ("ends with the assistant", dict(messages=[*good, {"role": "assistant", "content": "It is"}]), 400, None,
         "end with a user message"),
        ("tools", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400,
         "unsupported_parameter", "tool calls"),
        ("unknown argument", dict(extra_body={"temprature": 0.5}), 400, "unknown_parameter", "temprature"),
        ("content of a wrong type", dict(messages=[{"role": "user", "content": 5}]), 400, "invalid_value",
         "must be a string or a list of parts"),
        ("an audio part", dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
         400, "invalid_value", "'text' or 'image_url'"),
        ("prompt too long", dict(messages=[_user("word " * 400, _png(5))]), 400, "context_length_exceeded",
         "over the limit of 200"),
        ("malformed JSON", lambda http: http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                                                  headers={"Content-Type": "application/json"}),
         400, "invalid_json", "not valid JSON"),
        ("body too large", lambda http: http.post("/v1/chat/completions", content=b" " * (2 * 2**20 + 10)), 413,
         "request_too_large", "over the limit"),
        ("missing messages", lambda http: http.post("/v1/chat/completions", json={"model": chat}), 400,
         "missing_required_parameter", "messages"),
        ("unknown path", lambda http: http.get("/v1/completions"), 404, "unknown_url", "/v1/chat/completions"),
        ("wrong method", lambda http: http.get("/v1/chat/completions"), 405, "method_not_allowed", "GET"),
        ("paint: bad size", lambda http: http.post("/v1/images/generations", json={"prompt": "a cat",
                                                                                      "size": "64x32"}),
         400, None, "square"),
        ("paint: url format", lambda http: http.post("/v1/images/generations", json={"prompt": "a cat",
                                                                                        "response_format": "url"}),
         400, "unsupported_parameter", "b64_json"),
        ("paint: empty prompt", lambda http: http.post("/v1/images/generations", json={"prompt": "  "}), 400, None,
         "prompt is empty"),
    ]


def _call(server, client, request):
    """The (status, error JSON) of a request that must fail."""
    if callable(request):
        with httpx.Client(base_url=server["base"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            response = request(http)
        return response.status_code, response.json()
    kwargs = {"model": server["chat"], "messages": [_user("What is it?", _png(5))], "max_tokens": TOKENS, **request}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**kwargs)
    return caught.value.status_code, caught.value.response.json()


def test_bad_requests_are_clear_errors_and_the_server_keeps_answering(server, client, library_chat):
    problems = []
    for name, request, status, code, text in _bad_requests(server):
        got_status, body = _call(server, client, request)
        error = body.get("error", {})
        if got_status != status or set(error) != ERROR_KEYS or text not in error["message"] or (
                code is not None and error["code"] != code):
            problems.append(f"{name}: {got_status} {body}")
    assert problems == []
    expected, _ = _answer(library_chat, _png(5), "What is it?")
    reply = client.chat.completions.create(model=server["chat"], messages=[_user("What is it?", _png(5))],
                                           max_tokens=TOKENS)
    assert reply.choices[0].message.content == expected


def test_concurrent_clients_get_their_own_answers(server, client, library_chat):
    """16 clients at once, different images and questions (three quarters beam search, a quarter greedy), and
    bad requests among them: every answer is the one the request gets alone, and batches did form."""
    questions = ["这是什么？", "What is in the picture?", "Describe it.", "图里有几种颜色？"]
    requests = [(_png(100 + i, size=(32 + 4 * i, 48)), questions[i % 4], GREEDY if i % 4 == 3 else {})
                for i in range(16)]
    expected = [_answer(library_chat, image, question, **options)[0] for image, question, options in requests]
    bad = [dict(messages=[_user("?", "data:image/png;base64,@@@")]), dict(messages=[_user("?", _png(1), _png(2))]),
           dict(messages=[{"role": "user", "content": "no image"}])]

    def ask(index):
        if index >= 16:
            return _call(server, client, bad[index - 16])[0]
        image, question, options = requests[index]
        extra = {"temperature": 0} if options else {}
        reply = client.chat.completions.create(model=server["chat"], messages=[_user(question, image)],
                                               max_tokens=TOKENS, **extra)
        return reply.choices[0].message.content

    before = _health(server)["batches"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=19) as pool:
        answers = list(pool.map(ask, range(19)))
    assert answers[:16] == expected
    assert answers[16:] == [400, 400, 400]
    health = _health(server)
    assert health["largest_batch"] > 1 and health["batches"] - before < 16


def test_a_client_that_disconnects_mid_stream_frees_its_place(server, client, library_chat):
    before = _health(server)["cancelled"]
    stream = client.chat.completions.create(model=server["chat"], messages=[_user("Tell me a long story.", _png(7))],
                                            max_tokens=64, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while _health(server)["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.2)
    health = _health(server)
    assert health["cancelled"] == before + 1
    deadline = time.monotonic() + 60
    while _health(server)["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in log_text(server["process"]).splitlines() if "was cancelled" in line]
    tokens = int(lines[-1].split(" after ")[1].split()[0])
    _, full = _answer(library_chat, _png(7), "Tell me a long story.", **{**GREEDY, "max_new_tokens": 64})
    assert tokens < len(library_chat.processor.tokenizer.tokenize(full.answer))  # it stopped early
    expected, _ = _answer(library_chat, _png(7), "Still there?")
    reply = client.chat.completions.create(model=server["chat"], messages=[_user("Still there?", _png(7))],
                                           max_tokens=TOKENS)
    assert reply.choices[0].message.content == expected


# ----------------------------------------------------------------------------------------------------------------
# In-process parts: image URLs and the batch fallback
# ----------------------------------------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the pixel data is a tiny image's)."""
    data = bytearray(_png(1, size=(4, 4)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_image_urls_and_bombs(tmp_path):
    limits = ApiLimits(max_image_bytes=10_000, max_image_pixels=1_000_000)
    image = _png(3)
    assert image_bytes(_url(image), limits) == image
    path = tmp_path / "x.png"
    path.write_bytes(image)
    for url in (str(path), f"file://{path}"):
        with pytest.raises(ApiError, match="--allow-local-images"):
            image_bytes(url, limits)
        assert image_bytes(url, limits, allow_local=True) == image
    with pytest.raises(ApiError, match="not found"):
        image_bytes(str(tmp_path / "missing.png"), limits, allow_local=True)
    (tmp_path / "big.png").write_bytes(bytes(20_000))
    with pytest.raises(ApiError, match="over the limit of 10000") as caught:
        image_bytes(str(tmp_path / "big.png"), limits, allow_local=True)
    assert caught.value.status == 413

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(ApiError, match="--allow-remote-images"):
            image_bytes(f"{base}/x.png", limits)
        assert image_bytes(f"{base}/x.png", limits, allow_remote=True) == image
        with pytest.raises(ApiError, match=r"x2.png: HTTP 404"):
            image_bytes(f"{base}/x2.png", limits, allow_remote=True)
        with pytest.raises(ApiError, match="over the limit") as caught:
            image_bytes(f"{base}/big.png", limits, allow_remote=True)
        assert caught.value.status == 413
    finally:
        httpd.shutdown()

    check_image_header(image, limits)
    for width, height, text in ((2000, 1000, "2000x1000 = 2000000 pixels"),
                                (100_000, 100_000, "decompression-bomb")):
        with pytest.raises(ApiError, match=text) as caught:
            check_image_header(_png_header(width, height), limits)
        assert caught.value.status == 413
    with pytest.raises(ApiError, match="not an image file"):
        check_image_header(b"GIF89a-not-really", limits)


class _FakeTokenizer:
    unescape = escape = staticmethod(lambda text: text)
    tokenize = staticmethod(lambda text: text.split())


class _FakeChat:
    """`batch_chat` that fails any batch holding the question "bad" (a ValueError) or "crash" (a RuntimeError)."""

    def __init__(self):
        self.processor = type("Processor", (), {"tokenizer": _FakeTokenizer()})()
        self.calls = []

    def batch_chat(self, images, questions, contexts, vision_hidden_states=None, **options):
        self.calls.append(list(questions))
        if "bad" in questions:
            raise ValueError("this question breaks the model")
        if "crash" in questions:
            raise RuntimeError("out of memory")
        return [type("Response", (), {"answer": f"answer to {q}"})() for q in questions]


def test_one_bad_request_fails_alone_in_its_batch():
    chat = _FakeChat()
    batcher = Batcher(chat, max_batch_size=8, batch_wait_ms=500)
    events = {}
    done = threading.Event()

    def job(question):
        events[question] = []

        def emit(event):
            events[question].append(event)
            if sum(1 for log in events.values() if log) == 4:
                done.set()

        return _ChatJob(emit=emit, key="same", question=question, states=torch.zeros(1, 1, 1),
                        options={"max_new_tokens": 4}, max_tokens=4)

    for question in ("first", "bad", "third", "crash"):
        batcher.submit(job(question))
    batcher.start()
    assert done.wait(30)
    batcher.stop(10)
    assert chat.calls == [["first", "bad", "third", "crash"], ["first"], ["bad"], ["third"], ["crash"]]
    for question in ("first", "third"):  # the whole answer as one piece of text, then the result
        assert events[question] == [("text", 0, f"answer to {question}"),
                                    ("done", [(f"answer to {question}", 3, "stop")])]
    (kind, error), = events["bad"]  # the request's values: 400
    assert kind == "error" and error.status == 400 and "breaks the model" in error.message
    (kind, error), = events["crash"]  # the server's: 500, saying what happened
    assert kind == "error" and error.status == 500
    assert error.message == "generation failed: RuntimeError: out of memory"
    assert set(error.json()["error"]) == ERROR_KEYS
    with pytest.raises(ApiError, match="shutting down") as caught:
        batcher.submit(job("late"))
    assert caught.value.status == 503
    full = Batcher(chat, limits=ApiLimits(max_queue=1))
    full.submit(job("queued"))
    with pytest.raises(ApiError, match="busy") as caught:
        full.submit(job("one too many"))
    assert caught.value.status == 503 and caught.value.code == "server_busy"


# ----------------------------------------------------------------------------------------------------------------
# The command line, and SIGTERM (last: it stops the module's server)
# ----------------------------------------------------------------------------------------------------------------


def test_api_usage_errors(server, capsys):
    assert main(["api", "--help"]) == 0
    assert "--max-batch-size" in capsys.readouterr().out
    assert main(["api", str(server["chat_dir"]), "--port", "70000"]) == 2
    assert "at most 65535" in capsys.readouterr().err
    assert main(["api", str(server["chat_dir"]), "--batch-wait-ms", "-1"]) == 2
    assert "at least 0 and at most 60000" in capsys.readouterr().err
    assert main(["api", str(server["root"] / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing not found" in err
    assert main(["api", str(server["chat_dir"]), "--paint", str(server["chat_dir"])]) == 1
    assert "not a VisCPM-Paint pipeline" in capsys.readouterr().err
    port = int(server["base"].rsplit(":", 1)[1])  # the module's server holds it
    assert main(["api", str(server["chat_dir"]), "--port", str(port)]) == 1
    assert "port is in use" in capsys.readouterr().err
    assert main(["api", str(server["chat_dir"]), "--host", "999.1.1.1", "--port", str(free_port())]) == 1
    assert "not a valid address" in capsys.readouterr().err


def test_sigterm_finishes_the_answer_in_flight_then_exits(server, client, library_chat):
    image, question = _png(8), "Tell me everything."
    expected, _ = _answer(library_chat, image, question, **{**GREEDY, "max_new_tokens": 24})
    stream = client.chat.completions.create(model=server["chat"], messages=[_user(question, image)], max_tokens=24,
                                            temperature=0, stream=True)
    pieces = []
    for chunk in stream:
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            break
    server["process"].send_signal(signal.SIGTERM)
    finish = None
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == expected and finish is not None
    assert server["process"].wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server["base"] + "/health", timeout=5)
    assert "Finished server process" in log_text(server["process"])
