"""The `viscpm` command line on tiny converted models: help, success, a usage error and a missing file for
every subcommand (`serve` is in test_web.py).

Successes are compared with the library called in-process on the same folders (the printed answer is
`VisCPMChat.chat`'s, the written picture is the pipeline's for the same seed). The tiny folders come from
`viscpm.apps.demo.build_tiny_models` (original-format checkpoints converted by the real converters).

A subprocess (`python -m viscpm.apps.cli ...`, as the console script runs) costs ~5 s of imports on one core, so the
successes of each subcommand, the top-level help and one missing file run as subprocesses
(exit status, stdout/stderr as a user sees them); the other help / usage / missing-file cases call
`viscpm.apps.cli.main(argv)` in-process, which is the same code after the imports, and check its return status and
output the same way.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
import torch

from viscpm.apps.common import decoding_options, load_chat, load_paint, paint_images
from viscpm.apps.demo import build_tiny_models
from viscpm.chat import ChatSession

QUESTION = "What is <b>this</b>? <ans>"
FOLLOW_UP = "第二个问题"
TOKENS = "6"


def _cli(*args, cwd, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "viscpm.apps.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, vocab_file):
    root = tmp_path_factory.mktemp("cli")
    chat_dir, paint_dir = build_tiny_models(root / "models", vocab_file, seed=3)
    image = root / "picture.png"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    other = root / "other.png"
    PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(other)
    (root / "not-an-image.png").write_bytes(b"hello")
    original = root / "models" / "original" / "chat"
    convert_args = ["--checkpoint", original / "viscpm_chat_tiny.pt", "--llm-config", original / "llm.json",
                    "--vision-config", original / "vision.json", "--query-num", "8", "--vocab-file", vocab_file,
                    "--no-progress"]
    commands = {
        "help": ["--help"],
        "chat_greedy": ["chat", chat_dir, "--image", image, QUESTION, "--greedy", "--max-new-tokens", TOKENS],
        "chat_session": (["chat", chat_dir, "--image", image, "--greedy", "--max-new-tokens", TOKENS],
                         f"{QUESTION}\n\n/image {root / 'missing.png'}\n{FOLLOW_UP}\n/image {other}\n{QUESTION}\n"
                         "/exit\nnever asked\n"),
        "chat_missing": ["chat", chat_dir, "--image", root / "missing.png", "q"],
        "paint": ["paint", paint_dir, "一只猫 <cat>", "-o", root / "cat.png", "--steps", "3", "--seed", "7",
                  "--num-images", "2", "--negative", "模糊", "--size", "32"],
        "convert": ["convert", "chat", *convert_args, "--output-dir", root / "converted"],
    }

    def run(item):
        name, command = item
        args, stdin = command if isinstance(command, tuple) else (command, None)
        return name, _cli(*args, cwd=root, stdin=stdin)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = pool.map(run, commands.items())
        results = dict(futures)
    return {"root": root, "chat_dir": chat_dir, "paint_dir": paint_dir, "image": image, "other": other,
                    "runs": results, "vocab_file": vocab_file, "convert_args": convert_args}


@pytest.fixture
def run_main(cli_main, setup):
    return lambda *args, stdin=None: cli_main(setup["root"], *args, stdin=stdin)


def _ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def _one_line_error(result, status, *fragments):
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def library_chat(setup):
    return load_chat(str(setup["chat_dir"]), device="cpu")


def _image(path):
    return PIL.Image.open(path).convert("RGB")


# ----------------------------------------------------------------------------------------------------- help / usage


def test_help_subprocess(setup):
    result = _ok(setup["runs"]["help"])
    for text in ("usage: viscpm", "chat", "paint", "convert", "demo", "serve", "Exit status"):
        assert text in result.stdout


@pytest.mark.parametrize("argv, expected", [
    (["chat", "--help"], ["usage: viscpm chat", "--image", "QUESTION", "--greedy", "--adapter", "--variant"]),
    (["paint", "-h"], ["usage: viscpm paint", "PROMPT", "--negative", "--steps", "--seed", "--size", "--num-images"]),
    (["convert", "--help"], ["usage: viscpm convert", "chat", "paint", "cpmbee"]),
    (["convert", "chat", "--help"], ["usage: viscpm convert chat", "--checkpoint", "--vision-config"]),
    (["convert", "paint", "--help"], ["usage: viscpm convert paint", "--sd-base"]),
    (["convert", "cpmbee", "--help"], ["usage: viscpm convert cpmbee", "--config"]),
    (["demo", "--help"], ["usage: viscpm demo", "RANDOM", "--output-dir"]),
    (["serve", "--help"], ["usage: viscpm serve", "MODEL_CHAT", "MODEL_PAINT", "--port"]),
])
def test_help(run_main, argv, expected):
    result = _ok(run_main(*argv))
    for text in expected:
        assert text in result.stdout


@pytest.mark.parametrize("argv, fragment", [([], "COMMAND"), (["draw"], "invalid choice"), (["convert"], "KIND")])
def test_no_command_is_a_usage_error(run_main, argv, fragment):
    _one_line_error(run_main(*argv), 2, fragment, "--help")


# ------------------------------------------------------------------------------------------------------------- chat


def test_chat_greedy_streams_the_library_answer(setup, library_chat):
    result = _ok(setup["runs"]["chat_greedy"])
    options = decoding_options("greedy", max_new_tokens=int(TOKENS))
    response = library_chat.chat(_image(setup["image"]), QUESTION, **options)
    expected = library_chat.processor.tokenizer.unescape(response.answer)
    assert expected.strip()
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("extra", [[], ["--decode-mode", "static"]])
def test_chat_beam_prints_the_original_search_answer(setup, library_chat, run_main, extra):
    result = _ok(run_main("chat", setup["chat_dir"], QUESTION, "--image", setup["image"], "--max-new-tokens", TOKENS,
                          *extra))
    response = library_chat.chat(_image(setup["image"]), QUESTION, max_new_tokens=int(TOKENS))
    assert result.stdout == library_chat.processor.tokenizer.unescape(response.answer) + "\n"


def test_chat_session_keeps_history_and_switches_images(setup, library_chat):
    result = _ok(setup["runs"]["chat_session"])
    session = ChatSession(library_chat, _image(setup["image"]), **decoding_options("greedy",
                                                                                   max_new_tokens=int(TOKENS)))
    first, second = session.ask(QUESTION), session.ask(FOLLOW_UP)
    assert session.context.count("User: ") == 2
    session.set_image(_image(setup["other"]))
    third = session.ask(QUESTION)
    assert result.stdout.splitlines() == [first, second, third]
    assert second != library_chat.processor.tokenizer.unescape(
        library_chat.chat(_image(setup["image"]), FOLLOW_UP, **decoding_options("greedy",
                                                                                 max_new_tokens=int(TOKENS))).answer)
    assert "missing.png not found" in result.stderr  # a bad turn is reported, the session goes on


@pytest.mark.parametrize("extra, fragment", [
    (["q", "--greedy", "--sample"], "--sample"),
    (["q", "--greedy", "--num-beams", "2"], "--num-beams 2"),
    (["q", "--sample", "--decode-mode", "static"], "--decode-mode applies to the original beam search"),
    (["q", "--decode-mode", "graph"], "invalid choice"),
    (["q", "r"], "unrecognized arguments: r ("),
    (["q", "--dtype", "float64"], "invalid choice"),
    (["q", "--max-new-tokens", "0"], "at least 1"),
    (["   "], "question is empty"),
])
def test_chat_usage_error(setup, run_main, extra, fragment):
    _one_line_error(run_main("chat", setup["chat_dir"], "--image", setup["image"], *extra), 2, fragment)


@pytest.mark.parametrize("model, fragment", [
    ("no-such-model", "no-such-model not found"),
    ("paint", "is a VisCPM-Paint pipeline folder; use `viscpm paint"),
    ("image", "is a file, not a converted VisCPM-Chat folder"),
])
def test_chat_wrong_model(setup, run_main, model, fragment):
    path = {"paint": setup["paint_dir"], "image": setup["image"]}.get(model, setup["root"] / model)
    _one_line_error(run_main("chat", path, "--image", setup["image"], "q"), 1, fragment)


def test_chat_missing_image(setup):
    _one_line_error(setup["runs"]["chat_missing"], 1, "missing.png not found")


def test_debug_shows_the_traceback(setup, run_main):
    bad = setup["root"] / "not-an-image.png"
    _one_line_error(run_main("chat", setup["chat_dir"], "--image", bad, "q"), 1, "not an image")
    result = run_main("--debug", "chat", setup["chat_dir"], "--image", bad, "q")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not an image" in result.stderr


# ------------------------------------------------------------------------------------------------------------ paint


def test_paint_writes_the_pipeline_pictures(setup):
    result = _ok(setup["runs"]["paint"])
    root = setup["root"]
    paths = [root / "cat-1.png", root / "cat-2.png"]
    assert [f"wrote {path}" for path in paths] == result.stdout.splitlines()
    assert "painting" in result.stderr and "100%" in result.stderr  # the progress bar
    pipe = load_paint(str(setup["paint_dir"]), device="cpu", progress=False)
    images, flagged = paint_images(pipe, "一只猫 <cat>", "模糊", steps=3, seed=7, size=32, num_images=2)
    assert flagged == [False, False]
    for path, image in zip(paths, images):
        written = np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.int16)
        assert written.shape == (32, 32, 3)
        assert np.abs(written - np.asarray(image, dtype=np.int16)).max() <= 1
    assert not np.array_equal(np.asarray(PIL.Image.open(paths[0])), np.asarray(PIL.Image.open(paths[1])))


def test_paint_usage_error(setup, run_main):
    _one_line_error(run_main("paint", setup["paint_dir"], "a cat", "--size", "30"), 2, "multiple of 8")
    _one_line_error(run_main("paint", setup["paint_dir"], "a cat", "-o", "x.bmpx"), 2, "unknown image extension")
    _one_line_error(run_main("paint", setup["paint_dir"]), 2, "PROMPT")


def test_paint_missing_model(setup, run_main):
    line = _one_line_error(run_main("paint", setup["root"] / "no-such-model", "a cat", "-o", "x.png"), 1,
                           "no-such-model not found", "viscpm convert paint")
    assert "viscpm demo" in line
    _one_line_error(run_main("paint", setup["paint_dir"], "a cat", "-o", setup["root"] / "nowhere" / "x.png"), 1,
                    "does not exist")
    assert not (setup["root"] / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------- convert


def test_convert_runs_the_converter(setup, library_chat):
    result = _ok(setup["runs"]["convert"])
    output = setup["root"] / "converted"
    assert f"wrote {output}" in result.stdout
    assert "dropping vpm.mim_head.weight" in result.stderr
    converted = load_chat(str(output), device="cpu")
    ours = dict(library_chat.model.state_dict())
    for name, tensor in converted.model.state_dict().items():
        torch.testing.assert_close(tensor, ours[name], rtol=0, atol=0)


def test_convert_usage_error(setup, run_main):
    _one_line_error(run_main("convert", "chat", "--output-dir", "converted2"), 2, "--checkpoint",
                    "viscpm convert chat --help")


def test_convert_missing_checkpoint(setup, run_main):
    args = setup["convert_args"][2:]
    _one_line_error(run_main("convert", "chat", *args, "--checkpoint", setup["root"] / "missing.pt",
                             "--output-dir", setup["root"] / "converted3"), 1, "missing.pt")
    assert not (setup["root"] / "converted3").exists()


# ------------------------------------------------------------------------------------------------------------- demo


def test_demo_usage_error(run_main):
    _one_line_error(run_main("demo", "--steps", "0"), 2, "--steps")


def test_demo_missing_vocabulary(setup, run_main):
    _one_line_error(run_main("demo", "--output-dir", setup["root"] / "demo2", "--vocab-file",
                             setup["root"] / "missing-bee.txt"), 1, "missing-bee.txt not found")


def test_demo_refuses_a_foreign_folder(setup, run_main):
    foreign = setup["root"] / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _one_line_error(run_main("demo", "--output-dir", foreign), 1, "not empty")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------------------------- push


def test_push_dry_run_and_errors(setup, run_main):
    result = _ok(run_main("push", "--help"))
    assert "usage: viscpm push" in result.stdout
    result = _ok(run_main("push", setup["chat_dir"], "someone/viscpm-chat-tiny", "--dry-run"))
    assert "model.safetensors" in result.stdout and "config.json" in result.stdout
    usage = run_main("push")
    assert usage.returncode == 2 and "folder, repo_id" in usage.stderr
    _one_line_error(run_main("push", setup["root"] / "nothing", "someone/x", "--dry-run"), 1, "nothing not found")
