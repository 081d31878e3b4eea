"""Start a real `viscpm` server command in a subprocess on a free 127.0.0.1 port, and stop it (the apps' tests and
benchmarks/bench_api.py)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


VISCPM = Path(sys.executable).with_name("viscpm")
"""The console script, as a user runs it."""


def start(args: list[str], ready_url: str, log_path, cwd, timeout: float = 180, env: dict | None = None,
          stderr_path=None) -> subprocess.Popen:
    """Run ``viscpm ARGS`` (output to ``log_path``, stderr to ``stderr_path`` when given, ``env`` added to the
    environment) until ``ready_url`` answers 200."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    log = open(log_path, "w+")
    errors = open(stderr_path, "w+") if stderr_path is not None else None
    process = subprocess.Popen([str(VISCPM), *args], stdout=log, stderr=errors or subprocess.STDOUT, cwd=cwd,
                               env=env)
    process.log, process.errors = log, errors
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            (errors or log).seek(0)
            raise RuntimeError(f"the server did not start:\n{(errors or log).read()[-3000:]}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s; closes the logs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    process.log.close()
    if process.errors is not None:
        process.errors.close()


def log_text(process: subprocess.Popen) -> str:
    process.log.flush()
    with open(process.log.name, encoding="utf-8", errors="replace") as handle:
        return handle.read()
