"""The split between oracle tests and the rest (tests/conftest.py) is honest.

* Collected with the original blocked (`-p without_original`, as on a machine without it), every test module imports
  and yields tests, and every module but the few that only compare with the original keeps tests for
  ``-m "not oracle"``: nothing is lost to a collection error, a module-level skip or a blanket mark.
* While a test that is not marked runs, the original cannot be imported, nor the fixtures' original models used.
* The stand-ins that replace the original's files where it is missing have the original's format (an oracle test).
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import originals
import pytest

TESTS = Path(__file__).resolve().parent
ONLY_ORACLE = {"tests/benchmarks/test_bench_gpu.py"}
"""Modules whose every test compares with the original."""

COLLECT = """
import json, sys
import pytest

class Record:
    def pytest_collection_finish(self, session):
        self.items = [(item.nodeid, item.get_closest_marker("oracle") is not None) for item in session.items]

record = Record()
status = pytest.main(["-p", "without_original", "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[record])
print("RESULT " + json.dumps({"status": int(status), "items": getattr(record, "items", [])}))
"""


def test_suite_collects_without_the_original(tmp_path):
    paths = [str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    run = subprocess.run([sys.executable, "-c", COLLECT], cwd=TESTS.parent, env=env, capture_output=True, text=True,
                         timeout=600)
    result = json.loads(run.stdout.rsplit("RESULT ", 1)[-1]) if "RESULT " in run.stdout else None
    assert result and result["status"] == 0, run.stdout[-3000:] + run.stderr[-3000:]
    modules = {str(path.relative_to(TESTS.parent)) for path in TESTS.rglob("test_*.py")}
    collected, kept = {}, {}
    for nodeid, oracle in result["items"]:
        module = nodeid.split("::", 1)[0]
        collected[module] = collected.get(module, 0) + 1
        kept[module] = kept.get(module, 0) + (not oracle)
    assert set(collected) == modules, f"no tests from {sorted(modules - set(collected))}"
    assert {module for module, count in kept.items() if not count} == ONLY_ORACLE
    total, rest = len(result["items"]), sum(kept.values())
    assert rest > total / 2, f"only {rest} of {total} tests run without the original"


def test_unmarked_tests_cannot_import_the_original():
    for name in ("oracle", "VisCPM", "VisCPM.utils.utils", "torchscale.architecture.config", "fairscale"):
        with pytest.raises(ModuleNotFoundError, match="not marked `oracle`"):
            importlib.import_module(name)


def test_unmarked_tests_cannot_use_the_original_models(chat, paint):
    """The original models of the shared fixtures (or their `Missing` stand-ins) refuse an unmarked test."""
    for original in (chat[0], paint["original"]):
        with pytest.raises(RuntimeError, match="oracle"):
            original.state_dict()


def test_stand_ins_have_the_originals_format(oracle):
    """The stand-in vocabulary has bee.txt's size, special tokens and ASCII at their ids; the stand-in checkpoints
    have the original models' keys and shapes (BEiT-3's pre-training parts, which the converter drops, aside)."""
    from conftest import tiny_unet, tiny_vae
    from diffusers import DDPMScheduler

    from viscpm.conversion.convert_viscpm_chat import CHAT_DROPPED_KEYS

    real = Path(oracle.VOCAB_FILE).read_text(encoding="utf-8").split("\n")
    stand_in = originals.stand_in_vocab()
    assert len(stand_in) == len(real) == originals.VOCAB_SIZE and len(set(stand_in)) == len(stand_in)
    specials = {index: token for index, token in enumerate(real) if token.startswith("<")}
    assert specials == {index: token for token, index in originals.SPECIAL_IDS.items()}
    assert all(stand_in[index] == token for index, token in specials.items())
    ascii_end = real.index("~") + 1
    assert stand_in[:ascii_end] == real[:ascii_end]

    def layout(state, dropped=()):
        return {key: None if key in dropped else tuple(tensor.shape) for key, tensor in state.items()}

    _, state = originals.cpmbee_checkpoint(seed=0)
    assert layout(originals.stand_in_cpmbee_state(seed=0)) == layout(state)
    _, state = originals.chat_checkpoint(seed=0, query_num=8)
    assert layout(originals.stand_in_chat_state(seed=0, query_num=8), CHAT_DROPPED_KEYS) == layout(
        state, CHAT_DROPPED_KEYS)
    unet = tiny_unet()
    _, state = originals.paint_checkpoint(unet, tiny_vae(), DDPMScheduler(), seed=0)
    assert layout(originals.stand_in_paint_state(unet, seed=0)) == layout(state)
