"""What a terminal shows of a command's stderr: the apps' tests count its lines."""

import re

PROGRESS_BAR = re.compile(r"^(Loading pipeline components\.\.\.|Loading weights|painting): +\d+%\|")
"""The progress bars the commands show while they load and paint."""
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor for nested bars


def shown_lines(stderr: str) -> list[str]:
    """The lines a terminal shows of ``stderr`` (each after its last carriage return), without Python's import
    log (PYTHONPROFILEIMPORTTIME)."""
    lines = [_ESCAPE.sub("", line).rsplit("\r", 1)[-1].strip() for line in stderr.split("\n")]
    return [line for line in lines if line and not line.startswith("import time:")]


def messages(stderr: str) -> list[str]:
    """`shown_lines` without the progress bars: what the command said."""
    return [line for line in shown_lines(stderr) if not PROGRESS_BAR.match(line)]
