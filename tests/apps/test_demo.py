"""The README's main job, `viscpm demo` (`bash .ci/run viscpm demo` in CI's environment), run as a user runs it:
the console script in a fresh process. Also `examples/cpmbee_demo.py`, the CPM-Bee-only demo the README names
next to it."""

import os
import subprocess
import sys
from pathlib import Path

import PIL.Image

from viscpm.apps.common import load_chat
from viscpm.apps.demo import RANDOM_NOTE

VISCPM = Path(sys.executable).with_name("viscpm")
CPMBEE_DEMO = Path(__file__).resolve().parents[2] / "examples" / "cpmbee_demo.py"


def _run(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_viscpm_demo_builds_converts_paints_and_chats(tmp_path, vocab_file):
    result = _run(VISCPM, "demo", "--output-dir", tmp_path / "demo", "--vocab-file", vocab_file, "--steps", "2",
                  "--max-new-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    demo = tmp_path / "demo"
    assert RANDOM_NOTE in result.stdout
    for name in ("original/chat/viscpm_chat_tiny.pt", "original/paint/viscpm_paint_tiny.pt",
                 "viscpm-chat-tiny/config.json", "viscpm-chat-tiny/processor_config.json",
                 "viscpm-paint-tiny/model_index.json", "painting.png", "chat.txt"):
        assert (demo / name).is_file(), name
    assert PIL.Image.open(demo / "painting.png").size == (64, 64)
    transcript = (demo / "chat.txt").read_text(encoding="utf-8")
    assert "RANDOM" in transcript and transcript.count("User: ") == 2 and transcript.count("AI: ") == 2
    # What it printed is what the converted folder answers about the painting it wrote.
    chat = load_chat(str(demo / "viscpm-chat-tiny"), device="cpu")
    question = transcript.split("User: ")[1].split("\n")[0]
    answer = chat.processor.tokenizer.unescape(
        chat.chat(PIL.Image.open(demo / "painting.png").convert("RGB"), question, max_new_tokens=4).answer)
    assert f"AI: {answer}\n" in transcript


def test_cpmbee_demo_builds_reloads_and_answers(tmp_path, vocab_file):
    result = _run(sys.executable, CPMBEE_DEMO, "--output-dir", tmp_path / "tiny", "--vocab-file", vocab_file,
                  "--max-new-tokens", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "config.json").is_file() and (tmp_path / "tiny" / "vocab.txt").is_file()
    answer = [line for line in result.stdout.splitlines() if line.startswith("answer: ")]
    assert answer and len(answer[0]) > len('answer: ""')
    assert "weights are random" in result.stdout

    # The same folder, given as a "real" model: no rebuild, and no note about random weights.
    again = _run(sys.executable, CPMBEE_DEMO, "--model", tmp_path / "tiny", "--max-new-tokens", "5", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "built a tiny" not in again.stdout and "weights are random" not in again.stdout
    assert [line for line in again.stdout.splitlines() if line.startswith("answer: ")] == answer


def test_cpmbee_demo_errors_are_one_line(tmp_path):
    result = _run(sys.executable, CPMBEE_DEMO, "--model", tmp_path / "missing", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no config.json" in result.stderr
    assert "Traceback" not in result.stderr
