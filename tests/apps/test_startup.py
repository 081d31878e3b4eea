"""`viscpm --help` and usage errors load no diffusers, torchvision, gradio or model code (issue 12).

What they cost is `import viscpm` (torch, transformers and the configs the Auto registration needs) and the
command line itself; benchmarks/bench_cli_startup.py measures it against `import torch`. Here, in fresh
processes, the modules they load: the console script's own `--help` (Python's import log), and one process that
runs `main(argv)` over a table of helps and usage errors and reports what each left in `sys.modules`; and that
the command line's quieting of library warnings, which imports nothing, still quiets. The three processes start
together.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

VISCPM = Path(sys.executable).with_name("viscpm")
HEAVY = re.compile(
    r"^(diffusers|torchvision|gradio)(\.|$)"  # the libraries only painting, images and the web app need
    r"|^viscpm\.modeling\.(?!configuration_)"  # model code (the configs are what `import viscpm` registers)
    r"|^viscpm\.(chat|paint|safety|adapters|apps\.demo|apps\.web)(\.|$)"
)

CHILD = """
import json, sys
from viscpm.apps.cli import main
cases, out = json.loads(sys.argv[1]), sys.argv[2]
report = [[main(argv), sorted(sys.modules)] for argv in cases]
with open(out, "w") as file:
    json.dump(report, file)
"""


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _heavy(modules):
    return sorted(name for name in modules if HEAVY.search(name))


CASES = [  # (argv, exit status); MODEL, PAINT and IMAGE are replaced by paths
    (["--help"], 0),
    (["chat", "--help"], 0),
    (["paint", "--help"], 0),
    (["convert", "--help"], 0),
    (["demo", "--help"], 0),
    (["serve", "--help"], 0),
    (["push", "--help"], 0),
    ([], 2),
    (["draw"], 2),
    (["chat", "MODEL"], 2),
    (["chat", "MODEL", "--image", "IMAGE", "   "], 2),
    (["chat", "MODEL", "--image", "IMAGE", "q", "--greedy", "--num-beams", "2"], 2),
    (["chat", "MODEL", "--image", "IMAGE", "q", "--seed", str(2**70)], 2),
    (["paint", "PAINT", "a cat", "--size", "30"], 2),
    (["paint", "PAINT", "a cat", "-o", "cat.bmpx"], 2),
    (["serve", "MODEL"], 2),
    (["demo", "--steps", "0"], 2),
    (["push"], 2),
]


QUIET_CHILD = """
import logging, sys
from viscpm.apps.cli import _quiet_libraries
assert "diffusers" not in sys.modules
transformers_level = logging.getLogger("transformers").level
with _quiet_libraries():
    import diffusers  # loaded by the command, after the quieting began
    diffusers.utils.logging.get_logger("diffusers.demo").warning("HIDDEN diffusers warning")
    logging.getLogger("transformers.demo").warning("HIDDEN transformers warning")
diffusers.utils.logging.get_logger("diffusers.demo").warning("SHOWN diffusers warning")
logging.getLogger("transformers.demo").warning("SHOWN transformers warning")
assert logging.getLogger("transformers").level == transformers_level
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three processes, started at once: {name: (CompletedProcess, folder)}."""
    root = tmp_path_factory.mktemp("startup")
    (root / "chat").mkdir()
    (root / "chat" / "config.json").write_text('{"model_type": "viscpm_chat"}')
    (root / "paint").mkdir()
    (root / "paint" / "model_index.json").write_text("{}")
    paths = {"MODEL": root / "chat", "PAINT": root / "paint", "IMAGE": root / "missing.png"}
    argvs = [[str(paths.get(arg, arg)) for arg in argv] for argv, _ in CASES]
    quiet_env = {key: value for key, value in _env().items() if not key.endswith("_VERBOSITY")}
    commands = {
        "help": ([str(VISCPM), "--help"], {**_env(), "PYTHONPROFILEIMPORTTIME": "1"}),
        "table": ([sys.executable, "-c", CHILD, json.dumps(argvs), str(root / "report.json")], _env()),
        "quiet": ([sys.executable, "-c", QUIET_CHILD], quiet_env),
    }
    started = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=root) for name, (argv, env) in commands.items()}
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return results, root, argvs


def test_help_of_the_console_script_imports_nothing_heavy(runs):
    result = runs[0]["help"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: viscpm")
    imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line]
    assert {"torch", "transformers", "viscpm.apps.cli"} <= set(imported)  # the log is read right
    assert _heavy(imported) == []


def test_helps_and_usage_errors_import_nothing_heavy(runs):
    results, root, argvs = runs
    result = results["table"]
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((root / "report.json").read_text())
    assert [status for status, _ in report] == [status for _, status in CASES], result.stderr
    assert "viscpm.apps.cli" in report[0][1] and "torch" in report[0][1]
    # sys.modules only grows, so the first case with a heavy module is the one that loaded it
    assert {" ".join(argv): _heavy(modules) for argv, (_, modules) in zip(argvs, report)} == {
        " ".join(argv): [] for argv in argvs}
    assert "usage: viscpm" in result.stdout and result.stderr.count("error: ") == len(CASES) - 7


def test_quieting_loads_nothing_and_still_quiets(runs):
    """The command line hides library warnings without importing the libraries for it: one loaded during the
    command is quiet too, and each is back to its own level afterwards."""
    result = runs[0]["quiet"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HIDDEN" not in result.stderr
    assert "SHOWN diffusers warning" in result.stderr and "SHOWN transformers warning" in result.stderr
