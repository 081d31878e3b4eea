""".ci/run's two uses: `bash .ci/run COMMAND` (the README's main job, `viscpm demo`) installs no browser; the test
run installs Debian's chromium and fonts-noto-cjk when they are missing, then runs exactly `python -m pytest -q`.

The script runs for real against a prepared environment: a venv folder whose stamp matches the current
setup.py and .ci/run (so it is reused, not rebuilt) and whose `python` records its arguments, with `apt-get`,
`dpkg-query` and `chromium` stand-ins on a PATH that holds only the tools the script uses.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ["bash", "cat", "cut", "dirname", "sha256sum", "mkdir", "rm", "echo", "env"]


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def ci(tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in TOOLS:
        os.symlink(shutil.which(tool), tools / tool)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stamp = hashlib.sha256((REPO / "setup.py").read_bytes() + (REPO / ".ci" / "run").read_bytes()).hexdigest()
    (venv / ".viscpm-ready").write_text(stamp + "\n")
    log = tmp_path / "calls.log"
    _script(venv / "bin" / "python", f'echo "python $*" >> {log}\n')
    _script(tools / "apt-get", f'echo "apt-get $*" >> {log}\n')

    def run(*command, installed=()):
        for name in ("chromium", "dpkg-query"):
            (tools / name).unlink(missing_ok=True)
        if "chromium" in installed:
            _script(tools / "chromium", "exit 0\n")
        status = "install ok installed" if "fonts-noto-cjk" in installed else "unknown ok not-installed"
        _script(tools / "dpkg-query", f'printf "{status}"\n')
        log.write_text("")
        env = {"PATH": str(tools), "VISCPM_CI_VENV": str(venv), "HOME": str(tmp_path)}
        result = subprocess.run(["bash", str(REPO / ".ci" / "run"), *command], capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "reusing the complete venv" in result.stdout
        return result, log.read_text().splitlines()

    return run


def test_a_command_installs_no_browser(ci):
    result, calls = ci("echo", "the main job")
    assert result.stdout.splitlines()[-1] == "the main job"
    assert calls == []


def test_the_test_run_installs_the_browser_and_fonts_then_runs_pytest(ci):
    _, calls = ci()
    assert calls[0] == "apt-get update -qq"
    assert calls[1].startswith("apt-get install") and calls[1].endswith(" chromium fonts-noto-cjk")
    assert calls[2:] == ["python -m pytest -q"]


def test_the_test_run_installs_only_what_is_missing(ci):
    _, calls = ci(installed=("chromium",))
    assert calls[1].endswith("--no-install-recommends fonts-noto-cjk")
    _, calls = ci(installed=("chromium", "fonts-noto-cjk"))
    assert calls == ["python -m pytest -q"]
