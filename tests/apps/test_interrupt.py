"""Ctrl-C (a real SIGINT to the console script) ends any command with one line, `interrupted`, exit status 130, and
no partial output (issue 16): during the imports, while loading, in the middle of a streamed answer, while painting.
(`viscpm serve` is interrupted at the end of test_web.py.)

Each case waits for its moment in what the command writes: Python's import log (PYTHONPROFILEIMPORTTIME, filtered
out of stderr before the check), the streamed answer on stdout, the painting progress bar on stderr. Progress
bars are what the command showed before the interrupt; the interrupt itself adds one line.
"""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from terminal import messages, shown_lines

VISCPM = Path(sys.executable).with_name("viscpm")


class Running:
    """A command in a subprocess, its stdout and stderr collected as they come."""

    def __init__(self, argv, cwd, import_log=False):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PYTHONPROFILEIMPORTTIME": "1"} if import_log else {})}
        self.process = subprocess.Popen([str(arg) for arg in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        cwd=cwd, env=env)
        self.data = {"stdout": b"", "stderr": b""}
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(name, getattr(self.process, name)), daemon=True)
                        for name in self.data]
        for reader in self.readers:
            reader.start()

    def _read(self, name, stream):
        while chunk := os.read(stream.fileno(), 65536):
            with self.changed:
                self.data[name] += chunk
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def text(self, name):
        return self.data[name].decode("utf-8", "replace")

    def wait_for(self, name, pattern):
        """Block until ``pattern`` shows in ``name`` (the command still running)."""
        with self.changed:
            self.changed.wait_for(lambda: re.search(pattern, self.text(name), re.M) or self.process.poll() is not None,
                                  timeout=240)
        assert re.search(pattern, self.text(name), re.M), f"{pattern!r} never came:\n{self.text('stderr')[-3000:]}"
        assert self.process.poll() is None, f"it ended first:\n{self.text('stderr')[-3000:]}"

    def interrupt(self):
        self.process.send_signal(signal.SIGINT)
        status = self.process.wait(timeout=120)
        for reader in self.readers:
            reader.join(timeout=30)
        return status


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("interrupt")
    chat_dir, paint_dir = tiny_models
    image = root / "picture.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    return {"root": root, "chat": [VISCPM, "chat", chat_dir, "--image", image, "Tell me everything.", "--greedy",
                                   "--max-new-tokens", "5000"],
            "paint": [VISCPM, "paint", paint_dir, "一只猫", "--steps", "500", "--size", "32", "--seed", "1"]}


def _check(running, status):
    assert status == 130, running.text("stderr")[-3000:]
    assert messages(running.text("stderr")) == ["interrupted"], shown_lines(running.text("stderr"))
    assert shown_lines(running.text("stderr"))[-1] == "interrupted"


def test_during_the_imports(setup):
    running = Running(setup["chat"], setup["root"], import_log=True)
    running.wait_for("stderr", r"\|\s+torch\._C$")  # torch is half loaded
    _check(running, running.interrupt())
    assert "viscpm.apps.cli" not in imported(running.text("stderr"))  # it came before the command line loaded
    assert running.text("stdout") == ""


def test_while_loading_the_model(setup):
    running = Running(setup["chat"], setup["root"], import_log=True)
    running.wait_for("stderr", r"\|\s+viscpm\.chat$")  # load_chat has begun
    _check(running, running.interrupt())
    assert running.text("stdout") == ""  # no answer had begun


def test_during_a_streamed_answer(setup):
    running = Running(setup["chat"], setup["root"])
    running.wait_for("stdout", r"\S")
    _check(running, running.interrupt())
    assert "terminate called" not in running.text("stderr")
    assert running.text("stdout").endswith("\n")  # the answer's line is ended


def test_while_painting(setup, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    running = Running([*setup["paint"], "-o", output / "cat.png", "--num-images", "2"], setup["root"])
    running.wait_for("stderr", r"painting: +\d+%\|[^\r\n]*\| [1-9]\d*/500")  # a few steps done
    _check(running, running.interrupt())
    assert list(output.iterdir()) == []  # no picture, no temporary file
    assert running.text("stdout") == ""
