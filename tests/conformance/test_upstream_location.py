"""Without the upstream test folder the conformance tests fail, naming where they looked; they never skip."""

import subprocess
import sys
from pathlib import Path

import pytest
import upstream

REPOSITORY = Path(__file__).resolve().parents[2]


def test_missing_folder_is_an_error_naming_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv(upstream.ENVIRONMENT_VARIABLE, str(tmp_path / "from-env"))
    monkeypatch.setattr(upstream, "REPOSITORY", tmp_path / "repo")
    monkeypatch.setattr(upstream, "SHARED_LOCATION", tmp_path / "shared-default")
    with pytest.raises(upstream.UpstreamTestsNotFound) as caught:
        upstream.upstream_root()
    message = str(caught.value)
    for place in ("from-env", str(tmp_path / "shared" / "hf-upstream-tests"), "shared-default",
                  upstream.ENVIRONMENT_VARIABLE):
        assert place in message, message


def test_the_environment_variable_comes_first(tmp_path, monkeypatch):
    root = upstream.upstream_root()
    monkeypatch.setenv(upstream.ENVIRONMENT_VARIABLE, str(root))
    assert upstream.candidates()[0] == root and upstream.upstream_root() == root
    monkeypatch.setenv(upstream.ENVIRONMENT_VARIABLE, str(tmp_path))  # not a test folder: the next place is used
    assert upstream.upstream_root() != tmp_path


_RUN_WITHOUT_FOLDER = """
import sys
from pathlib import Path
sys.path.insert(0, {here!r})
import upstream
upstream.candidates = lambda: [Path("/nonexistent/first"), Path("/nonexistent/second")]
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", {target!r}]))
"""


def test_conformance_run_fails_without_the_folder():
    here = str(Path(__file__).resolve().parent)
    code = _RUN_WITHOUT_FOLDER.format(here=here, target=str(Path(here) / "test_cpmbee_conformance.py"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=REPOSITORY)
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 5), output[-3000:]  # 5: nothing collected; never a pass or a skip
    assert "UpstreamTestsNotFound" in output and "/nonexistent/first" in output and "/nonexistent/second" in output
    assert "skipped" not in output.splitlines()[-1]
