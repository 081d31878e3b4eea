"""`viscpm serve`: a gradio web app with a chat tab and a paint tab.

    viscpm serve viscpm-chat-hf viscpm-paint-hf --port 7860

Chat: upload an image, ask, keep talking (the history and the image features are kept per browser session; a
new image starts a new conversation). Answers stream with greedy search or sampling; the original's beam
search shows the answer when it is complete. Paint: prompt, negative prompt, seed and steps; the pictures of
the session collect in a gallery.

The same two functions are the app's HTTP API (``/chat`` and ``/paint``, e.g. through ``gradio_client``).
Nothing is fetched from the internet: the page uses system fonts and gradio's analytics are off.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import gradio as gr  # noqa: E402

from viscpm.chat import ChatSession  # noqa: E402

from .common import AppError, decoding_options, load_chat, load_paint, paint_images  # noqa: E402

__all__ = ["DECODINGS", "build_app", "serve"]

DECODINGS = {
    "beam search (original)": "beam",
    "greedy (streamed)": "greedy",
    "sampling (streamed)": "sample",
}
_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
_MONO = ["ui-monospace", "monospace"]


def _image_key(image) -> str:
    return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


def build_app(chat, pipe, max_new_tokens: int | None = None, paint_steps: int = 50):
    """The gradio `Blocks` app around a loaded `VisCPMChat` and `VisCPMPaintPipeline`."""

    def respond(image, question: str, history: list | None, decoding: str, state: dict | None):
        history = list(history or [])
        if image is None:
            raise gr.Error("upload an image first")
        if not question or not question.strip():
            raise gr.Error("type a question about the image")
        try:
            options = decoding_options(DECODINGS.get(decoding, "beam"), max_new_tokens=max_new_tokens)
        except AppError as error:
            raise gr.Error(str(error)) from None
        image = image.convert("RGB")
        key = _image_key(image)
        session = ChatSession(chat, image, **options)
        if state and state.get("image") == key:
            session.context, session.vision_hidden_states = state["context"], state["vision_hidden_states"]
        else:
            history = []  # another image: another conversation
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": ""})
        try:
            for piece in session.stream(question):
                history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
                yield history, "", state
        except AppError as error:
            raise gr.Error(str(error)) from None
        history[-1] = {"role": "assistant", "content": session.turns[-1][1]}
        state = {"image": key, "context": session.context, "vision_hidden_states": session.vision_hidden_states}
        yield history, "", state

    def clear():
        return [], "", None

    def paint(prompt: str, negative_prompt: str, seed: float | None, steps: float, gallery_state: list | None):
        try:
            images, flagged = paint_images(pipe, prompt or "", negative_prompt or None, steps=int(steps),
                                           seed=None if seed is None else int(seed))
        except AppError as error:
            raise gr.Error(str(error)) from None
        if any(flagged):
            gr.Warning("the safety checker blacked out a picture")
        gallery = [(image, prompt) for image in images] + list(gallery_state or [])
        return gallery, gallery

    with gr.Blocks(title="VisCPM") as app:
        gr.Markdown("# VisCPM\nChat about an image, or paint one from a description (Chinese or English).")
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"],
                                     elem_id="chat-image")
                    decoding = gr.Radio(list(DECODINGS), value=next(iter(DECODINGS)), label="Decoding")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label="Conversation", render_markdown=False, allow_tags=False,
                                         elem_id="chatbot", buttons=["copy"])
                    question = gr.Textbox(label="Question", placeholder="Ask about the image, then press Enter",
                                          elem_id="question")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        reset = gr.Button("Clear", elem_id="clear")
            state = gr.State(None)
            inputs, outputs = [image, question, chatbot, decoding, state], [chatbot, question, state]
            send.click(respond, inputs, outputs, api_name="chat")
            question.submit(respond, inputs, outputs, api_name=False)
            reset.click(clear, None, outputs, api_name=False)
            # A new image starts a new conversation; what is typed in the question box stays.
            image.change(lambda: ([], None), None, [chatbot, state], api_name=False)
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
          device: str | None = None, max_new_tokens: int | None = None, paint_steps: int | None = None) -> None:
    """Load both models, build the app and serve it until interrupted."""
    chat = load_chat(model_chat, dtype, device)
    pipe = load_paint(model_paint, dtype, device, progress=False)
    if paint_steps is None:
        paint_steps = 50
    app = build_app(chat, pipe, max_new_tokens=max_new_tokens, paint_steps=paint_steps)
    kwargs: dict[str, Any] = dict(server_name=host, server_port=port, show_error=True, ssr_mode=False,
                                  theme=app.viscpm_theme)
    try:
        app.queue().launch(**kwargs)
    except OSError as error:  # port in use, address not available
        raise AppError(f"cannot serve on {host}:{port} ({str(error).splitlines()[0]}); try another --port") from None
