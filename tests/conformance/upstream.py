"""Locate and import the ecosystem's own common tests (transformers' and diffusers' test mixins), which the
conformance tests run against our classes. They are not copied into this repository: they live in a folder beside
it (see its README for provenance), found through, in order,

1. the environment variable ``VISCPM_HF_UPSTREAM_TESTS``,
2. ``<repository>/../shared/hf-upstream-tests``,
3. ``/work/shared/hf-upstream-tests``.

Without that folder the conformance tests fail (they never skip) with a message that lists where they looked.

transformers' files import each other as the package ``tests`` (``tests.generation.test_utils``, ...); this
repository's own test folder is also called ``tests`` but is not a package, so the upstream folder is put first on
``sys.path`` and any other ``tests`` module already imported is dropped first. diffusers' files are a package of
their own (``hf_diffusers_tests``, relative imports only).
"""

import contextlib
import importlib
import os
import sys
from pathlib import Path
from unittest import mock

ENVIRONMENT_VARIABLE = "VISCPM_HF_UPSTREAM_TESTS"
REPOSITORY = Path(__file__).resolve().parents[2]
SHARED_LOCATION = Path("/work/shared/hf-upstream-tests")
_MARKER = Path("transformers") / "tests" / "test_modeling_common.py"


class UpstreamTestsNotFound(RuntimeError):
    """The folder with the upstream test mixins is not where the conformance tests look for it."""


def candidates() -> list[Path]:
    """Where the upstream tests are looked for, in order."""
    found = []
    if os.environ.get(ENVIRONMENT_VARIABLE):
        found.append(Path(os.environ[ENVIRONMENT_VARIABLE]))
    found += [REPOSITORY.parent / "shared" / "hf-upstream-tests", SHARED_LOCATION]
    return found


def upstream_root() -> Path:
    """The upstream test folder; `UpstreamTestsNotFound` (naming every place looked in) when there is none."""
    places = candidates()
    for place in places:
        if (place / _MARKER).is_file():
            return place
    looked = "\n".join(f"  - {place}" for place in places)
    raise UpstreamTestsNotFound(
        f"the upstream transformers/diffusers test mixins were not found; looked for {_MARKER} under:\n{looked}\n"
        f"Set {ENVIRONMENT_VARIABLE} to the folder that holds transformers/ and hf_diffusers_tests/."
    )


def import_upstream(module: str):
    """Import ``module`` from the upstream folder: ``tests.*`` names are transformers' test package,
    ``hf_diffusers_tests.*`` diffusers'."""
    root = upstream_root()
    folder = root / "transformers" if module == "tests" or module.startswith("tests.") else root
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    loaded = sys.modules.get("tests")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "/").parent != folder / "tests":
        for name in [name for name in sys.modules if name == "tests" or name.startswith("tests.")]:
            del sys.modules[name]
    return importlib.import_module(module)


class UpstreamTables:
    """unittest mixin: ``model_type_tables(cls.model_type, **cls.model_tables)`` for the duration of the test class
    (upstream tests read a model's role from transformers' static class tables)."""

    model_type: str = ""
    model_tables: dict = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tables = model_type_tables(cls.model_type, **cls.model_tables)
        cls._tables.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls._tables.__exit__(None, None, None)
        super().tearDownClass()


@contextlib.contextmanager
def model_type_tables(model_type: str, **classes: str):
    """Add ``model_type`` to transformers' static class tables for the duration of a test class, e.g.
    ``model_type_tables("cpmbee", MODEL_MAPPING_NAMES="CpmBeeModel")``: upstream tests read a model's role (base
    model, causal LM, ...) from them, and run-time ``Auto*.register`` does not fill them."""
    auto = importlib.import_module("transformers.models.auto.modeling_auto")
    with contextlib.ExitStack() as stack:
        for table, class_name in classes.items():
            stack.enter_context(mock.patch.dict(getattr(auto, table), {model_type: class_name}))
        yield
