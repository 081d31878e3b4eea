"""The ``viscpm`` command line: chat about an image, paint, convert checkpoints, the offline demo, the web app.

    viscpm chat MODEL --image IMG [QUESTION]        # one answer; without QUESTION a multi-turn session
    viscpm paint MODEL "PROMPT" [-o out.png]        # with a progress bar
    viscpm convert {chat,paint,cpmbee} ...          # the scripts under conversion/, one command
    viscpm demo                                     # offline: tiny random models, converted, chat + paint
    viscpm serve MODEL_CHAT MODEL_PAINT [--port N]  # the gradio web app
    viscpm api CHAT_MODEL [--paint PAINT_MODEL]     # an OpenAI-compatible HTTP API (FastAPI + uvicorn)
    viscpm push DIR REPO_ID [...]                   # upload to the Hugging Face Hub (conversion/push_to_hub.py)
    viscpm eval llava-bench BENCH_DIR ...           # benchmarks (viscpm/apps/eval.py): LLaVA-bench with a judge

Exit status: 0 ok, 1 runtime error, 2 usage error, 130 interrupted (Ctrl-C). Errors are one line on stderr
that says what to do; ``--debug`` (anywhere before a ``--``) shows the traceback too. Ctrl-C ends any command with
one line, ``interrupted``, and leaves no partial output file.

Heavy imports (torch, transformers, gradio) happen inside the commands, so that usage errors and ``--help``
do not pay for what they do not use beyond the package import itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import random
import sys
import traceback
import warnings
from pathlib import Path

from viscpm.conversion.common import ScriptArgumentParser, first_line

from .common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    SEED_MAX,
    AppError,
    atomic_files,
    check_model,
    check_number,
    decoding_options,
    load_chat,
    load_image,
    load_paint,
    paint_images,
)
from .eval import add_eval_parser

__all__ = ["build_parser", "main"]

CONVERTERS = {
    "chat": ("convert_viscpm_chat", "an original VisCPM-Chat checkpoint"),
    "paint": ("convert_viscpm_paint", "an original VisCPM-Paint checkpoint"),
    "cpmbee": ("convert_cpmbee", "an original CPM-Bee checkpoint"),
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUIET_LIBRARIES = ("transformers", "diffusers")
"""Libraries whose warnings and info logs the commands hide unless ``--debug``."""


# ----------------------------------------------------------------------------------------------------------------
# Chat
# ----------------------------------------------------------------------------------------------------------------


class _Answers:
    """stdout for answers printed as they are generated; it knows when the last line is unfinished, so that an
    error or Ctrl-C in the middle of an answer still ends that line."""

    line_open = False

    def write(self, piece: str) -> None:
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
            self.line_open = not piece.endswith("\n")

    def end_line(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.line_open = False


_ANSWERS = _Answers()
MAX_LINE = 100_000
"""The longest line the multi-turn session reads (in characters): more than any prompt can hold (3000 tokens of at
most 32 characters each)."""


def _read_line() -> str | None:
    """The session's next line from stdin (None at its end); a line over `MAX_LINE` is skipped, as an error."""
    line = sys.stdin.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line.rstrip("\n")) > MAX_LINE:
        while line and not line.endswith("\n"):
            line = sys.stdin.readline(MAX_LINE)
        raise AppError(f"that line is over {MAX_LINE} characters, more than a question can be; ask a shorter one")
    return line


def _turn(session, text: str) -> bool:
    """Act on one line of the multi-turn session; False ends the session."""
    if text in ("/exit", "/quit"):
        return False
    if text == "/reset":
        session.reset()
        print("(history cleared)", file=sys.stderr)
    elif text == "/image" or text.startswith("/image "):
        path = text[len("/image"):].strip()
        if not path:
            raise AppError("/image needs a path: /image photo.jpg")
        session.set_image(load_image(path))
        print(f"(now chatting about {path}; history cleared)", file=sys.stderr)
    elif text.startswith("/") and " " not in text:
        raise AppError(f"unknown command {text}; use /image PATH, /reset or /exit")
    elif text:
        session.ask(text, _ANSWERS.write)
        _ANSWERS.end_line()
    return True


def _interactive(session, image_path: str, debug: bool) -> None:
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting about {image_path}; /image PATH for another image, /reset to forget, /exit to leave",
              file=sys.stderr)
    while True:
        if tty:
            _ANSWERS.write("> ")
        try:
            line = _read_line()
            _ANSWERS.line_open = False  # the user's Enter ended the prompt's line
            if line is None or not _turn(session, line.strip()):
                break
        except Exception as error:  # a bad turn ends that turn, not the session
            _report(error, debug, plain=(AppError, ValueError))


def cmd_chat(args) -> int:
    import torch

    options = decoding_options("greedy" if args.greedy else "sample" if args.sample else "beam",
                               num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                               repetition_penalty=args.repetition_penalty, decode_mode=args.decode_mode)
    if args.question is not None and not args.question.strip():
        raise AppError("the question is empty; ask something, or leave it out for a multi-turn session", EXIT_USAGE)
    image = load_image(args.image)
    chat = load_chat(args.model, args.dtype, args.device, args.variant, args.adapter)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    from viscpm.chat import ChatSession

    session = ChatSession(chat, image, **options)
    if args.question is None:
        _interactive(session, args.image, args.debug)
        return EXIT_OK
    session.ask(args.question, None if args.no_stream else _ANSWERS.write)
    if args.no_stream:
        _ANSWERS.write(session.turns[-1][1])
    _ANSWERS.end_line()
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# Paint
# ----------------------------------------------------------------------------------------------------------------


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(1, count + 1)]


def _image_format(path: Path) -> str:
    import PIL.Image

    fmt = PIL.Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise AppError(f"cannot save {path}: unknown image extension {path.suffix or '(none)'}; use .png or .jpg",
                       EXIT_USAGE)
    return fmt


def cmd_paint(args) -> int:
    output = Path(args.output).expanduser()
    fmt = _image_format(output)
    if not output.parent.is_dir():
        raise AppError(f"cannot write {output}: folder {output.parent} does not exist")
    painter = load_paint(args.model, args.dtype, args.device, variant=args.variant)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    images, flagged = paint_images(painter, args.prompt, args.negative, args.steps, seed, args.size, args.num_images,
                                   args.guidance_scale)
    paths = _output_paths(output, len(images))
    with atomic_files(paths) as temps:  # all pictures or none
        for image, temp in zip(images, temps):
            image.save(temp, format=fmt)
    for path, bad in zip(paths, flagged):
        note = " (flagged by the safety checker: blacked out)" if bad else ""
        print(f"wrote {path}{note}")
    print(f"seed {seed}", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# Convert, demo, serve
# ----------------------------------------------------------------------------------------------------------------


def run_script(module: str, argv: list[str], prog: str) -> int:
    """Run the ``main(argv, prog)`` of a script under ``viscpm.conversion`` (a converter or the Hub push)."""
    try:
        status = importlib.import_module(f"viscpm.conversion.{module}").main(argv, prog=prog)
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        status = exit_.code
    return _status(status)


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
        raise AppError("the web app needs gradio: pip install 'viscpm-hf[web]' (or pip install gradio)")
    for path, kind in ((args.model_chat, "chat"), (args.model_paint, "paint")):
        check_model(path, kind)
    from .web import serve

    serve(args.model_chat, args.model_paint, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
          max_new_tokens=args.max_new_tokens)
    return EXIT_OK


def cmd_api(args) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise AppError(f"the API server needs {' and '.join(missing)}: pip install 'viscpm-hf[api]'")
    check_model(args.chat_model, "chat")
    if args.paint is not None:
        check_model(args.paint, "paint")
    from .api import ApiLimits, serve

    limits = ApiLimits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                       max_image_pixels=args.max_image_pixels, max_image_bytes=int(args.max_image_mb * 2**20),
                       max_body_bytes=int(args.max_body_mb * 2**20), max_queue=args.max_queue)
    serve(args.chat_model, args.paint, host=args.host, port=args.port, api_key=args.api_key, dtype=args.dtype,
          device=args.device, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, limits=limits,
          allow_local_images=args.allow_local_images, allow_remote_images=args.allow_remote_images)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# The parser and main
# ----------------------------------------------------------------------------------------------------------------


def _number(kind: type = int, **bounds):
    """An argparse type: the text as a finite ``kind`` within ``bounds`` (see `check_number`)."""

    def parse(text: str):
        try:
            return check_number(text, "", kind, **bounds)
        except AppError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


_positive_int = _number(low=1)
_seed = _number(low=0, high=SEED_MAX)
_port = _number(low=1, high=65535)
_positive_float = _number(float, above=0)
_probability = _number(float, above=0, high=1)
_finite_float = _number(float)
_milliseconds = _number(float, low=0, high=60_000)


def _image_size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {value}")
    return value


def _chat_parser(commands, parents) -> argparse.ArgumentParser:
    chat = commands.add_parser(
        "chat", parents=parents, help="answer questions about an image",
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
    chat.add_argument("--top-p", type=_probability, help="nucleus sampling threshold, in (0, 1] (with --sample)")
    chat.add_argument("--top-k", type=_positive_int, help="top-k sampling (with --sample)")
    chat.add_argument("--repetition-penalty", type=_positive_float, help="default: the folder's, 1.1")
    chat.add_argument("--seed", type=_seed, help="random seed (for --sample)")
    chat.add_argument("--decode-mode", choices=["dynamic", "static", "compile", "cuda_graph"],
                      help="decode step of the beam search: fixed-shape buffers (static), compiled, or a CUDA graph "
                           "(default: dynamic)")
    chat.add_argument("--no-stream", action="store_true", help="print each answer only when it is complete")
    chat.set_defaults(func=cmd_chat)
    return chat


def _paint_parser(commands, parents) -> argparse.ArgumentParser:
    paint = commands.add_parser("paint", parents=parents, help="draw a picture from a description",
                                description="Draw PROMPT with a converted VisCPM-Paint folder and save it.")
    paint.add_argument("model", metavar="MODEL", help="a converted VisCPM-Paint folder (or Hub repo id)")
    paint.add_argument("prompt", metavar="PROMPT", help="what to draw (Chinese or English)")
    paint.add_argument("--variant", help="which weights of MODEL to load (e.g. balance, zhplus)")
    paint.add_argument("-o", "--output", default="viscpm-paint.png",
                       help="image file to write (default: %(default)s; NAME-1.png, NAME-2.png, ... for several)")
    paint.add_argument("--negative", help="what the picture should not have")
    paint.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default: %(default)s)")
    paint.add_argument("--seed", type=_seed, help="random seed (default: a random one, printed)")
    paint.add_argument("--size", type=_image_size, help="width and height in pixels, a multiple of 8 "
                                                          "(default: the model's, 512)")
    paint.add_argument("--num-images", type=_positive_int, default=1, help="default: %(default)s")
    paint.add_argument("--guidance-scale", type=_finite_float, default=7.5, help="default: %(default)s")
    paint.set_defaults(func=cmd_paint)
    return paint


def _convert_parser(commands, parents) -> argparse.ArgumentParser:
    convert = commands.add_parser("convert", parents=parents, help="convert an original checkpoint",
                                  description="Convert an original checkpoint into a Hugging Face folder. "
                                              "`viscpm convert KIND --help` lists each converter's options.")
    kinds = convert.add_subparsers(dest="kind", metavar="KIND", parser_class=ScriptArgumentParser)
    kinds.required = True
    for kind, (_, what) in CONVERTERS.items():
        kinds.add_parser(kind, help=f"convert {what}", add_help=False)
    return convert


def _demo_parser(commands, parents) -> argparse.ArgumentParser:
    demo = commands.add_parser(
        "demo", parents=parents, help="the whole path offline, on tiny random models",
        description="Build tiny VisCPM-Chat and VisCPM-Paint checkpoints with RANDOM weights in the original "
                    "format, convert them with the real converters, paint a picture and chat about it. Needs no "
                    "network. With --chat-model/--paint-model, the same runs on converted real models.")
    demo.add_argument("--output-dir", default="build/viscpm-demo", help="where the files go (default: %(default)s)")
    demo.add_argument("--vocab-file", help="the CPM-Bee vocabulary, bee.txt (default: the installed original "
                                           "VisCPM package's)")
    demo.add_argument("--chat-model", help="a converted VisCPM-Chat folder to use instead of a tiny random one")
    demo.add_argument("--paint-model", help="a converted VisCPM-Paint folder to use instead of a tiny random one")
    demo.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the random weights and of the painting")
    demo.add_argument("--steps", type=_positive_int, default=10, help="denoising steps (default: %(default)s)")
    demo.add_argument("--size", type=_image_size, help="picture size in pixels (default: 64 for the tiny "
                                                         "model, the model's own otherwise)")
    demo.add_argument("--prompt", help="what to paint")
    demo.add_argument("--question", help="the first question about the picture")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=16, help="longest answer (default: "
                                                                              "%(default)s)")
    demo.set_defaults(func=cmd_demo)
    return demo


def _serve_parser(commands, parents) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve", parents=parents, help="the web app (gradio)",
                                description="Serve a web app with a chat tab and a paint tab.")
    serve.add_argument("model_chat", metavar="MODEL_CHAT", help="a converted VisCPM-Chat folder")
    serve.add_argument("model_paint", metavar="MODEL_PAINT", help="a converted VisCPM-Paint folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; "
                                                           "0.0.0.0 for every interface)")
    serve.add_argument("--port", type=_port, default=7860, help="default: %(default)s")
    serve.add_argument("--max-new-tokens", type=_positive_int, help="longest chat answer (default: the folder's)")
    serve.set_defaults(func=cmd_serve)
    return serve


def _api_parser(commands, parents) -> argparse.ArgumentParser:
    api = commands.add_parser(
        "api", parents=parents, help="an OpenAI-compatible HTTP API (chat completions, image generations)",
        description="Serve /v1/chat/completions (and /v1/images/generations with --paint), /v1/models and /health "
                    "for any OpenAI client. Stateless: run one per GPU behind a load balancer to scale out. SIGTERM "
                    "finishes the requests in flight, then exits.")
    api.add_argument("chat_model", metavar="CHAT_MODEL", help="a converted VisCPM-Chat folder (or Hub repo id)")
    api.add_argument("--paint", metavar="PAINT_MODEL", help="a converted VisCPM-Paint folder: serves image generation")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for "
                                                         "every interface: set an API key)")
    api.add_argument("--port", type=_port, default=8000, help="default: %(default)s")
    api.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every path but /health (default: the "
                                       "VISCPM_API_KEY environment variable; none: no key)")
    api.add_argument("--max-batch-size", type=_positive_int, default=8,
                     help="answers generated together at most (default: %(default)s; 1: one request at a time)")
    api.add_argument("--batch-wait-ms", type=_milliseconds, default=50.0,
                     help="how long a request waits for companions to batch with, when the server is busy "
                          "(default: %(default)s)")
    api.add_argument("--max-tokens", type=_positive_int, default=1024,
                     help="the largest max_tokens a request may ask for (default: %(default)s)")
    api.add_argument("--max-prompt-tokens", type=_positive_int, default=3000,
                     help="longest prompt, image slots and history included (default: %(default)s)")
    api.add_argument("--max-image-pixels", type=_positive_int, default=25_000_000,
                     help="largest image, width x height (default: %(default)s)")
    api.add_argument("--max-image-mb", type=_positive_float, default=10.0, help="largest image file (default: "
                                                                               "%(default)s MiB)")
    api.add_argument("--max-body-mb", type=_positive_float, default=20.0, help="largest request body (default: "
                                                                              "%(default)s MiB)")
    api.add_argument("--max-queue", type=_positive_int, default=256,
                     help="requests waiting for the model before new ones get 503 (default: %(default)s)")
    api.add_argument("--allow-local-images", action="store_true",
                     help="accept image_url paths on the server's disk (file://... or /path)")
    api.add_argument("--allow-remote-images", action="store_true",
                     help="fetch http(s) image_url addresses (10 s timeout)")
    api.set_defaults(func=cmd_api)
    return api


def build_parser() -> argparse.ArgumentParser:
    common = ScriptArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error, and library warnings")
    runtime = ScriptArgumentParser(add_help=False)
    runtime.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to run in (default: as saved)")
    runtime.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")

    parser = ScriptArgumentParser(prog="viscpm", description="VisCPM-Chat and VisCPM-Paint from the command line.",
                                  epilog="Exit status: 0 ok, 1 error, 2 usage error. `viscpm COMMAND --help` for "
                                         "each command.")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of an error, and library warnings")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ScriptArgumentParser)
    commands.required = True
    parser.commands = {
        "chat": _chat_parser(commands, [common, runtime]),
        "paint": _paint_parser(commands, [common, runtime]),
        "convert": _convert_parser(commands, [common]),
    }
    commands.add_parser("push", parents=[common], add_help=False,
                        help="upload a converted folder or adapter to the Hugging Face Hub (`viscpm push --help`)")
    parser.commands.update(demo=_demo_parser(commands, [common]), serve=_serve_parser(commands, [common, runtime]),
                           api=_api_parser(commands, [common, runtime]),
                           eval=add_eval_parser(commands, [common, runtime]))
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a chat QUESTION may also come after the options (``chat MODEL --image X "why?"``), and after
    ``--`` when it starts with ``-``, which plain argparse does not match to an optional positional."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and args.command == "chat" and args.question is None:
        if extras[0] == "--" and len(extras) > 1:
            args.question, extras = extras[1], extras[2:]
        elif not extras[0].startswith("-"):
            args.question, extras = extras[0], extras[1:]
    if extras:
        hint = ""
        if args.command == "chat" and args.question is None and extras[0].startswith("-"):
            hint = (f"; a question that starts with '-' goes last, after --: viscpm chat MODEL --image IMG -- "
                    f"{extras[0]!r}")
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    return args


def _version() -> str:
    try:
        return importlib.metadata.version("viscpm-hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _quiet_libraries(quiet: bool = True):
    """Hide library warnings and info logs while a command runs (``--debug`` keeps them); restored after.

    Nothing is imported for it: a library already loaded gets its root logger's level set, and one that a command
    loads later reads its ``<NAME>_VERBOSITY`` variable when it sets up its logging.
    """
    if not quiet:
        yield
        return
    saved_env = {name: os.environ.get(_verbosity_variable(name)) for name in QUIET_LIBRARIES}
    loaded = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES if name in sys.modules}
    for name in QUIET_LIBRARIES:
        os.environ[_verbosity_variable(name)] = "error"
        if name in loaded:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(_verbosity_variable(name), None)
            else:
                os.environ[_verbosity_variable(name)] = value
            if name in loaded:
                logging.getLogger(name).setLevel(loaded[name])
            elif name in sys.modules:  # loaded by the command: the level it would have chosen by itself
                level = logging.getLevelName((value or "warning").upper())
                logging.getLogger(name).setLevel(level if isinstance(level, int) else logging.WARNING)


def _verbosity_variable(library: str) -> str:
    return f"{library.upper()}_VERBOSITY"


def _report(error: BaseException, debug: bool = False, plain: tuple[type, ...] = (AppError,)) -> None:
    """One line on stderr for ``error`` (its traceback first with ``--debug``): the message of the ``plain``
    errors, which say what to do; the type and the first line of any other."""
    if _ANSWERS.line_open:
        _ANSWERS.end_line()
    if debug:
        traceback.print_exception(error)
    if isinstance(error, plain):
        message = str(error)
    else:
        message = f"{type(error).__name__}: {first_line(error)[:500]}"
        if not debug:
            message += " (run again with --debug for the traceback)"
    print(f"error: {message}", file=sys.stderr)


def _interrupted() -> None:
    """Ctrl-C: close the progress bars and the answer line left open, then one line."""
    if "tqdm" in sys.modules:
        for bar in list(getattr(sys.modules["tqdm"].tqdm, "_instances", ())):
            bar.close()
    if _ANSWERS.line_open:
        _ANSWERS.end_line()
    print("interrupted", file=sys.stderr, flush=True)


def _without_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (wherever it is before a ``--``), and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    own = [arg for arg in argv[:end] if arg != "--debug"]
    return own + argv[end:], len(own) < end


def _run(argv: list[str], debug: bool) -> int:
    if argv[:1] == ["convert"] and len(argv) > 1 and argv[1] in CONVERTERS:
        # `viscpm convert KIND ...`: everything after KIND belongs to the conversion script.
        with _quiet_libraries(not debug):
            return run_script(CONVERTERS[argv[1]][0], argv[2:], f"viscpm convert {argv[1]}")
    if argv[:1] == ["push"]:
        with _quiet_libraries(not debug):
            return run_script("push_to_hub", argv[1:], "viscpm push")
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return _status(exit_.code)
    args.debug = debug
    with _quiet_libraries(not debug):
        return _status(args.func(args))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv, debug = _without_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(argv, debug)
    except KeyboardInterrupt:
        _interrupted()
        return EXIT_INTERRUPTED
    except Exception as error:
        _report(error, debug)
        return error.status if isinstance(error, AppError) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
