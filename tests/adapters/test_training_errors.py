"""The training scripts against a careless user: every mistake is one line on stderr that names the cause and the fix,
exit status 1 (2 for usage), no traceback, and nothing on disk changed; an output folder never mixes two runs and
never holds a half-written adapter.

The table runs each bad input through the script's ``main(argv)`` and checks the exact outcome: the status, the words
of the one ``error:`` line, and a byte-for-byte snapshot of the work folder (data, images, output folder) before and
after. The tests after it train for real (tiny model, 1-2 steps) for what only a run can show.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from adapter_helpers import load_example, write_chat_rows

from viscpm import adapters as A

CHAT, PAINT = "train_language_adapter_chat", "train_language_adapter_paint"


# -- the work folder ---------------------------------------------------------------------------------------------------


@pytest.fixture
def work(chat, tmp_path):
    """Data, images and model folders of one case; ``out`` does not exist yet."""
    _, _, _, model = chat
    data, images = write_chat_rows(tmp_path)
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "0.png", "caption": "Ein Hund"}) + "\n", encoding="utf-8")
    paint_model = tmp_path / "paint-model"  # enough for the checks that come before the pipeline is loaded
    paint_model.mkdir()
    (paint_model / "model_index.json").write_text("{}")
    return SimpleNamespace(root=tmp_path, model=model, data=data, images=images, captions=captions,
                           paint_model=paint_model, out=tmp_path / "out")


def snapshot(root: Path) -> dict:
    """Every file and folder under ``root``: its content's hash (files) or None (folders)."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def argv(c, script: str = CHAT, *extra, **options) -> list[str]:
    """The script's command line for the work folder: ``options`` replace the base ones (None drops one)."""
    base = {"model": c.model, "data": c.data, "image_folder": c.images, "language": "de", "output_dir": c.out,
            "use_cpu": "true", "max_steps": "1", "per_device_train_batch_size": "1", "disable_tqdm": "true"}
    if script == PAINT:
        base.update(model=c.paint_model, data=c.captions)
    args = []
    for name, value in {**base, **options}.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args + [str(e) for e in extra]


def run(script: str, args: list[str], capsys) -> tuple[int, str, str]:
    """``main(args)``: (exit status, stdout, stderr)."""
    status = load_example(script).main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# -- folders the cases start from ----------------------------------------------------------------------------------


def _checkpoint(folder: Path, step: int) -> Path:
    from safetensors.torch import save_file
    from transformers import TrainerState

    folder.mkdir(parents=True)
    TrainerState(global_step=step).save_to_json(str(folder / "trainer_state.json"))
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    return folder


def old_run(c, checkpoints: bool = True):
    """An adapter and its run's checkpoint in the output folder."""
    from safetensors.torch import save_file

    c.out.mkdir()
    (c.out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file({"w": torch.ones(2)}, str(c.out / "adapter_model.safetensors"))
    (c.out / "README.md").write_text("old adapter\n")
    if checkpoints:
        _checkpoint(c.out / "checkpoints" / "checkpoint-3", 3)


def write(name: str, text: str) -> Callable:
    def setup(c):
        (c.root / name).write_text(text, encoding="utf-8")
    return setup


def _corrupt_state(c):
    old_run(c)
    (c.out / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": ')


def _corrupt_weights(c):
    old_run(c)
    (c.out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"\x00garbage")


def _other_run(c):
    old_run(c)
    _checkpoint(c.root / "other" / "checkpoints" / "checkpoint-1", 1)


def _foreign(c):
    old_run(c)
    (c.out / "notes.txt").write_text("mine\n")


def _no_conversations(c):
    (c.root / "rows.jsonl").write_text(json.dumps({"image": "0.png", "dialog": []}) + "\n")


@dataclass
class Case:
    id: str
    args: Callable  # (work) -> argv
    status: int
    words: tuple  # in the one error line; "{out}", "{root}" are the work folder's
    script: str = CHAT
    setup: Callable | None = None


USAGE, ERROR = 2, 1
CASES = [
    # -- usage: options and their values ---------------------------------------------------------------------------
    Case("lora-r not a number", lambda c: argv(c, lora_r="abc"), USAGE, ("--lora-r", "invalid int value: 'abc'")),
    Case("lora-r zero", lambda c: argv(c, lora_r=0), USAGE, ("--lora-r must be at least 1",)),
    Case("lora-alpha zero", lambda c: argv(c, lora_alpha=0), USAGE, ("--lora-alpha must be at least 1",)),
    Case("lora-dropout out of range", lambda c: argv(c, lora_dropout=1.5), USAGE, ("--lora-dropout must be in [0, 1)",)),
    Case("unknown target module", lambda c: argv(c, lora_target_modules="qkv"), USAGE,
         ("--lora-target-modules", "'qkv'")),
    Case("learning rate NaN", lambda c: argv(c, learning_rate="nan"), USAGE,
         ("--learning-rate must be a positive number, got nan",)),
    Case("learning rate negative", lambda c: argv(c, learning_rate="-0.5"), USAGE,
         ("--learning-rate must be a positive number, got -0.5",)),
    Case("learning rate not a number", lambda c: argv(c, learning_rate="fast"), USAGE,
         ("--learning-rate", "invalid float value: 'fast'")),
    Case("batch size zero", lambda c: argv(c, per_device_train_batch_size=0), USAGE,
         ("--per-device-train-batch-size must be positive",)),
    Case("endless epochs", lambda c: argv(c, max_steps=None, num_train_epochs="inf"), USAGE,
         ("--num-train-epochs must be positive",)),
    Case("max-steps not a number", lambda c: argv(c, max_steps="many"), USAGE, ("--max-steps", "'many'")),
    Case("bad choice", lambda c: argv(c, on_bad_rows="ignore"), USAGE, ("--on-bad-rows", "invalid choice: 'ignore'")),
    Case("old --r option", lambda c: argv(c, CHAT, "--r", "8"), USAGE, ("ambiguous option: --r",)),
    Case("unknown option", lambda c: argv(c, CHAT, "--epochs", "1"), USAGE, ("unrecognized arguments: --epochs 1",)),
    Case("missing --model", lambda c: argv(c, model=None), USAGE, ("the following arguments are required: --model",)),
    Case("resume and overwrite", lambda c: argv(c, CHAT, "--resume", "--overwrite"), USAGE,
         ("--overwrite starts a new run and --resume continues one",)),
    Case("text-only with train-query", lambda c: argv(c, CHAT, "--text-only", "--train-query"), USAGE,
         ("--train-query/--train-mapping need images: not with --text-only",)),
    Case("args file missing", lambda c: [str(c.root / "args.json")], USAGE, ("args.json", "No such file")),
    Case("args file not JSON", lambda c: [str(c.root / "args.json")], USAGE, ("args.json", "Expecting"),
         setup=write("args.json", "{oops")),
    Case("args file with an unknown key", lambda c: [str(c.root / "args.json")], USAGE,
         ("args.json", "not used", "modle"), setup=lambda c: (c.root / "args.json").write_text(json.dumps(
             {"model": str(c.model), "data": [str(c.data)], "language": "de", "output_dir": str(c.out), "modle": 1}))),
    Case("paint: resolution zero", lambda c: argv(c, PAINT, resolution=0), USAGE,
         ("--resolution must be positive",), script=PAINT),
    Case("paint: unet rank without unet LoRA", lambda c: argv(c, PAINT, unet_lora_r=4), USAGE,
         ("--unet-lora-r", "--train-unet-cross-attention"), script=PAINT),
    # -- data ------------------------------------------------------------------------------------------------------
    Case("data file missing", lambda c: argv(c, data=c.root / "nope.jsonl"), ERROR, ("data not found", "nope.jsonl")),
    Case("data file empty", lambda c: argv(c, data=c.root / "empty.jsonl"), ERROR,
         ("{root}/empty.jsonl is empty", "give a data file"), setup=write("empty.jsonl", "")),
    Case("data file not JSON Lines", lambda c: argv(c, data=c.root / "bad.jsonl"), ERROR,
         ("cannot read {root}/bad.jsonl", "JSON parse error", "fix the file"),
         setup=write("bad.jsonl", '{"image": "0.png"\n')),
    Case("CSV file with a header only", lambda c: argv(c, data=c.root / "rows.csv"), ERROR,
         ("{root}/rows.csv holds no rows",), setup=write("rows.csv", "image,conversations\n")),
    Case("files of two formats", lambda c: argv(c, CHAT, "--data", c.data, c.root / "rows.csv", data=None), ERROR,
         ("cannot tell the format",), setup=write("rows.csv", "image,conversations\n")),
    Case("unknown split", lambda c: argv(c, split="validation"), ERROR, ('Unknown split "validation"', "--split")),
    Case("no conversations column", lambda c: argv(c, data=c.root / "rows.jsonl"), ERROR,
         ("no 'conversations' column", "'dialog'", "--conversations-column"), setup=_no_conversations),
    Case("no image column", lambda c: argv(c, image_column="picture"), ERROR,
         ("no 'picture' column", "--image-column")),
    Case("image folder missing", lambda c: argv(c, image_folder=c.root / "nowhere"), ERROR,
         ("image folder {root}/nowhere not found", "--image-folder")),
    Case("every image missing", lambda c: argv(c, image_folder=c.root), ERROR,
         ("no usable chat examples", "missing image")),
    Case("Hub dataset out of reach", lambda c: argv(c, data="me/nothing"), ERROR, ("me/nothing",)),
    Case("model folder missing", lambda c: argv(c, model="nope"), ERROR, ("--model nope not found",)),
    Case("model folder not converted", lambda c: argv(c, model=c.images), ERROR,
         ("is not a converted model folder", "conversion/")),
    Case("paint: image folder missing", lambda c: argv(c, PAINT, image_folder=c.root / "nowhere"), ERROR,
         ("image folder {root}/nowhere not found",), script=PAINT),
    Case("paint: no caption column", lambda c: argv(c, PAINT, caption_column="text"), ERROR,
         ("no 'text' column", "--caption-column"), script=PAINT),
    # -- the output folder -----------------------------------------------------------------------------------------
    Case("folder holds an adapter", lambda c: argv(c), ERROR,
         ("{out} is not empty", "--overwrite", "--resume", "another --output-dir"), setup=old_run),
    Case("paint: folder holds an adapter", lambda c: argv(c, PAINT), ERROR, ("{out} is not empty",), script=PAINT,
         setup=old_run),
    Case("output is a file", lambda c: argv(c), ERROR, ("--output-dir {out} is a file",),
         setup=lambda c: c.out.write_text("x")),
    Case("resume with nothing to resume", lambda c: argv(c, CHAT, "--resume"), ERROR,
         ("nothing to resume", "without --resume")),
    Case("resume: an adapter but no checkpoint", lambda c: argv(c, CHAT, "--resume"), ERROR,
         ("nothing to resume", "{out}/checkpoints holds no checkpoint"), setup=lambda c: old_run(c, checkpoints=False)),
    Case("resume: corrupt trainer_state.json", lambda c: argv(c, CHAT, "--resume"), ERROR,
         ("{out}/checkpoints/checkpoint-3/trainer_state.json is corrupt", "--overwrite"), setup=_corrupt_state),
    Case("resume: corrupt checkpoint weights", lambda c: argv(c, CHAT, "--resume"), ERROR,
         ("{out}/checkpoints/checkpoint-3/adapter_model.safetensors is corrupt",), setup=_corrupt_weights),
    Case("resume from a missing checkpoint", lambda c: argv(c, CHAT, "--resume", c.root / "nowhere"), ERROR,
         ("checkpoint {root}/nowhere not found",)),
    Case("resume from a folder that is no checkpoint", lambda c: argv(c, CHAT, "--resume", c.images), ERROR,
         ("{root}/images is not a complete checkpoint (no trainer_state.json)",)),
    Case("resume another run into a full folder",
         lambda c: argv(c, CHAT, "--resume", c.root / "other" / "checkpoints" / "checkpoint-1"), ERROR,
         ("{out} is not empty", "is not one of its checkpoints"), setup=_other_run),
    Case("overwrite a folder holding other files", lambda c: argv(c, CHAT, "--overwrite"), ERROR,
         ("notes.txt", "not an adapter's", "another --output-dir"), setup=_foreign),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_mistake_is_one_line_and_changes_nothing(case, work, capsys):
    if case.setup:
        case.setup(work)
    before = snapshot(work.root)
    status, out, err = run(case.script, case.args(work), capsys)
    errors = error_lines(err)
    assert status == case.status, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    for word in case.words:
        assert word.format(out=work.out, root=work.root) in errors[0], errors[0]
    assert "Traceback" not in err and "wrote" not in out
    assert snapshot(work.root) == before


# -- runs ----------------------------------------------------------------------------------------------------------


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def _r(folder: Path) -> int:
    return json.loads((folder / "adapter_config.json").read_text())["r"]


def _steps(out: Path) -> dict:
    folder = out / "checkpoints"
    return {path.name: json.loads((path / "trainer_state.json").read_text())["global_step"]
            for path in sorted(folder.iterdir())} if folder.is_dir() else {}


def _leftovers(out: Path) -> list:
    return [path.name for path in out.iterdir() if path.name.startswith(A.chat.STAGING_PREFIX)]


@pytest.fixture
def trained(work, capsys):
    """The work folder after one real run: ``out`` holds an r=2 adapter and checkpoints 1 and 2."""
    status, _, err = run(CHAT, argv(work, lora_r=2, max_steps=2, save_steps=1), capsys)
    assert status == 0, err[-2000:]
    return work


def test_overwrite_starts_clean_and_resume_continues(trained, capsys, caplog):
    c = trained
    assert _r(c.out) == 2 and _steps(c.out) == {"checkpoint-1": 1, "checkpoint-2": 2}
    mode = 0o666 & ~_umask()
    assert all((c.out / name).stat().st_mode & 0o777 == mode for name in ADAPTER_FILES)  # readable by others too

    # --overwrite: a new run; the old run's checkpoints are gone, the adapter is the new one.
    status, out, err = run(CHAT, argv(c, CHAT, "--overwrite", lora_r=3, save_steps=1, logging_steps=1), capsys)
    assert status == 0, err[-2000:]
    assert f"wrote {c.out}" in out
    assert _r(c.out) == 3 and _steps(c.out) == {"checkpoint-1": 1}
    assert _r(c.out / "checkpoints" / "checkpoint-1") == 3 and not _leftovers(c.out)

    # --resume continues that run from its last checkpoint.
    status, out, err = run(CHAT, argv(c, CHAT, "--resume", lora_r=3, max_steps=2, save_steps=1, logging_steps=1),
                           capsys)
    assert status == 0, err[-2000:]
    assert f"resuming from {c.out / 'checkpoints' / 'checkpoint-1'}" in caplog.text
    assert len([line for line in out.splitlines() if "'loss'" in line]) == 1, out  # step 2 only: not started again
    assert _r(c.out) == 3 and _steps(c.out) == {"checkpoint-1": 1, "checkpoint-2": 2}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_diverging_training_writes_no_adapter(work, capsys):
    status, out, err = run(CHAT, argv(work, learning_rate="1e30", max_steps=2), capsys)
    errors = error_lines(err)
    assert status == 1 and len(errors) == 1 and "Traceback" not in err
    assert "training diverged" in errors[0] and "NaN or infinite" in errors[0] and "--learning-rate" in errors[0]
    assert not any((work.out / name).exists() for name in ADAPTER_FILES) and not _leftovers(work.out)
    assert "wrote" not in out


@pytest.mark.parametrize("failure, status, words", [
    (OSError(28, "No space left on device"), 1, "error: [Errno 28] No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted: no adapter was written"),
])
def test_a_failed_write_keeps_the_old_adapter(trained, capsys, monkeypatch, failure, status, words):
    """The new adapter is complete in its staging folder when writing fails (a full disk, Ctrl-C): the old adapter
    stays byte for byte, and nothing of the new one is left."""
    c = trained
    old = {name: (c.out / name).read_bytes() for name in ADAPTER_FILES}
    write_peft_folder = A.chat.write_peft_folder

    def write_then_fail(*args, **kwargs):
        write_peft_folder(*args, **kwargs)
        raise failure

    monkeypatch.setattr(A.chat, "write_peft_folder", write_then_fail)
    result, out, err = run(CHAT, argv(c, CHAT, "--overwrite", lora_r=3), capsys)
    assert result == status and words in err and "Traceback" not in err
    assert {name: (c.out / name).read_bytes() for name in ADAPTER_FILES} == old
    assert not _leftovers(c.out) and "wrote" not in out


def test_interrupted_training_leaves_no_adapter(work, capsys, monkeypatch):
    from transformers import Trainer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "training_step", interrupt)
    status, _, err = run(CHAT, argv(work), capsys)
    assert status == 130 and "interrupted: no adapter was written" in err and "Traceback" not in err
    assert not any((work.out / name).exists() for name in ADAPTER_FILES)


# -- the library's pieces ------------------------------------------------------------------------------------------


def test_swap_failure_restores_the_old_adapter(tmp_path, monkeypatch):
    """A rename that fails while the new adapter is moved in (the marker, last) puts the old one back exactly."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("adapter_config.json", "old config"), ("adapter_model.safetensors", "old weights"),
                       ("README.md", "old card")):
        (out / name).write_text(text)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "kept").write_text("run")
    before = snapshot(out)
    replace, failed = os.replace, []

    def replace_once_failing(src, dst):
        if Path(dst) == out / "adapter_config.json" and not failed:
            failed.append(dst)
            raise OSError(5, "Input/output error")
        return replace(src, dst)

    with pytest.raises(OSError, match="Input/output error"):
        with A.adapter_folder_writer(out) as staging:
            for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
                (staging / name).write_text("new")
            monkeypatch.setattr(os, "replace", replace_once_failing)
    monkeypatch.undo()
    assert failed and snapshot(out) == before


def test_resume_skips_a_checkpoint_cut_short(tmp_path, caplog):
    out = tmp_path / "out"
    done = _checkpoint(out / "checkpoints" / "checkpoint-1", 1)
    (out / "checkpoints" / "checkpoint-2").mkdir()  # the process died while writing it
    assert A.check_output_dir(out, resume=True) == str(done)
    assert "checkpoint-2 is incomplete (no trainer_state.json): skipped" in caplog.text
    with pytest.raises(A.AdapterError, match="nothing to resume"):
        A.check_output_dir(tmp_path / "empty", resume=True)


def test_library_training_refuses_a_full_folder(chat, tmp_path):
    """`train_language_adapter` keeps the same rules as the scripts (nothing is trained, nothing changes)."""
    from transformers import AutoModelForImageTextToText

    _, _, _, folder = chat
    c = SimpleNamespace(out=tmp_path / "out", root=tmp_path)
    old_run(c)
    before = snapshot(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    with pytest.raises(A.AdapterError, match="is not empty"):
        A.train_language_adapter(model, [], c.out, data_collator=None, use_cpu=True)
    assert snapshot(tmp_path) == before
