"""Keeping the original VisCPM out of reach: its packages and tests/oracle.py cannot be imported.

Two uses. conftest.py hides the original while a test that is not marked ``oracle`` runs (`hidden()`), so a test
that uses the original without the mark fails here too, not only where the original is missing. And, loaded as a
pytest plugin, it blocks the original for a whole run, as if it were not installed::

    python -m pytest -p without_original -m "not oracle"

(tests/ must be importable for ``-p``: ``PYTHONPATH=tests``.) What it blocks raises `ModuleNotFoundError`, as a
missing package does; ``importlib.util.find_spec`` raises it too.
"""

import contextlib
import importlib.abc
import sys

ORIGINAL_PACKAGES = ("VisCPM", "torchscale", "fairscale")
"""The original's packages (tests/oracle.py imports them)."""
BLOCKED = (*ORIGINAL_PACKAGES, "oracle")
REASON = "the original VisCPM is out of reach of tests not marked `oracle` (see tests/conftest.py)"


class _Blocker(importlib.abc.MetaPathFinder):
    """A meta-path finder that refuses the original's packages and tests/oracle.py."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} ({REASON})", name=name)
        return None


_FOR_GOOD, _WHILE_HIDDEN = _Blocker(), _Blocker()
_hidden: dict | None = None  # the modules taken out of sys.modules while hidden, else None

GUARDED: set[type] = set()
"""The classes of the original models that shared fixtures hand out (tests/originals.py): while hidden, their
instances refuse every attribute, so a test that uses one without the mark fails as it would without the original."""
_NO_OWN = object()  # a class without its own __getattribute__
_guards: dict = {}


def _refuse(self, name):
    raise RuntimeError(f"{type(self).__name__} is a model of the original VisCPM: {REASON}")


def install() -> None:
    """Block the original for the rest of the process."""
    if _FOR_GOOD not in sys.meta_path:
        sys.meta_path.insert(0, _FOR_GOOD)


def _hide() -> None:
    global _hidden
    _hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if name.partition(".")[0] in BLOCKED}
    sys.meta_path.insert(0, _WHILE_HIDDEN)
    for cls in GUARDED:
        _guards[cls] = cls.__dict__.get("__getattribute__", _NO_OWN)
        cls.__getattribute__ = _refuse


def _show() -> None:
    global _hidden
    for cls, own in _guards.items():
        if own is _NO_OWN:
            del cls.__getattribute__
        else:
            cls.__getattribute__ = own
    _guards.clear()
    sys.meta_path.remove(_WHILE_HIDDEN)
    sys.modules.update(_hidden)
    _hidden = None


@contextlib.contextmanager
def hidden():
    """The original cannot be imported in the block, nor its models of `GUARDED` used (modules already imported are
    put back afterwards)."""
    _hide()
    try:
        yield
    finally:
        _show()


@contextlib.contextmanager
def lifted():
    """Undo `hidden()` inside the block: for the shared fixtures' builders, which take the original when it is
    installed (tests/originals.py)."""
    if _hidden is None:
        yield
        return
    _show()
    try:
        yield
    finally:
        _hide()


def pytest_load_initial_conftests(early_config, parser, args):
    """As a ``-p`` plugin: block the original before conftest.py looks for it."""
    install()
