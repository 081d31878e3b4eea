"""`viscpm serve`: the gradio app on 127.0.0.1 with tiny models, driven through its HTTP API (`gradio_client`) and
in headless Chromium (Debian's `chromium`, driven by Playwright); the browser's screenshot is kept under `build/`.

The server is the real command (the `viscpm serve` console script) in a subprocess; what it answers is compared with
`VisCPMChat.chat` / the pipeline called in-process on the same folders. The last test stops it with Ctrl-C.
"""

import re
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from live_server import free_port, start, stop
from terminal import messages

from viscpm.apps.cli import main
from viscpm.apps.common import decoding_options, load_chat, load_paint, paint_images
from viscpm.apps.demo import build_tiny_models

TOKENS = 6
QUESTION_ZH = "这张图片里有什么？"
FOLLOW_UP_ZH = "为什么？"
BUILD = Path(__file__).resolve().parents[2] / "build"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, vocab_file):
    root = tmp_path_factory.mktemp("web")
    chat_dir, paint_dir = build_tiny_models(root / "models", vocab_file, seed=5)
    image = root / "picture.png"
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(image)
    other = root / "other.png"
    PIL.Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 56, 3), dtype=np.uint8)).save(other)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = start(["serve", str(chat_dir), str(paint_dir), "--port", str(port), "--max-new-tokens", str(TOKENS),
                     "--device", "cpu"], url, root / "server.out", root, stderr_path=root / "server.err")
    try:
        yield {"url": url, "root": root, "chat_dir": chat_dir, "paint_dir": paint_dir, "image": image, "other": other,
               "process": process, "stderr": root / "server.err"}
    finally:
        stop(process)


@pytest.fixture(scope="module")
def library_chat(server):
    return load_chat(str(server["chat_dir"]), device="cpu")


def _image(path):
    return PIL.Image.open(path).convert("RGB")


def _text(message):
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def test_api_chat_turns_and_paint(server, library_chat):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    assert {"/chat", "/paint"} <= set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    image = _image(server["image"])
    unescape = library_chat.processor.tokenizer.unescape

    history, question = client.predict(handle_file(str(server["image"])), "What is <this>?", [], "greedy (streamed)",
                                       api_name="/chat")
    first = library_chat.chat(image, "What is <this>?", **decoding_options("greedy", max_new_tokens=TOKENS))
    assert question == ""
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert _text(history[1]) == unescape(first.answer) and _text(history[1]).strip()

    # Second turn, the original beam search: the server kept the history and the image features.
    history, _ = client.predict(handle_file(str(server["image"])), "再说一遍", history, "beam search (original)",
                                api_name="/chat")
    second = library_chat.chat(image, "再说一遍", context=first.context, max_new_tokens=TOKENS)
    assert len(history) == 4 and _text(history[3]) == unescape(second.answer)

    with pytest.raises(Exception, match="type a question"):
        client.predict(handle_file(str(server["image"])), "  ", [], "greedy (streamed)", api_name="/chat")

    pictures = client.predict("一只猫", "模糊", 11, 3, api_name="/paint")
    assert len(pictures) == 1 and pictures[0]["caption"] == "一只猫"
    pipe = load_paint(str(server["paint_dir"]), device="cpu", progress=False)
    expected, _ = paint_images(pipe, "一只猫", "模糊", steps=3, seed=11)
    got = np.asarray(_image(pictures[0]["image"]), dtype=np.int16)
    assert got.shape == (64, 64, 3)
    assert np.abs(got - np.asarray(expected[0], dtype=np.int16)).max() <= 1
    more = client.predict("a dog", "", 12, 2, api_name="/paint")
    assert len(more) == 2  # the gallery keeps the session's pictures, newest first
    assert more[1]["caption"] == "一只猫"


def _cjk_fonts() -> str:
    result = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True)
    return result.stdout.strip()


def test_browser_upload_ask_and_see_the_answer(server, library_chat):
    """Upload, ask in Chinese, read the answer on the page, ask again: the second answer is the library's with the
    first turn as its history (the page's conversation goes back to the server exactly). The screenshot
    (build/web-chat.png) shows the Chinese questions and answers, which needs a CJK font (Debian's
    fonts-noto-cjk, installed by `bash .ci/run`)."""
    from playwright.sync_api import expect, sync_playwright

    assert _cjk_fonts(), "no CJK font: the screenshot would show boxes; apt-get install fonts-noto-cjk"
    image, unescape = _image(server["image"]), library_chat.processor.tokenizer.unescape
    first = library_chat.chat(image, QUESTION_ZH, max_new_tokens=TOKENS)
    second = library_chat.chat(image, FOLLOW_UP_ZH, context=first.context, max_new_tokens=TOKENS)
    expected = [unescape(first.answer).strip(), unescape(second.answer).strip()]
    assert re.search("[\u4e00-\u9fff]", expected[0]), expected  # the answer has Chinese to show
    alone = unescape(library_chat.chat(image, FOLLOW_UP_ZH, max_new_tokens=TOKENS).answer).strip()
    assert alone != expected[1]  # so the second answer shows that the first turn was its history
    BUILD.mkdir(exist_ok=True)
    screenshot = BUILD / "web-chat.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server["url"])
            page.locator("#chat-image input[type=file]").set_input_files(str(server["image"]))
            expect(page.locator("#chat-image img").first).to_be_visible(timeout=30_000)
            chatbot = page.locator("#chatbot")
            for question, answer in zip((QUESTION_ZH, FOLLOW_UP_ZH), expected):
                page.locator("#question textarea").fill(question)
                page.locator("#send").click()
                expect(chatbot).to_contain_text(question, timeout=30_000)
                expect(chatbot).to_contain_text(answer, timeout=60_000)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0


def test_serve_usage_and_missing_model(server, capsys):
    assert main(["serve", str(server["chat_dir"])]) == 2
    assert "MODEL_PAINT" in capsys.readouterr().err
    assert main(["serve", str(server["chat_dir"]), str(server["paint_dir"]), "--port", "70000"]) == 2
    assert "at most 65535" in capsys.readouterr().err
    assert main(["serve", str(server["chat_dir"]), str(server["root"] / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing not found" in err and "Traceback" not in err
    assert main(["serve", "--help"]) == 0
    assert "MODEL_CHAT" in capsys.readouterr().out


CONVERSATIONS = [  # (image, decoding, first question, second question): two about each image
    ("image", "greedy (streamed)", "What is this?", "再说一遍"),
    ("other", "greedy (streamed)", "What is this?", "Why?"),
    ("image", "beam search (original)", "这是什么？", "Why?"),
    ("other", "beam search (original)", "Colours?", "再说一遍"),
]


def _expected(library_chat, server):
    """Each conversation's two answers, asked one request at a time of the library."""
    unescape = library_chat.processor.tokenizer.unescape
    expected = []
    for image, decoding, first, second in CONVERSATIONS:
        options = decoding_options("greedy" if decoding.startswith("greedy") else "beam", max_new_tokens=TOKENS)
        one = library_chat.chat(_image(server[image]), first, **options)
        two = library_chat.chat(_image(server[image]), second, context=one.context, **options)
        expected.append([unescape(one.answer), unescape(two.answer)])
    return expected


def _answers(history):
    return [_text(message) for message in history if message["role"] == "assistant"]


def test_concurrent_requests_and_sessions_never_mix(server, library_chat):
    """Four two-turn conversations at once: all from one client (one session), then each from its own client;
    every answer is the one the library gives for that conversation alone."""
    from gradio_client import Client, handle_file

    expected = _expected(library_chat, server)
    assert len({answer for pair in expected for answer in pair}) > 4  # the conversations differ

    def ask(client, index, history):
        image, decoding, first, second = CONVERSATIONS[index]
        return client.submit(handle_file(str(server[image])), second if history else first, history, decoding,
                             api_name="/chat")

    shared = Client(server["url"], verbose=False)
    firsts = [job.result()[0] for job in [ask(shared, i, []) for i in range(len(CONVERSATIONS))]]
    seconds = [job.result()[0] for job in [ask(shared, i, firsts[i]) for i in range(len(CONVERSATIONS))]]
    assert [_answers(history) for history in seconds] == expected

    def conversation(index):
        client = Client(server["url"], verbose=False)
        history = ask(client, index, []).result()[0]
        return _answers(ask(client, index, history).result()[0])

    with ThreadPoolExecutor(max_workers=len(CONVERSATIONS)) as pool:
        assert list(pool.map(conversation, range(len(CONVERSATIONS)))) == expected


def _text_message(role, text):
    return {"role": role, "content": [{"type": "text", "text": text}]}


WEB_ERRORS = [  # (endpoint, arguments: "IMAGE" is an image file, what the error says)
    ("/chat", [None, "q", [], "greedy (streamed)"], "upload an image first"),
    ("/chat", ["IMAGE", " \n", [], "greedy (streamed)"], "type a question about the image"),
    ("/chat", ["IMAGE", "q", [], "nonsense"], "nonsense"),
    ("/chat", ["IMAGE", "q", [_text_message("system", "be brief")], "greedy (streamed)"], "no system prompt"),
    ("/chat", ["IMAGE", "q", [_text_message("assistant", "hi")], "greedy (streamed)"], "expected 'user'"),
    ("/chat", ["IMAGE", "a " * 4000, [], "greedy (streamed)"], "over max_prompt_length=3000"),
    ("/chat", ["IMAGE", "q", [_text_message("user", "a " * 4000), _text_message("assistant", "b")],
               "beam search (original)"], "over max_prompt_length=3000"),
    ("/paint", ["a cat", "", -1, 3], "the seed must be a whole number at least 0"),
    ("/paint", ["a cat", "", 2**70, 3], "the seed must be a whole number at least 0 and at most 9223372036854775807"),
    ("/paint", ["a cat", "", 1, 0], "Value 0 is less than minimum value 1"),  # gradio's own check of the slider
    ("/paint", ["a cat", "", 1, 2.5], "the number of steps must be a whole number"),
    ("/paint", ["", "", 1, 3], "the prompt is empty"),
]


@pytest.mark.parametrize("endpoint, arguments, message", WEB_ERRORS,
                         ids=[f"{endpoint} {message}" for endpoint, _, message in WEB_ERRORS])
def test_api_refuses_bad_input_with_a_message(server, endpoint, arguments, message):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    arguments = [handle_file(str(server["image"])) if argument == "IMAGE" else argument for argument in arguments]
    with pytest.raises(Exception) as refused:
        client.predict(*arguments, api_name=endpoint)
    assert message in str(refused.value)


def test_ctrl_c_stops_the_server(server):
    """Last in this file: Ctrl-C ends `viscpm serve` with one line and exit status 130 (what the server logged
    before, gradio's notes on the refused requests above, stays as it was)."""
    process = server["process"]
    logged = server["stderr"].stat().st_size
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    with open(server["stderr"], "rb") as log:
        log.seek(logged)
        assert messages(log.read().decode()) == ["interrupted"]
