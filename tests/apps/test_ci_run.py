""".ci/run's two uses: `bash .ci/run COMMAND` (the README's main job, `viscpm demo`) installs no browser; the test
run installs Debian's chromium and fonts-noto-cjk when they are missing, then runs exactly `python -m pytest -q`.

The script runs for real against a prepared environment: a venv folder whose stamp matches the current
setup.py, .ci/run, .ci/constraints.txt and version mode (so it is reused, not rebuilt) and whose `python` records its
arguments, with `apt-get`, `dpkg-query` and `chromium` stand-ins on a PATH that holds only the tools the script uses.
Under CI=true the venv is built anew by a stand-in `python3`, and every install must take the pinned versions.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ["bash", "cat", "cut", "dirname", "sha256sum", "mkdir", "rm", "echo", "env", "chmod"]  # chmod: python3's stand-in


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
    stamped = ("setup.py", ".ci/run", ".ci/constraints.txt")
    stamp = hashlib.sha256(b"".join((REPO / name).read_bytes() for name in stamped) + b"pinned\n").hexdigest()
    (venv / ".viscpm-ready").write_text(stamp + "\n")
    log = tmp_path / "calls.log"
    recorder = f'echo "python $*" >> {log}\n'
    _script(venv / "bin" / "python", recorder)
    _script(tools / "apt-get", f'echo "apt-get $*" >> {log}\n')
    # the interpreter a fresh venv is made with: `python3 -m venv DIR` makes DIR/bin/python the recorder
    _script(tools / "python3", f'[ "$1 $2" = "-m venv" ] && mkdir -p "$3/bin" && cat > "$3/bin/python" <<'
                               f"'END'\n#!/bin/bash\n{recorder}END\nchmod +x \"$3/bin/python\"\n")

    def run(*command, installed=(), fresh_env=None):
        for name in ("chromium", "dpkg-query"):
            (tools / name).unlink(missing_ok=True)
        if "chromium" in installed:
            _script(tools / "chromium", "exit 0\n")
        status = "install ok installed" if "fonts-noto-cjk" in installed else "unknown ok not-installed"
        _script(tools / "dpkg-query", f'printf "{status}"\n')
        log.write_text("")
        env = {"PATH": str(tools), "VISCPM_CI_VENV": str(venv), "HOME": str(tmp_path), **(fresh_env or {})}
        result = subprocess.run(["bash", str(REPO / ".ci" / "run"), *command], capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert ("creating a fresh venv" if fresh_env else "reusing the complete venv") in result.stdout
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


def test_ci_installs_every_package_from_the_constraints_file(ci):
    result, calls = ci("echo", "done", fresh_env={"CI": "true"})
    installs = [call for call in calls if call.startswith("python -m pip install")]
    assert len(installs) == 3, calls
    pin = f"-c {REPO / '.ci' / 'constraints.txt'} "
    assert all(pin in call for call in installs), installs
    assert "(pinned versions)" in result.stdout


def test_latest_mode_ignores_the_constraints_and_does_not_reuse_a_pinned_venv(ci):
    result, calls = ci("echo", "done", fresh_env={"VISCPM_CI_LATEST": "1"})  # the venv's stamp is the pinned one's
    installs = [call for call in calls if call.startswith("python -m pip install")]
    assert len(installs) == 3 and not any("constraints.txt" in call for call in installs), installs
    assert "(latest versions)" in result.stdout


def test_the_constraints_pin_every_requirement_of_the_package_and_its_extras():
    """A requirement without a pin would float: CI would install whatever is newest that day."""
    import ast
    import re

    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    settings = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords
                if keyword.arg in ("install_requires", "extras_require")}
    requirements = settings["install_requires"] + [r for extra in settings["extras_require"].values() for r in extra]
    names = {re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
             for requirement in requirements}
    pinned = {line.split("==")[0].lower().replace("_", "-")
              for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines()
              if line and not line.startswith("#") and "==" in line}
    assert sorted(names - pinned) == []
