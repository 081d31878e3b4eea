"""The training scripts under ``torchrun``: two CPU processes (gloo) train one adapter, which only the main process
writes, and no option of the scripts is taken by torchrun's own parser."""

import os
import re
import subprocess
import sys

import pytest
from adapter_helpers import EXAMPLES, load_example, write_chat_rows

from viscpm import adapters as A


def _torchrun_options() -> set[str]:
    from torch.distributed.run import get_args_parser

    return {option for action in get_args_parser()._actions for option in action.option_strings}


def _taken_by_torchrun(option: str, torchrun: set[str]) -> bool:
    """What argparse does with an argument after the script: an exact torchrun option or a unique prefix of one is
    passed on to the script (REMAINDER), but a prefix of several is an "ambiguous option" error before the script
    runs."""
    return option not in torchrun and sum(other.startswith(option) for other in torchrun) > 1


@pytest.mark.parametrize("name", ["train_language_adapter_chat", "train_language_adapter_paint"])
def test_no_option_is_ambiguous_for_torchrun(name):
    torchrun = _torchrun_options()
    assert _taken_by_torchrun("--r", torchrun) and _taken_by_torchrun("--max", torchrun)  # the check sees the bug
    script = load_example(name)
    parser = A.adapter_argument_parser(script.ARGUMENTS, script.DEFAULTS)
    ours = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    assert {"--lora-r", "--lora-alpha", "--lora-dropout", "--lora_r", "--output-dir", "--resume"} <= ours
    assert sorted(option for option in ours if _taken_by_torchrun(option, torchrun)) == []


def test_two_processes_train_one_adapter_written_once(chat, tmp_path):
    """``torchrun --nproc-per-node 2`` on the CPU: both processes train (DDP over gloo), process 0 alone writes the
    adapter, which loads; ``--lora-r 4`` after the script reaches the script."""
    from transformers import AutoModelForImageTextToText

    _, _, _, folder = chat
    data, images = write_chat_rows(tmp_path)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(EXAMPLES / "train_language_adapter_chat.py"), "--model", str(folder), "--data", str(data),
        "--image-folder", str(images), "--language", "de", "--output-dir", str(out), "--lora-r", "4",
        "--use-cpu", "--max-steps", "2", "--per-device-train-batch-size", "1", "--save-steps", "2",
        "--disable-tqdm", "true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert len(re.findall(r"^training \d+ of \d+ parameters", output, re.M)) == 2  # one per process
    assert re.findall(r"^process (\d+) of (\d+) wrote the adapter", output, re.M) == [("0", "2")]
    assert run.stdout.splitlines().count(f"wrote {out}") == 1
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not [path.name for path in out.iterdir() if path.name.startswith(A.chat.STAGING_PREFIX)]

    model = A.load_language_adapters(AutoModelForImageTextToText.from_pretrained(folder), out)
    assert model.peft_config["default"].r == 4
    assert any("lora_B" in name for name, _ in model.named_parameters())
