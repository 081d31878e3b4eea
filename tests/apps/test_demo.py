"""The README's main job, `examples/cpmbee_demo.py`, run as a user runs it."""

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "cpmbee_demo.py"


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_demo_builds_reloads_and_answers(tmp_path, vocab_file):
    result = _run("--output-dir", str(tmp_path / "tiny"), "--vocab-file", vocab_file, "--max-new-tokens", "5",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "config.json").is_file() and (tmp_path / "tiny" / "vocab.txt").is_file()
    answer = [line for line in result.stdout.splitlines() if line.startswith("answer: ")]
    assert answer and len(answer[0]) > len('answer: ""')
    assert "weights are random" in result.stdout

    # The same folder, given as a "real" model: no rebuild, and no note about random weights.
    again = _run("--model", str(tmp_path / "tiny"), "--max-new-tokens", "5", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "built a tiny" not in again.stdout and "weights are random" not in again.stdout
    assert [line for line in again.stdout.splitlines() if line.startswith("answer: ")] == answer


def test_demo_errors_are_one_line(tmp_path):
    result = _run("--model", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no config.json" in result.stderr
    assert "Traceback" not in result.stderr
