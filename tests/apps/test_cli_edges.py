"""The command line's edges (issue 16), table-driven: each bad input is one error line that names the cause and the
fix, with the exact exit status, and leaves the working folder as it was; the inputs it must take are answered
exactly as the library answers them. (Ctrl-C: test_interrupt.py; the web app's inputs: test_web.py.)

`viscpm.apps.cli.main(argv)` runs in-process (the command line after its imports); stdin is a text for the
multi-turn session.
"""

import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from viscpm.apps.cli import MAX_LINE
from viscpm.apps.common import SEED_MAX, decoding_options, load_chat

TOKENS = 4


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels (and holds none)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("edges")
    image = root / "picture.png"
    PIL.Image.fromarray(np.random.default_rng(4).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    (root / "not-an-image.png").write_bytes(b"hello")
    (root / "bomb.png").write_bytes(_png_header(20000, 20000))
    (root / "a-folder").mkdir()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    chat_dir, paint_dir = tiny_models
    yield {"root": root, "CHAT": chat_dir, "PAINT": paint_dir, "IMAGE": image, "BUSY": busy.getsockname()[1]}
    busy.close()


@pytest.fixture(scope="module")
def library_chat(setup):
    return load_chat(str(setup["CHAT"]), device="cpu")


def _snapshot(folder: Path) -> dict:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


@pytest.fixture
def run(setup, cli_main):
    """``run(*argv, stdin=None)``: (status, stdout, stderr) of `main`, names in argv replaced by setup's paths."""

    def run(*argv, stdin=None):
        result = cli_main(setup["root"], *[setup.get(arg, arg) for arg in argv], stdin=stdin)
        return result.returncode, result.stdout, result.stderr

    return run


def _error_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Loading")]
    assert "Traceback" not in stderr
    assert all(line.startswith("error: ") for line in lines), lines
    return lines


CHAT_Q = ["chat", "CHAT", "--image", "IMAGE", "q"]
PAINT_P = ["paint", "PAINT", "a cat", "--steps", "2", "--size", "32"]
ERRORS = [  # (argv, exit status, what the one error line says: the cause and the fix)
    (["chat", "CHAT", "--image", "IMAGE", "-what"], 2,
     ["unrecognized arguments: -what", "a question that starts with '-' goes last, after --", "-- '-what'"]),
    ([*CHAT_Q, "--seed", str(2**70)], 2, ["--seed", "at least 0 and at most 9223372036854775807", str(2**70)]),
    ([*CHAT_Q, "--seed", "-1"], 2, ["--seed", "at least 0"]),
    ([*CHAT_Q, "--seed", "1.5"], 2, ["--seed", "whole number"]),
    ([*PAINT_P, "--seed", str(2**64)], 2, ["--seed", "at most 9223372036854775807"]),
    (["demo", "--seed", str(2**70)], 2, ["--seed", "at most 9223372036854775807"]),
    ([*CHAT_Q, "--temperature", "0"], 2, ["--temperature", "finite number above 0"]),
    ([*CHAT_Q, "--temperature", "nan"], 2, ["--temperature", "finite number above 0", "'nan'"]),
    ([*CHAT_Q, "--temperature", "inf"], 2, ["--temperature", "finite number above 0", "'inf'"]),
    ([*CHAT_Q, "--repetition-penalty=-inf"], 2, ["--repetition-penalty", "finite number above 0"]),
    ([*CHAT_Q, "--top-p", "1.5"], 2, ["--top-p", "above 0 and at most 1"]),
    ([*CHAT_Q, "--top-p", "0"], 2, ["--top-p", "above 0 and at most 1"]),
    ([*CHAT_Q, "--top-p", "nan"], 2, ["--top-p", "'nan'"]),
    ([*CHAT_Q, "--top-k", "-1"], 2, ["--top-k", "at least 1"]),
    ([*CHAT_Q, "--top-k", "2.5"], 2, ["--top-k", "whole number at least 1"]),
    ([*CHAT_Q, "--num-beams", "0"], 2, ["--num-beams", "at least 1"]),
    ([*PAINT_P, "--guidance-scale", "nan"], 2, ["--guidance-scale", "finite number", "'nan'"]),
    ([*PAINT_P, "--guidance-scale", "inf"], 2, ["--guidance-scale", "finite number", "'inf'"]),
    ([*PAINT_P, "--steps", "0"], 2, ["--steps", "at least 1"]),
    ([*PAINT_P, "--size", "0"], 2, ["--size", "at least 1"]),
    ([*PAINT_P, "--num-images", "-2"], 2, ["--num-images", "at least 1"]),
    (["paint", "PAINT", " \t", "--steps", "2", "--size", "32"], 2, ["the prompt is empty", "describe the picture"]),
    (["serve", "CHAT", "PAINT", "--host", "999.1.1.1"], 2,
     ["--host 999.1.1.1 is not an address, nor a name this machine can resolve", "use 127.0.0.1", "0.0.0.0"]),
    (["serve", "CHAT", "PAINT", "--host", "192.0.2.1"], 2,
     ["--host 192.0.2.1 is not an address of this machine", "use 127.0.0.1", "0.0.0.0"]),
    (["serve", "CHAT", "PAINT", "--port", "BUSY"], 1, ["port", "is in use on 127.0.0.1", "pick another --port"]),
    (["serve", "CHAT", "PAINT", "--port", "0"], 2, ["--port", "at least 1"]),
]


@pytest.mark.parametrize("argv, status, fragments", ERRORS, ids=[" ".join(argv) for argv, *_ in ERRORS])
def test_bad_input_is_one_clear_error_and_changes_nothing(setup, run, argv, status, fragments):
    before = _snapshot(setup["root"])
    result, out, err = run(*argv)
    assert result == status, err
    lines = _error_lines(err)
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment.replace("BUSY", str(setup["BUSY"])) in lines[0], lines[0]
    assert out == ""
    assert _snapshot(setup["root"]) == before


@pytest.mark.parametrize("question", ["-what", "--debug", "--", "-h"])
def test_a_question_may_start_with_a_dash(setup, run, library_chat, question):
    """After ``--`` anything is the question, even an option's name."""
    status, out, err = run("chat", "CHAT", "--image", "IMAGE", "--greedy", "--max-new-tokens", TOKENS, "--", question)
    assert status == 0 and _error_lines(err) == []
    expected = library_chat.chat(PIL.Image.open(setup["IMAGE"]).convert("RGB"), question,
                                 **decoding_options("greedy", max_new_tokens=TOKENS))
    assert out == library_chat.processor.tokenizer.unescape(expected.answer) + "\n"


def test_the_largest_seed_samples_as_the_library_does(setup, run, library_chat):
    status, out, err = run(*CHAT_Q, "--sample", "--max-new-tokens", TOKENS, "--seed", SEED_MAX)
    assert status == 0 and _error_lines(err) == []
    torch.manual_seed(SEED_MAX)
    expected = library_chat.chat(PIL.Image.open(setup["IMAGE"]).convert("RGB"), "q",
                                 **decoding_options("sample", max_new_tokens=TOKENS))
    assert out == library_chat.processor.tokenizer.unescape(expected.answer) + "\n"


SESSION = [  # (line, what its one error line says); None: a question, answered
    ("What is it?", None),
    ("/image missing.png", ["missing.png not found"]),
    ("/image a-folder", ["a-folder is a folder", "pass an image file"]),
    ("/image not-an-image.png", ["not-an-image.png", "not an image"]),
    ("/image bomb.png", ["error: "]),  # 400 million pixels: refused by the image loading, however it words it
    ("/image", ["/image needs a path", "/image photo.jpg"]),
    ("/imagex", ["unknown command /imagex", "/image PATH"]),
    ("/bogus", ["unknown command /bogus", "/reset or /exit"]),
    ("x" * (MAX_LINE + 1), [f"over {MAX_LINE} characters", "ask a shorter one"]),
    ("y" * MAX_LINE * 3, [f"over {MAX_LINE} characters"]),  # skipped to its end, not read as several lines
    ("第二个问题", None),
    ("/exit", None),
    ("never asked", None),
]


def test_a_bad_turn_ends_that_turn_not_the_session(setup, run, library_chat):
    stdin = "".join(f"{line}\n" for line, _ in SESSION)
    status, out, err = run("chat", "CHAT", "--image", "IMAGE", "--greedy", "--max-new-tokens", TOKENS, stdin=stdin)
    assert status == 0
    lines = _error_lines(err)
    expected_errors = [fragments for _, fragments in SESSION if fragments is not None]
    assert len(lines) == len(expected_errors), lines
    for line, fragments in zip(lines, expected_errors):
        assert all(fragment in line for fragment in fragments), (line, fragments)
    # Both questions answered, the second with the first in its history (the bad turns changed nothing).
    options = decoding_options("greedy", max_new_tokens=TOKENS)
    image = PIL.Image.open(setup["IMAGE"]).convert("RGB")
    first = library_chat.chat(image, "What is it?", **options)
    second = library_chat.chat(image, "第二个问题", context=first.context, **options)
    unescape = library_chat.processor.tokenizer.unescape
    assert out.splitlines() == [unescape(first.answer), unescape(second.answer)]
