#!/usr/bin/env python
"""What `viscpm --help` and usage errors cost, against `import torch`, in the same run (issue 12).

Each command runs ``--repeats`` times as a fresh process, the commands taking turns so that a busy machine
slows them alike. The table gives the median wall-clock time and the median CPU time (user + system, which a
busy machine disturbs less), each also over `import torch`'s. The console script is the one next to this Python
(the venv's ``bin/viscpm``). A measurement script, not a test:
nothing asserts on timing (tests/apps/test_startup.py checks what these commands import).

    python benchmarks/bench_cli_startup.py [--repeats 5]
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VISCPM = str(Path(sys.executable).with_name("viscpm"))


def commands(scratch: Path) -> dict[str, list[str]]:
    image = scratch / "missing.png"
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import torch": [sys.executable, "-c", "import torch"],
        "import transformers": [sys.executable, "-c", "import torch, transformers; transformers.PretrainedConfig"],
        "import viscpm": [sys.executable, "-c", "import viscpm"],
        "viscpm --help": [VISCPM, "--help"],
        "viscpm chat --help": [VISCPM, "chat", "--help"],
        "viscpm draw (usage error)": [VISCPM, "draw"],
        "viscpm chat M --image I '  ' (usage error)": [VISCPM, "chat", str(scratch), "--image", str(image), "  "],
        "viscpm paint M P --size 30 (usage error)": [VISCPM, "paint", str(scratch), "a cat", "--size", "30"],
        "viscpm convert chat --help": [VISCPM, "convert", "chat", "--help"],
        "viscpm push --help": [VISCPM, "push", "--help"],
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds) of one run of ``argv``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cpu, start = _children_cpu(), time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 2):
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return elapsed, _children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not Path(VISCPM).is_file():
        raise SystemExit(f"no console script at {VISCPM}: install the package (pip install -e .)")
    with tempfile.TemporaryDirectory() as scratch:
        table = commands(Path(scratch))
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in table}
        for argv in table.values():  # warm the file cache once
            run_once(argv)
        for _ in range(args.repeats):
            for name, argv in table.items():
                runs[name].append(run_once(argv))
    medians = {name: [statistics.median(column) for column in zip(*values)] for name, values in runs.items()}
    wall0, cpu0 = medians["import torch"]
    print(f"CLI start-up, median of {args.repeats} runs each, taking turns; {os.cpu_count()} CPUs, Python "
          f"{sys.version.split()[0]}")
    print(f"{'command':<44} {'wall s':>7} {'x torch':>8} {'CPU s':>7} {'x torch':>8}")
    for name, (wall, cpu) in medians.items():
        print(f"{name:<44} {wall:>7.2f} {wall / wall0:>8.2f} {cpu:>7.2f} {cpu / cpu0:>8.2f}")


if __name__ == "__main__":
    main()
