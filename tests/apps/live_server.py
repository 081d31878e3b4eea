"""Start a real `viscpm` server command in a subprocess on a free 127.0.0.1 port, and stop it (the apps' tests and
benchmarks/bench_api.py)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], ready_url: str, log_path, cwd, timeout: float = 180, env: dict | None = None
          ) -> subprocess.Popen:
    """Run ``python -m viscpm.apps.cli ARGS`` (output to ``log_path``, ``env`` added to the environment) until
    ``ready_url`` answers 200."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    log = open(log_path, "w+")
    process = subprocess.Popen([sys.executable, "-m", "viscpm.apps.cli", *args], stdout=log,
                               stderr=subprocess.STDOUT, cwd=cwd, env=env)
    process.log = log
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
            log.seek(0)
            raise RuntimeError(f"the server did not start:\n{log.read()[-3000:]}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s; closes the log."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    process.log.close()


def log_text(process: subprocess.Popen) -> str:
    process.log.flush()
    with open(process.log.name, encoding="utf-8", errors="replace") as handle:
        return handle.read()
