"""The conformance tests run against the transformers/diffusers releases the upstream copies belong to; with other
releases installed they fail with one line that names both versions and the fix, not an ImportError deep in
upstream code."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conformance import releases

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]


def test_installed_releases_are_the_upstream_copies_releases():
    message = releases.mismatch_message()
    if message:
        raise AssertionError(message) from None


def test_the_pins_and_the_upstream_readme_agree():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPOSITORY / ".ci" / "constraints.txt").read_text(), re.M))
    for name, release in releases.UPSTREAM_RELEASES.items():
        assert pins[name] == release, (name, pins[name], release)
    import upstream

    readme = (upstream.UPSTREAM / "README.md").read_text()
    assert f"transformers-{releases.UPSTREAM_RELEASES['transformers']}.tar.gz" in readme
    assert f"the {releases.UPSTREAM_RELEASES['diffusers']} sdist" in readme


def test_mismatch_message_names_both_versions_and_the_fix():
    assert releases.mismatch_message(dict(releases.UPSTREAM_RELEASES)) is None
    message = releases.mismatch_message({"transformers": "5.25.0", "diffusers": "0.42.1"})
    assert message == ("tests/conformance: transformers 5.25.0 is installed, but the upstream test copies belong to "
                       "transformers 5.24.0; " + releases.FIX)
    both = releases.mismatch_message({"transformers": "5.25.0", "diffusers": None})
    assert "transformers 5.25.0" in both and "diffusers (not installed) is installed" in both and "0.42.1" in both


_FAKE_RELEASE = """
import importlib.metadata
_real = importlib.metadata.version
def _version(name):
    return "5.25.0" if name == "transformers" else _real(name)
importlib.metadata.version = _version
"""


def test_a_conformance_run_with_another_release_fails_in_one_line(tmp_path):
    """The whole folder, with transformers reported as 5.25.0 (a plugin loaded before the conftest; this test itself
    deselected): one failed test whose message is the line; upstream's modules are not imported."""
    (tmp_path / "fake_release.py").write_text(textwrap.dedent(_FAKE_RELEASE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fake_release", "-p", "no:cacheprovider",
                             "-k", "not test_a_conformance_run", str(HERE)],
                            capture_output=True, text=True, timeout=300, cwd=REPOSITORY, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    expected = releases.mismatch_message({**releases.installed_releases(), "transformers": "5.25.0"})
    assert f"AssertionError: {expected}" in output, output[-3000:]
    assert "ImportError" not in output and "tests.test_modeling_common" not in output
    assert re.search(r"^1 failed, 2 passed, 1 deselected in ", output.strip().splitlines()[-1]), output[-1000:]
