"""Where the ecosystem's own common tests are (transformers' and diffusers', unchanged upstream copies): found on
import and put on ``sys.path``, never copied into this repository.

The folder is the first of: the environment variable ``VISCPM_HF_UPSTREAM_TESTS``, ``<repo>/../shared/hf-upstream-tests``,
``/work/shared/hf-upstream-tests``. Its ``transformers/`` goes first on ``sys.path`` (its ``tests`` package holds
``ModelTesterMixin`` and friends), and the folder itself too (diffusers' tests import as ``hf_diffusers_tests``).
Without the folder, importing this module is an error that says where it looked: the conformance tests never skip
silently.
"""

import os
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def _locate() -> Path:
    candidates = []
    if os.environ.get("VISCPM_HF_UPSTREAM_TESTS"):
        candidates.append(Path(os.environ["VISCPM_HF_UPSTREAM_TESTS"]))
    candidates += [_REPO.parent / "shared" / "hf-upstream-tests", Path("/work/shared/hf-upstream-tests")]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise RuntimeError(
        "the upstream transformers/diffusers tests are not found; looked in: "
        + ", ".join(map(str, candidates))
        + ". Set VISCPM_HF_UPSTREAM_TESTS to the hf-upstream-tests folder (see its README)"
    )


UPSTREAM = _locate()

for _path in (str(UPSTREAM), str(UPSTREAM / "transformers")):  # transformers/ ends up first
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

__all__ = ["UPSTREAM"]
