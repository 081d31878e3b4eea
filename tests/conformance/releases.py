"""The transformers and diffusers releases the upstream test copies belong to, and the check that they are installed.

The copies in ``../shared/hf-upstream-tests`` (see its README) are transformers 5.24.0's sdist tests, and diffusers'
test mixins checked against 0.42.1 (whose sdist ships no pipeline tests). Another release of either breaks them in
ways that say nothing about our models (5.25 removed ``testing_utils.preserve_module_forwards``, which they import),
so tests/conftest.py collects no conformance test while the installed releases differ, only the one
test that fails with `mismatch_message`.
"""

import importlib.metadata

UPSTREAM_RELEASES = {"transformers": "5.24.0", "diffusers": "0.42.1"}
FIX = "install the pinned test environment: pip install -c .ci/constraints.txt -e '.[test,web]' (or bash .ci/run)"


def installed_releases() -> dict[str, str | None]:
    releases = {}
    for name in UPSTREAM_RELEASES:
        try:
            releases[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            releases[name] = None
    return releases


def mismatch_message(installed: dict[str, str | None] | None = None) -> str | None:
    """One line naming each package whose installed release is not the copies' release, and the fix; None if all
    match."""
    installed = installed_releases() if installed is None else installed
    wrong = [f"{name} {installed.get(name) or '(not installed)'} is installed, but the upstream test copies belong to "
             f"{name} {release}" for name, release in UPSTREAM_RELEASES.items() if installed.get(name) != release]
    if not wrong:
        return None
    return "tests/conformance: " + "; ".join(wrong) + f"; {FIX}"
