"""Where the ecosystem's own common tests are: transformers' and diffusers' test mixins, run from outside the repo.

The folder (see its README) is looked up in this order: the environment variable ``VISCPM_HF_UPSTREAM_TESTS``,
``<repo>/../shared/hf-upstream-tests``, ``/work/shared/hf-upstream-tests``. Importing this module puts its
``transformers/`` folder first on ``sys.path`` (upstream's ``tests`` package, e.g. ``tests.test_tokenization_common``)
and the folder itself on ``sys.path`` (``hf_diffusers_tests``). ``UPSTREAM`` is the folder. If none of the places
holds it, importing fails with an error naming them: conformance tests never skip silently.
"""

import contextlib
import importlib
import os
import sys
from pathlib import Path
from unittest import mock


_REPO = Path(__file__).resolve().parents[2]
SHARED_LOCATION = Path("/work/shared/hf-upstream-tests")


def _candidates() -> list[Path]:
    places = []
    if os.environ.get("VISCPM_HF_UPSTREAM_TESTS"):
        places.append(Path(os.environ["VISCPM_HF_UPSTREAM_TESTS"]).expanduser())
    places += [_REPO.parent / "shared" / "hf-upstream-tests", SHARED_LOCATION]
    return places


def _locate() -> Path:
    places = _candidates()
    if os.environ.get("VISCPM_HF_UPSTREAM_TESTS"):
        places = places[:1]  # asked for explicitly: that folder or an error, never another one
    for place in places:
        if (place / "transformers" / "tests").is_dir():
            return place.resolve()
    raise RuntimeError(
        "the upstream common tests (transformers/diffusers test mixins) were not found; looked in: "
        + ", ".join(str(place) for place in places)
        + ". Set VISCPM_HF_UPSTREAM_TESTS to the folder that holds transformers/tests and hf_diffusers_tests."
    )


UPSTREAM = _locate()

for _path in (str(UPSTREAM), str(UPSTREAM / "transformers")):
    if _path in sys.path:
        sys.path.remove(_path)
sys.path.insert(0, str(UPSTREAM))
sys.path.insert(0, str(UPSTREAM / "transformers"))

# A `tests` imported from elsewhere (a namespace package made of this repo's own tests folder) would shadow
# upstream's: upstream's files import `tests.*` and their own package by relative imports.
_loaded = sys.modules.get("tests")
if _loaded is not None and not str(getattr(_loaded, "__file__", "") or "").startswith(str(UPSTREAM)):
    for _name in [name for name in sys.modules if name == "tests" or name.startswith("tests.")]:
        del sys.modules[_name]



@contextlib.contextmanager
def model_type_tables(model_type: str, **classes: str):
    """Add ``model_type`` to transformers' static class tables while the block runs, e.g.
    ``model_type_tables("cpmbee", MODEL_MAPPING_NAMES="CpmBeeModel")``: upstream tests read a model's role (base
    model, causal LM, ...) from them, and run-time ``Auto*.register`` does not fill them."""
    auto = importlib.import_module("transformers.models.auto.modeling_auto")
    with contextlib.ExitStack() as stack:
        for table, class_name in classes.items():
            stack.enter_context(mock.patch.dict(getattr(auto, table), {model_type: class_name}))
        yield


class UpstreamTables:
    """unittest mixin: `model_type_tables` (``cls.model_type``, ``cls.model_tables``) for the whole test class."""

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


__all__ = ["UPSTREAM", "UpstreamTables", "model_type_tables"]
