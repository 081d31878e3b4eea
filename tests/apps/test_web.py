"""`viscpm serve`: the gradio app on 127.0.0.1 with tiny models, driven through its HTTP API (`gradio_client`) and
in headless Chromium (Debian's `chromium`, driven by Playwright); the browser's screenshot is kept under `build/`.

The server is the real command (`python -m viscpm.apps.cli serve ...`) in a subprocess; what it answers is compared
with `VisCPMChat.chat` / the pipeline called in-process on the same folders.
"""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from live_server import free_port, start, stop

from viscpm.apps.cli import main
from viscpm.apps.common import decoding_options, load_chat, load_paint, paint_images
from viscpm.apps.demo import build_tiny_models

TOKENS = 6
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
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = start(["serve", str(chat_dir), str(paint_dir), "--port", str(port), "--max-new-tokens", str(TOKENS),
                     "--device", "cpu"], url, root / "server.log", root)
    try:
        yield {"url": url, "root": root, "chat_dir": chat_dir, "paint_dir": paint_dir, "image": image}
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


def test_browser_upload_ask_and_see_the_answer(server, library_chat):
    from playwright.sync_api import expect, sync_playwright

    expected = library_chat.processor.tokenizer.unescape(
        library_chat.chat(_image(server["image"]), "What do you see?", max_new_tokens=TOKENS).answer).strip()
    assert expected
    BUILD.mkdir(exist_ok=True)
    screenshot = BUILD / "web-chat.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server["url"])
            page.locator("#chat-image input[type=file]").set_input_files(str(server["image"]))
            expect(page.locator("#chat-image img").first).to_be_visible(timeout=30_000)
            page.locator("#question textarea").fill("What do you see?")
            page.locator("#send").click()
            chatbot = page.locator("#chatbot")
            expect(chatbot).to_contain_text("What do you see?", timeout=30_000)
            expect(chatbot).to_contain_text(expected, timeout=60_000)
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
