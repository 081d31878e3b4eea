"""Without the upstream test folder the conformance tests fail, naming where they looked; they never skip."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import upstream

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]


def test_missing_folder_is_an_error_naming_every_place(tmp_path, monkeypatch):
    monkeypatch.delenv("VISCPM_HF_UPSTREAM_TESTS", raising=False)
    monkeypatch.setattr(upstream, "_REPO", tmp_path / "repo")
    monkeypatch.setattr(upstream, "SHARED_LOCATION", tmp_path / "shared-default")
    with pytest.raises(RuntimeError) as caught:
        upstream._locate()
    message = str(caught.value)
    for place in (str(tmp_path / "shared" / "hf-upstream-tests"), str(tmp_path / "shared-default"),
                  "VISCPM_HF_UPSTREAM_TESTS"):
        assert place in message, message


def test_the_environment_variable_decides_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("VISCPM_HF_UPSTREAM_TESTS", str(upstream.UPSTREAM))
    assert upstream._locate() == upstream.UPSTREAM
    monkeypatch.setenv("VISCPM_HF_UPSTREAM_TESTS", str(tmp_path))  # asked for explicitly: no other folder is used
    with pytest.raises(RuntimeError, match=str(tmp_path)):
        upstream._locate()


def test_conformance_run_fails_without_the_folder(tmp_path):
    env = {**os.environ, "VISCPM_HF_UPSTREAM_TESTS": str(tmp_path / "nowhere")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(HERE / "test_cpmbee_conformance.py")],
                            capture_output=True, text=True, timeout=300, cwd=REPOSITORY, env=env)
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 5), output[-3000:]  # 5: nothing collected; never a pass or a skip
    assert "were not found" in output and str(tmp_path / "nowhere") in output
    assert "skipped" not in output.strip().splitlines()[-1]
