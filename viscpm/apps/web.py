"""`viscpm serve`: a gradio web app with a chat tab and a paint tab.

    viscpm serve viscpm-chat-hf viscpm-paint-hf --port 7860

Chat: upload an image, ask, keep talking; a new image starts a new conversation. Answers stream with greedy
search or sampling; the original's beam search shows the answer when it is complete. Paint: prompt, negative
prompt, seed and steps; the pictures of the session collect in a gallery.

Every chat request carries its whole conversation (the image, the history the page shows, the question), and the
answer is computed from that alone: requests that run at the same time, from one session or many, cannot mix
their conversations. The only thing a session keeps is the image features of its last answer, used again only
for the same image (and the gallery of its pictures).

The same two functions are the app's HTTP API (``/chat`` and ``/paint``, e.g. through ``gradio_client``).
Nothing is fetched from the internet: the page uses system fonts and gradio's analytics are off.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import gradio as gr  # noqa: E402

from viscpm.chat import ChatSession  # noqa: E402
from viscpm.conversion.common import first_line  # noqa: E402

from .common import (  # noqa: E402
    EXIT_USAGE,
    SEED_MAX,
    AppError,
    check_number,
    decoding_options,
    load_chat,
    load_image,
    load_paint,
    paint_images,
)

__all__ = ["DECODINGS", "build_app", "serve"]

DECODINGS = {
    "beam search (original)": "beam",
    "greedy (streamed)": "greedy",
    "sampling (streamed)": "sample",
}
_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
_MONO = ["ui-monospace", "monospace"]


def _image_key(path: str) -> str:
    """The same picture gives the same key (the uploaded file's bytes), whatever temporary file gradio made."""
    with open(path, "rb") as handle:
        return hashlib.sha1(handle.read()).hexdigest()


def _message(role: str, text: str) -> dict:
    """A chat message whose text reaches the page and comes back exactly (gradio dedents plain string content)."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _refused(message: str):
    """The error a user sees for a request the app refuses (no traceback in the server's log: nothing failed)."""
    return gr.Error(message, print_exception=False)


def build_app(chat, painter, max_new_tokens: int | None = None, paint_steps: int = 50):
    """The gradio `Blocks` app around a loaded `VisCPMChat` and `VisCPMPaint`."""

    def respond(image, question: str, history: list | None, decoding: str, features: dict | None):
        if image is None:
            raise _refused("upload an image first")
        if not isinstance(question, str) or not question.strip():
            raise _refused("type a question about the image")
        if decoding not in DECODINGS:
            raise _refused(f"unknown decoding {decoding!r}; use one of: {', '.join(DECODINGS)}")
        history = list(history or [])
        try:
            options = decoding_options(DECODINGS[decoding], max_new_tokens=max_new_tokens)
            # The conversation so far is the history the request brings, as the page shows it.
            _, context, _ = chat.processor.conversation_to_prompt([*history, {"role": "user", "content": question}])
            # The uploaded file as it is, read by the image processor (as `chat(path)` reads it).
            image = load_image(image, chat.processor.image_processor)
        except (AppError, ValueError) as error:
            raise _refused(str(error)) from None
        key = _image_key(image)
        session = ChatSession(chat, image, **options)
        session.context = context
        if features and features.get("image") == key:  # this image's features, from the session's last answer
            session.vision_hidden_states = features["vision_hidden_states"]
        history.append(_message("user", question))
        answer = ""
        try:
            for piece in session.stream(question):
                answer += piece
                yield [*history, _message("assistant", answer)], "", features
        except (AppError, ValueError) as error:
            raise _refused(str(error)) from None
        history.append(_message("assistant", session.turns[-1][1]))
        yield history, "", {"image": key, "vision_hidden_states": session.vision_hidden_states}

    def clear():
        return [], "", None

    def paint(prompt: str, negative_prompt: str, seed: float | None, steps: float, gallery_state: list | None):
        try:
            seed = None if seed is None else check_number(seed, "the seed", low=0, high=SEED_MAX)
            images, flagged = paint_images(painter, prompt or "", negative_prompt or None, steps=steps, seed=seed)
        except AppError as error:
            raise _refused(str(error)) from None
        if any(flagged):
            gr.Warning("the safety checker blacked out a picture")
        gallery = [(image, prompt) for image in images] + list(gallery_state or [])
        return gallery, gallery

    with gr.Blocks(title="VisCPM") as app:
        gr.Markdown("# VisCPM\nChat about an image, or paint one from a description (Chinese or English).")
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=1):
                    # The file as uploaded (no conversion by gradio): the image processor reads it, as chat() does.
                    image = gr.Image(type="filepath", image_mode=None, label="Image",
                                     sources=["upload", "clipboard"], elem_id="chat-image")
                    decoding = gr.Radio(list(DECODINGS), value=next(iter(DECODINGS)), label="Decoding")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label="Conversation", render_markdown=False, allow_tags=False,
                                         elem_id="chatbot", buttons=["copy"])
                    question = gr.Textbox(label="Question", placeholder="Ask about the image, then press Enter",
                                          elem_id="question")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        reset = gr.Button("Clear", elem_id="clear")
            features = gr.State(None)
            inputs, outputs = [image, question, chatbot, decoding, features], [chatbot, question, features]
            # One chat model: its requests take turns, whichever button or API call sent them.
            send.click(respond, inputs, outputs, api_name="chat", concurrency_id="chat")
            question.submit(respond, inputs, outputs, api_name=False, concurrency_id="chat")
            reset.click(clear, None, outputs, api_name=False)
            # A new image starts a new conversation; what is typed in the question box stays.
            image.change(lambda: ([], None), None, [chatbot, features], api_name=False)
        with gr.Tab("Paint"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", placeholder="海边的灯塔，油画", elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", placeholder="模糊, low quality")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    steps = gr.Slider(1, 100, value=paint_steps, step=1, label="Steps")
                    draw = gr.Button("Paint", variant="primary", elem_id="paint")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Pictures", columns=3, format="png", elem_id="gallery")
            pictures = gr.State([])
            draw.click(paint, [prompt, negative, seed, steps, pictures], [gallery, pictures], api_name="paint")
    app.viscpm_theme = gr.themes.Default(font=_FONTS, font_mono=_MONO)
    return app


def serve(model_chat: str, model_paint: str, host: str = "127.0.0.1", port: int = 7860, dtype: str | None = None,
          device: str | None = None, max_new_tokens: int | None = None, paint_steps: int = 50) -> None:
    """Load both models, build the app and serve it until Ctrl-C (raised on as `KeyboardInterrupt` once the server
    is closed)."""
    check_address(host, port)
    chat = load_chat(model_chat, dtype, device)
    painter = load_paint(model_paint, dtype, device, progress=False)
    app = build_app(chat, painter, max_new_tokens=max_new_tokens, paint_steps=paint_steps)
    kwargs: dict[str, Any] = dict(server_name=host, server_port=port, show_error=True, ssr_mode=False,
                                  theme=app.viscpm_theme, prevent_thread_lock=True)
    try:
        app.queue().launch(**kwargs)
    except OSError as error:  # taken since check_address looked
        raise AppError(f"cannot serve on {host}:{port} ({first_line(error)}); try another --port") from None
    try:
        while True:  # the server runs in gradio's threads
            time.sleep(1)
    finally:
        app.close(verbose=False)


def check_address(host: str, port: int) -> None:
    """Refuse, before the models load, a ``host`` that is not this machine's or a ``port`` that is taken."""
    fix = "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise AppError(f"--host {host} is not an address, nor a name this machine can resolve ({error}); {fix}",
                       EXIT_USAGE) from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise AppError(f"port {port} is in use on {host}; pick another --port, or stop what listens "
                               "there") from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise AppError(f"--host {host} is not an address of this machine; {fix}", EXIT_USAGE) from None
            if error.errno == errno.EACCES:
                raise AppError(f"listening on port {port} needs more privileges; use a --port above 1023") from None
            raise AppError(f"cannot listen on {host}:{port} ({error.strerror}); check --host and --port") from None
