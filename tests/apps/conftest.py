import io
import subprocess
import sys

import pytest

from viscpm.apps.demo import build_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, vocab_file):
    """(chat folder, paint folder): tiny converted VisCPM-Chat and VisCPM-Paint (`viscpm demo`'s, seed 2), built
    once for the apps' tests that need some models, not particular ones."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"), vocab_file, seed=2)


@pytest.fixture
def cli_main(capsys, monkeypatch):
    """``cli_main(cwd, *argv, stdin=None)``: `viscpm.apps.cli.main` run in-process in the folder ``cwd`` (stdin a
    text when given), as a `subprocess.CompletedProcess` (returncode, stdout, stderr)."""
    from viscpm.apps.cli import main

    def run(cwd, *argv, stdin=None):
        monkeypatch.chdir(cwd)
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        argv = [str(arg) for arg in argv]
        status = main(argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, status, out, err)

    return run
