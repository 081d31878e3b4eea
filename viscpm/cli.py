"""The ``viscpm`` command line: chat about an image, paint, convert checkpoints, the offline demo, the web app.

    viscpm chat MODEL --image IMG [QUESTION]        # one answer; without QUESTION a multi-turn session
    viscpm paint MODEL "PROMPT" [-o out.png]        # with a progress bar
    viscpm convert {chat,paint,cpmbee} ...          # the scripts under conversion/, one command
    viscpm demo                                     # offline: tiny random models, converted, chat + paint
    viscpm serve MODEL_CHAT MODEL_PAINT [--port N]  # the gradio web app
    viscpm push DIR REPO_ID [...]                   # upload to the Hugging Face Hub (conversion/push_to_hub.py)

Exit status: 0 ok, 1 runtime error, 2 usage error (130 when interrupted). Errors are one line on stderr that
says what to do; ``--debug`` (anywhere on the line) shows the traceback instead.

Heavy imports (torch, transformers, gradio) happen inside the commands, so that usage errors and ``--help``
do not pay for what they do not use beyond the package import itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from .convert import first_line

__all__ = ["CLIError", "ChatSession", "build_parser", "decoding_options", "load_chat", "load_image", "load_paint",
           "main", "paint_images"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CONVERTERS = {
    "chat": ("convert_viscpm_chat", "an original VisCPM-Chat checkpoint"),
    "paint": ("convert_viscpm_paint", "an original VisCPM-Paint checkpoint"),
    "cpmbee": ("convert_cpmbee", "an original CPM-Bee checkpoint"),
}
DTYPES = ("auto", "float32", "float16", "bfloat16")


class CLIError(Exception):
    """A problem the user can fix, printed as one line (``status`` is the exit status)."""

    def __init__(self, message: str, status: int = EXIT_ERROR):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2) that point at ``--help``."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def resolve_device(name: str | None):
    """``--device`` as a `torch.device` (default: CUDA when available, else CPU)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"unknown --device {name!r}; use cpu, cuda or cuda:N", EXIT_USAGE) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    return device


def _dtype(name: str | None):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and "\\" not in path


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _has_checkpoint(folder: Path) -> bool:
    return any(child.suffix.lower() in _CHECKPOINT_SUFFIXES for child in folder.iterdir())


def check_model(path: str, kind: str) -> str:
    """Refuse early, in one line, what cannot be a converted ``kind`` ("chat" or "paint") folder.

    A string of the form ``owner/name`` that is not a local path is passed on as a Hub repo id; an original
    checkpoint file, or a folder holding one, is passed on when `viscpm.original_format` can convert it.
    """
    expected = {"chat": "VisCPM-Chat", "paint": "VisCPM-Paint"}[kind]
    fix = (f"convert the original checkpoint with `viscpm convert {kind} --checkpoint FILE --output-dir DIR`, "
           "or run `viscpm demo` for a tiny one")
    local = Path(path).expanduser()
    if not local.exists():
        if _looks_like_hub_id(path):
            return path
        raise CLIError(f"model folder {path} not found; {fix}")
    original_ok = importlib.util.find_spec("viscpm.original_format") is not None
    if local.is_file():
        if original_ok and local.suffix.lower() in _CHECKPOINT_SUFFIXES:
            return str(local)  # an original checkpoint: converted once into a cache folder by from_pretrained
        raise CLIError(f"{path} is a file, not a converted {expected} folder; {fix}")
    config_file, index_file = local / "config.json", local / "model_index.json"
    if kind == "chat":
        if index_file.is_file():
            raise CLIError(f"{path} is a VisCPM-Paint pipeline folder; use `viscpm paint {path} PROMPT`")
        if not config_file.is_file():
            if original_ok and _has_checkpoint(local):
                return str(local)
            raise CLIError(f"{path} has no config.json, so it is not a converted {expected} folder; {fix}")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            raise CLIError(f"{config_file} is not a valid JSON config; {fix}") from None
        if model_type != "viscpm_chat":
            raise CLIError(f"{path} holds a {model_type!r} model, not {expected} ('viscpm_chat')")
    elif not index_file.is_file():
        if original_ok and _has_checkpoint(local):
            return str(local)
        if config_file.is_file():
            raise CLIError(f"{path} is a model folder, not a VisCPM-Paint pipeline (no model_index.json); {fix}")
        raise CLIError(f"{path} has no model_index.json, so it is not a converted {expected} folder; {fix}")
    return str(local)


def load_image(path: str | os.PathLike):
    """An RGB PIL image from a file, or a one-line error saying what is wrong with it."""
    import PIL.Image

    path = Path(path).expanduser()
    if not path.exists():
        raise CLIError(f"image {path} not found")
    if path.is_dir():
        raise CLIError(f"image {path} is a folder; pass an image file (PNG, JPEG, ...)")
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except PIL.UnidentifiedImageError:
        raise CLIError(f"{path} is not an image PIL can read; pass a PNG, JPEG, WebP, ... file") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt image data
        raise CLIError(f"cannot read image {path} ({first_line(error)}); the file may be truncated") from None


def load_chat(path: str, dtype: str | None = None, device: str | None = None, variant: str | None = None,
              adapter: str | None = None):
    """`VisCPMChat` from a converted folder (or Hub id), with an optional PEFT adapter."""
    import inspect

    from .chat import VisCPMChat

    source = check_model(path, "chat")
    torch_device = resolve_device(device)
    if adapter is not None and not Path(adapter).expanduser().exists() and not _looks_like_hub_id(adapter):
        raise CLIError(f"adapter {adapter} not found; pass a folder with adapter_config.json (or a Hub repo id)")
    kwargs: dict[str, Any] = {}
    if variant is not None:
        kwargs["variant"] = variant
    takes_adapter = "adapter" in inspect.signature(VisCPMChat.from_pretrained).parameters
    if adapter is not None and takes_adapter:
        kwargs["adapter"] = adapter
    try:
        chat = VisCPMChat.from_pretrained(source, dtype=_dtype(dtype), device=torch_device, **kwargs)
        if adapter is not None and not takes_adapter:
            chat.model.load_adapter(adapter)
    except CLIError:
        raise
    except Exception as error:
        raise CLIError(f"cannot load VisCPM-Chat from {path}: {first_line(error)[:300]} (is the folder complete? "
                       "convert it again with `viscpm convert chat`)") from error
    return chat


def load_paint(path: str, dtype: str | None = None, device: str | None = None, progress: bool = True,
               variant: str | None = None):
    """`VisCPMPaintPipeline` from a converted folder (or Hub id, or original checkpoint), on ``device``."""
    from .modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    source = check_model(path, "paint")
    torch_device = resolve_device(device)
    kwargs: dict[str, Any] = {}
    try:
        try:
            from .original_format import resolve_original_format
        except ImportError:
            if variant is not None:
                kwargs["variant"] = variant
        else:
            source = resolve_original_format(source, "paint", variant, kwargs)
        pipe = VisCPMPaintPipeline.from_pretrained(source, torch_dtype=_dtype(dtype), **kwargs).to(torch_device)
    except Exception as error:
        raise CLIError(f"cannot load VisCPM-Paint from {path}: {first_line(error)[:300]} (is the folder complete? "
                       "convert it again with `viscpm convert paint`)") from error
    pipe.set_progress_bar_config(desc="painting", disable=not progress)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Chat
# ----------------------------------------------------------------------------------------------------------------


def decoding_options(decoding: str = "beam", num_beams: int | None = None, max_new_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                     repetition_penalty: float | None = None, decode_mode: str | None = None) -> dict:
    """Generation overrides for `VisCPMChat.chat` from the command-line options.

    ``decoding`` is ``"beam"`` (the original's beam search, the folder's defaults: not streamable), ``"greedy"``
    (transformers' greedy search) or ``"sample"`` (transformers' sampling, one beam unless ``num_beams``).
    ``decode_mode`` picks the decode step of the original beam search (``static``, ``compile``, ``cuda_graph``).
    Options left at None keep the folder's generation config.
    """
    options: dict[str, Any] = {}
    if decode_mode is not None:
        if decoding != "beam":
            raise CLIError(f"--decode-mode applies to the original beam search; drop --{decoding} or --decode-mode",
                           EXIT_USAGE)
        options["decode_mode"] = decode_mode
    if decoding == "greedy":
        if num_beams not in (None, 1):
            raise CLIError(f"--greedy decodes one beam; drop --num-beams {num_beams}", EXIT_USAGE)
        options.update(original_beam_search=False, do_sample=False, num_beams=1)
    elif decoding == "sample":
        options.update(do_sample=True, num_beams=num_beams or 1)
    elif decoding != "beam":
        raise ValueError(f"unknown decoding {decoding!r}")
    elif num_beams is not None:
        options["num_beams"] = num_beams
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("repetition_penalty", repetition_penalty)):
        if value is not None:
            options[name] = value
    return options


class _UnescapedText:
    """The tokenizer as the streamer sees it: decoded text comes out as plain text (``<<`` back to ``<``)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids, **kwargs) -> str:
        return self._tokenizer.unescape(self._tokenizer.decode(ids, **kwargs))


class ChatSession:
    """A conversation about one image: keeps the history and the image features between turns.

    ``ask(question, on_text)`` calls ``on_text`` with each new piece of the answer as it is generated when the
    decoding can stream (one beam, transformers' loop), and otherwise once with the whole answer.
    """

    def __init__(self, chat, image=None, **generation_options):
        self.chat = chat
        self.options = generation_options
        self.image = None
        self.reset()
        if image is not None:
            self.set_image(image)

    @property
    def streams(self) -> bool:
        config = self.chat.model.generation_config
        do_sample = self.options.get("do_sample", config.do_sample)
        original = self.options.get("original_beam_search", getattr(config, "original_beam_search", False))
        beams = self.options.get("num_beams", config.num_beams)
        return beams == 1 and (do_sample or not original)

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
        cannot stream); the history is updated once the answer is complete."""
        from transformers import TextIteratorStreamer

        self._check(question)
        if not self.streams:
            yield self._store(question, self._chat(question))
            return
        processor = self.chat.processor
        table = processor.tokenizer.get_ext_tables(processor.build_prompt(question, self.context))
        streamer = TextIteratorStreamer(_UnescapedText(processor.tokenizer), skip_prompt=True,
                                        skip_special_tokens=True, ext_table=table)
        result: dict[str, Any] = {}

        def generate():
            try:
                result["response"] = self._chat(question, streamer=streamer)
            except BaseException as error:  # re-raised in the caller's thread
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        for piece in streamer:
            if piece:
                yield piece
        worker.join()
        if "error" in result:
            raise result["error"]
        self._store(question, result["response"])

    def _check(self, question: str) -> None:
        if self.image is None:
            raise CLIError("no image: give one first")
        if not isinstance(question, str) or not question.strip():
            raise CLIError("empty question: ask something about the image")

    def _chat(self, question: str, **extra):
        return self.chat.chat(self.image, question, context=self.context,
                              vision_hidden_states=self.vision_hidden_states, **self.options, **extra)

    def _store(self, question: str, response) -> str:
        self.context, self.vision_hidden_states = response.context, response.vision_hidden_states
        text = self.chat.processor.tokenizer.unescape(response.answer)
        self.turns.append((question, text))
        return text


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _interactive(session: ChatSession, image_path: str) -> None:
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting about {image_path}; /image PATH for another image, /reset to forget, /exit to leave",
              file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        if question in ("/exit", "/quit"):
            break
        try:
            if question == "/reset":
                session.reset()
                print("(history cleared)", file=sys.stderr)
            elif question.startswith("/image"):
                path = question[len("/image"):].strip()
                if not path:
                    raise CLIError("/image needs a path: /image photo.jpg")
                session.set_image(load_image(path))
                print(f"(now chatting about {path}; history cleared)", file=sys.stderr)
            elif question.startswith("/") and " " not in question:
                raise CLIError(f"unknown command {question}; use /image PATH, /reset or /exit")
            else:
                session.ask(question, _print_piece)
                print()
        except CLIError as error:  # a bad turn does not end the session
            print(f"error: {error}", file=sys.stderr)


def cmd_chat(args) -> int:
    import torch

    options = decoding_options("greedy" if args.greedy else "sample" if args.sample else "beam",
                               num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                               repetition_penalty=args.repetition_penalty, decode_mode=args.decode_mode)
    if args.question is not None and not args.question.strip():
        raise CLIError("the question is empty; ask something, or leave it out for a multi-turn session", EXIT_USAGE)
    image = load_image(args.image)
    chat = load_chat(args.model, args.dtype, args.device, args.variant, args.adapter)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    session = ChatSession(chat, image, **options)
    if args.question is None:
        _interactive(session, args.image)
        return EXIT_OK
    session.ask(args.question, None if args.no_stream else _print_piece)
    if args.no_stream:
        sys.stdout.write(session.turns[-1][1])
    print()
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# Paint
# ----------------------------------------------------------------------------------------------------------------


def paint_images(pipe, prompt: str, negative_prompt: str | None = None, steps: int = 50, seed: int | None = None,
                 size: int | None = None, num_images: int = 1, guidance_scale: float = 7.5):
    """Draw ``num_images`` PIL images for ``prompt``; returns ``(images, flagged)``.

    ``flagged[i]`` is True when the safety checker (if the folder has one) blacked out image ``i``. A prompt the
    prompt checker refuses is a `CLIError`.
    """
    import torch

    if not prompt.strip():
        raise CLIError("the prompt is empty; describe the picture", EXIT_USAGE)
    generator = None if seed is None else torch.Generator(pipe.device).manual_seed(seed)
    try:
        output = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                      guidance_scale=guidance_scale, height=size, width=size, num_images_per_prompt=num_images,
                      generator=generator, output_type="pil")
    except ValueError as error:  # sizes and other values the pipeline refuses
        raise CLIError(first_line(error)) from None
    if any(output.prompt_refused or []):
        raise CLIError("the prompt checker refused this prompt; rephrase it")
    flagged = output.nsfw_content_detected or [False] * len(output.images)
    return output.images, [bool(flag) for flag in flagged]


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(1, count + 1)]


def _save_atomically(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        image.save(tmp, format=_image_format(path))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _image_format(path: Path) -> str:
    import PIL.Image

    fmt = PIL.Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise CLIError(f"cannot save {path}: unknown image extension {path.suffix or '(none)'}; use .png or .jpg",
                       EXIT_USAGE)
    return fmt


def cmd_paint(args) -> int:
    import random

    output = Path(args.output).expanduser()
    _image_format(output)
    if not output.parent.is_dir():
        raise CLIError(f"cannot write {output}: folder {output.parent} does not exist")
    pipe = load_paint(args.model, args.dtype, args.device, variant=args.variant)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    images, flagged = paint_images(pipe, args.prompt, args.negative, args.steps, seed, args.size, args.num_images,
                                   args.guidance_scale)
    for path, image, bad in zip(_output_paths(output, len(images)), images, flagged):
        _save_atomically(image, path)
        note = " (flagged by the safety checker: blacked out)" if bad else ""
        print(f"wrote {path}{note}")
    print(f"seed {seed}", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# Convert, demo, serve
# ----------------------------------------------------------------------------------------------------------------


def _conversion_script(name: str):
    """The ``main`` of a conversion script: ``viscpm.conversion.<name>`` when installed as a package, else the
    file in the repository's ``conversion/`` folder next to the package (an editable install / a clone)."""
    try:
        return importlib.import_module(f"viscpm.conversion.{name}")
    except ImportError:
        pass
    path = Path(__file__).resolve().parent.parent / "conversion" / f"{name}.py"
    if not path.is_file():
        raise CLIError(f"the conversion script {name}.py is not installed with this copy of viscpm; run it from a "
                       "clone of the repository (python conversion/{name}.py) or `pip install -e .` there")
    spec = importlib.util.spec_from_file_location(f"viscpm_conversion_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str], prog: str) -> int:
    """Run a conversion script's ``main(argv)`` under the name ``prog`` (for its usage and help)."""
    module = _conversion_script(name)
    build = getattr(module, "build_parser", None)
    if build is not None:
        def renamed_parser():
            parser = build()
            parser.prog = prog
            parser.error = lambda message: parser.exit(EXIT_USAGE, f"error: {message} (see `{prog} --help`)\n")
            return parser

        module.build_parser = renamed_parser
    try:
        status = module.main(argv)
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        status = exit_.code
    return _status(status)


def run_push(argv: list[str]) -> int:
    """`viscpm push ...`: the Hub upload script (`conversion/push_to_hub.py`, i.e. `viscpm.hub.cli_main`)."""
    try:
        from .hub import cli_main
    except ImportError:
        return run_script("push_to_hub", argv, "viscpm push")
    try:
        return _status(cli_main(argv, prog="viscpm push"))
    except SystemExit as exit_:
        return _status(exit_.code)


def _status(code) -> int:
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_ERROR


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, vocab_file=args.vocab_file, chat_model=args.chat_model, paint_model=args.paint_model,
             device=args.device, seed=args.seed, steps=args.steps, size=args.size, question=args.question,
             prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    return EXIT_OK


def cmd_serve(args) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise CLIError("the web app needs gradio: pip install 'viscpm-hf[web]' (or pip install gradio)")
    for path, kind in ((args.model_chat, "chat"), (args.model_paint, "paint")):
        check_model(path, kind)
    from .web import serve

    serve(args.model_chat, args.model_paint, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
          max_new_tokens=args.max_new_tokens)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# The parser and main
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _image_size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error, and library warnings")
    runtime = _Parser(add_help=False)
    runtime.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to run in (default: as saved)")
    runtime.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")

    parser = _Parser(prog="viscpm", description="VisCPM-Chat and VisCPM-Paint from the command line.",
                     epilog="Exit status: 0 ok, 1 error, 2 usage error. `viscpm COMMAND --help` for each command.")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of an error, and library warnings")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    chat = commands.add_parser(
        "chat", parents=[common, runtime], help="answer questions about an image",
        description="Answer QUESTION about the image; without QUESTION, read questions from stdin one per line (a "
                    "multi-turn session: /image PATH, /reset, /exit). Answers are printed as they are generated "
                    "with --greedy or --sample; the default (the original's beam search) prints them when done.")
    chat.add_argument("model", metavar="MODEL", help="a converted VisCPM-Chat folder, a Hub repo id, or an original "
                                                     "checkpoint (converted once into a cache)")
    chat.add_argument("question", metavar="QUESTION", nargs="?", help="the question; leave out for a session")
    chat.add_argument("--image", required=True, help="the image to talk about")
    chat.add_argument("--variant", help="which weights of MODEL to load (e.g. v1.1, balance, zhplus)")
    chat.add_argument("--adapter", help="a PEFT language adapter (folder or Hub repo id) to load on top")
    mode = chat.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="transformers' greedy search (streamed)")
    mode.add_argument("--sample", action="store_true", help="sampling (streamed with one beam)")
    chat.add_argument("--num-beams", type=_positive_int, help="beams (default: the folder's, 3)")
    chat.add_argument("--max-new-tokens", type=_positive_int, help="longest answer (default: the folder's, 512)")
    chat.add_argument("--temperature", type=_positive_float, help="softmax temperature")
    chat.add_argument("--top-p", type=_positive_float, help="nucleus sampling threshold (with --sample)")
    chat.add_argument("--top-k", type=_positive_int, help="top-k sampling (with --sample)")
    chat.add_argument("--repetition-penalty", type=_positive_float, help="default: the folder's, 1.1")
    chat.add_argument("--seed", type=int, help="random seed (for --sample)")
    chat.add_argument("--decode-mode", choices=["dynamic", "static", "compile", "cuda_graph"],
                      help="decode step of the beam search: fixed-shape buffers (static), compiled, or a CUDA graph "
                           "(default: dynamic)")
    chat.add_argument("--no-stream", action="store_true", help="print each answer only when it is complete")
    chat.set_defaults(func=cmd_chat)

    paint = commands.add_parser("paint", parents=[common, runtime], help="draw a picture from a description",
                                description="Draw PROMPT with a converted VisCPM-Paint folder and save it.")
    paint.add_argument("model", metavar="MODEL", help="a converted VisCPM-Paint folder (or Hub repo id)")
    paint.add_argument("prompt", metavar="PROMPT", help="what to draw (Chinese or English)")
    paint.add_argument("--variant", help="which weights of MODEL to load (e.g. balance, zhplus)")
    paint.add_argument("-o", "--output", default="viscpm-paint.png",
                       help="image file to write (default: %(default)s; NAME-1.png, NAME-2.png, ... for several)")
    paint.add_argument("--negative", help="what the picture should not have")
    paint.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default: %(default)s)")
    paint.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    paint.add_argument("--size", type=_image_size, help="width and height in pixels, a multiple of 8 "
                                                          "(default: the model's, 512)")
    paint.add_argument("--num-images", type=_positive_int, default=1, help="default: %(default)s")
    paint.add_argument("--guidance-scale", type=float, default=7.5, help="default: %(default)s")
    paint.set_defaults(func=cmd_paint)

    convert = commands.add_parser("convert", parents=[common], help="convert an original checkpoint",
                                  description="Convert an original checkpoint into a Hugging Face folder. "
                                              "`viscpm convert KIND --help` lists each converter's options.")
    commands.add_parser("push", parents=[common], add_help=False,
                        help="upload a converted folder or adapter to the Hugging Face Hub (`viscpm push --help`)")
    kinds = convert.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
    kinds.required = True
    for kind, (_, what) in CONVERTERS.items():
        kinds.add_parser(kind, help=f"convert {what}", add_help=False)

    demo = commands.add_parser(
        "demo", parents=[common], help="the whole path offline, on tiny random models",
        description="Build tiny VisCPM-Chat and VisCPM-Paint checkpoints with RANDOM weights in the original "
                    "format, convert them with the real converters, paint a picture and chat about it. Needs no "
                    "network. With --chat-model/--paint-model, the same runs on converted real models.")
    demo.add_argument("--output-dir", default="build/viscpm-demo", help="where the files go (default: %(default)s)")
    demo.add_argument("--vocab-file", help="the CPM-Bee vocabulary, bee.txt (default: the installed original "
                                           "VisCPM package's)")
    demo.add_argument("--chat-model", help="a converted VisCPM-Chat folder to use instead of a tiny random one")
    demo.add_argument("--paint-model", help="a converted VisCPM-Paint folder to use instead of a tiny random one")
    demo.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the painting")
    demo.add_argument("--steps", type=_positive_int, default=10, help="denoising steps (default: %(default)s)")
    demo.add_argument("--size", type=_image_size, help="picture size in pixels (default: 64 for the tiny "
                                                         "model, the model's own otherwise)")
    demo.add_argument("--prompt", help="what to paint")
    demo.add_argument("--question", help="the first question about the picture")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=16, help="longest answer (default: "
                                                                              "%(default)s)")
    demo.set_defaults(func=cmd_demo)

    serve = commands.add_parser("serve", parents=[common, runtime], help="the web app (gradio)",
                                description="Serve a web app with a chat tab and a paint tab.")
    serve.add_argument("model_chat", metavar="MODEL_CHAT", help="a converted VisCPM-Chat folder")
    serve.add_argument("model_paint", metavar="MODEL_PAINT", help="a converted VisCPM-Paint folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; "
                                                           "0.0.0.0 for every interface)")
    serve.add_argument("--port", type=_port, default=7860, help="default: %(default)s")
    serve.add_argument("--max-new-tokens", type=_positive_int, help="longest chat answer (default: the folder's)")
    serve.set_defaults(func=cmd_serve)
    parser.commands = {"chat": chat, "paint": paint, "convert": convert, "demo": demo, "serve": serve}
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a chat QUESTION may also come after the options (``chat MODEL --image X "why?"``), which
    plain argparse does not match to an optional positional."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and args.command == "chat" and args.question is None and not extras[0].startswith("-"):
        args.question, extras = extras[0], extras[1:]
    if extras:
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("viscpm-hf")
    except Exception:
        return "unknown"


@contextlib.contextmanager
def _quiet_libraries(quiet: bool = True):
    """Hide library warnings and info logs while a command runs (``--debug`` keeps them); restored after."""
    if not quiet:
        yield
        return
    import warnings

    import diffusers
    import transformers

    levels = transformers.logging.get_verbosity(), diffusers.utils.logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(levels[0])
            diffusers.utils.logging.set_verbosity(levels[1])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        try:
            # `viscpm convert KIND ...`: everything after KIND belongs to the conversion script.
            positions = [i for i, arg in enumerate(argv) if arg != "--debug"]
            if len(positions) >= 2 and argv[positions[0]] == "convert" and argv[positions[1]] in CONVERTERS:
                kind = argv[positions[1]]
                script_argv = [arg for arg in argv[positions[1] + 1:] if arg != "--debug"]
                with _quiet_libraries(not debug):
                    return run_script(CONVERTERS[kind][0], script_argv, f"viscpm convert {kind}")
            if positions and argv[positions[0]] == "push":
                with _quiet_libraries(not debug):
                    return run_push([arg for arg in argv[positions[0] + 1:] if arg != "--debug"])
            args = parse_args(argv)
        except SystemExit as exit_:
            return _status(exit_.code)
        with _quiet_libraries(not debug):
            return _status(args.func(args))
    except CLIError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if debug:
            traceback.print_exc()
            return EXIT_ERROR
        print(f"error: {type(error).__name__}: {first_line(error)[:500]} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    # `python -m viscpm.cli`: run the imported module's main, so that `viscpm.demo`/`viscpm.web` and this code
    # share one `CLIError` class (this file, run as __main__, would otherwise be a second copy).
    from viscpm.cli import main as _main

    sys.exit(_main())
