"""Training language adapters with `Trainer`: the arguments, the output folder's rules, the train functions and what
the training scripts share.

The output folder holds the finished adapter, and the Trainer's checkpoints in its ``checkpoints/`` folder. One run
owns it: a folder that already holds something is refused unless the run continues it (``resume``: from its last
checkpoint or a given one) or replaces it (``overwrite``: its old checkpoints go at once, its old adapter when the new
one is written). The adapter is written by the main process only, all at once, and only if training kept every
weight finite. The scripts (``examples/train_language_adapter_*.py``) parse :class:`AdapterArguments`,
:class:`DataArguments`, :class:`AdapterTrainingArguments` and their own dataclass with `HfArgumentParser` and run
through :func:`run_training_script`: every mistake a user can make is one line on stderr, exit status 1 (2 for usage).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import HfArgumentParser, SchedulerType, TrainerCallback, TrainingArguments

from ..conversion.common import ScriptArgumentParser, first_line, looks_like_repo_id, shorten
from .chat import ADAPTER_ENTRIES, LORA_TARGET_MODULES, STAGING_PREFIX, add_language_adapter, lora_target_pattern
from .chat import save_language_adapter
from .data import AdapterError, check_streaming_steps
from .paint import PaintAdapterModel, save_paint_adapter, write_paint_adapter

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
"""The folder of the output folder that holds the Trainer's checkpoints."""
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@dataclass
class AdapterTrainingArguments(TrainingArguments):
    """`TrainingArguments` for adapter training: ``output_dir`` is the adapter folder (checkpoints go to its
    ``checkpoints/``), the defaults suit LoRA, the collators get the raw columns (``remove_unused_columns=False``),
    and numbers that would train nothing or NaN (a NaN or negative learning rate, a zero batch) are refused."""

    output_dir: str = field(metadata={"help": "The adapter folder; the Trainer's checkpoints go to its checkpoints/."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (ignored when max_steps > 0)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Learning rate schedule."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints."})
    activation_checkpointing_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"use_reentrant": False}, metadata={"help": "See TrainingArguments."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the collators read the "
                                                                         "prepared columns."})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Label columns."})

    def __post_init__(self):
        super().__post_init__()
        _require(_positive(self.learning_rate), f"--learning-rate must be a positive number, got {self.learning_rate}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            _require(_positive(getattr(self, name)), f"--{name.replace('_', '-')} must be positive, got "
                                                     f"{getattr(self, name)}")
        _require(self.max_steps > 0 or _positive(self.num_train_epochs),
                 f"--num-train-epochs must be positive (or give --max-steps), got {self.num_train_epochs}")
        _require(math.isfinite(self.max_grad_norm), f"--max-grad-norm must be a number, got {self.max_grad_norm}")
        _require(not self.remove_unused_columns,
                 "remove_unused_columns must be False: the collators read the prepared columns")


@dataclass
class AdapterArguments:
    """The model, the adapter's LoRA settings, and what to do with an output folder that is not empty."""

    model: str = field(metadata={"help": "The converted VisCPM folder or Hub repo to adapt."})
    language: str = field(metadata={"help": "Language code of the adapter, e.g. de (written to the model card)."})
    base_model: str | None = field(default=None, metadata={"help": "Base model id for the model card (default: "
                                                                   "--model)."})
    dtype: Literal["float32", "bfloat16", "float16"] | None = field(
        default=None, metadata={"help": "dtype of the base weights (default: as saved)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES),
                                           metadata={"help": "CPM-Bee projections to adapt."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the adapter in --output-dir and start a new "
                                                             "run (its old checkpoints are deleted)."})
    resume: str | None = field(default=None, metadata={
        "nargs": "?", "const": "last",
        "help": "Continue the run in --output-dir from its last checkpoint, or from the checkpoint folder given."})

    def __post_init__(self):
        _require(self.lora_r >= 1, f"--lora-r must be at least 1, got {self.lora_r}")
        _require(self.lora_alpha >= 1, f"--lora-alpha must be at least 1, got {self.lora_alpha}")
        _require(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            lora_target_pattern(self.lora_target_modules)
        except ValueError as error:
            raise ValueError(f"--lora-target-modules: {error}") from None
        _require(not (self.overwrite and self.resume), "--overwrite starts a new run and --resume continues one: "
                                                       "give one of them")


@dataclass
class DataArguments:
    """Where the training rows are and how bad rows are handled."""

    data: list[str] = field(metadata={"help": "Data files (JSON / JSONL / parquet / CSV), a folder, or a Hub dataset "
                                              "id."})
    split: str = field(default="train", metadata={"help": "Dataset split."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the images' relative paths start from."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    max_length: int = field(default=2048, metadata={"help": "Skip examples longer than this (tokens)."})
    on_bad_rows: Literal["skip", "raise"] = field(
        default="skip", metadata={"help": "Bad rows (missing/corrupt image, empty text): skip with a count, or stop."})
    check_images: bool = field(default=True, metadata={"help": "Open every image before training."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for data preparation."})
    streaming: bool = field(default=False, metadata={
        "help": "Read the rows as a stream (a datasets IterableDataset, prepared as training reads it): for corpora "
                "too big for memory or the datasets cache; needs --max-steps."})

    def __post_init__(self):
        _require(self.max_length >= 1, f"--max-length must be at least 1, got {self.max_length}")
        _require(self.num_proc is None or self.num_proc >= 1, f"--num-proc must be at least 1, got {self.num_proc}")
        _require(not (self.streaming and self.num_proc), "--num-proc prepares a map-style dataset; a stream is "
                                                         "prepared as it is read: use --dataloader-num-workers")

    @property
    def source(self):
        """What :func:`~viscpm.adapters.data.load_rows` reads: one path, or the list of files."""
        return self.data[0] if len(self.data) == 1 else self.data

    def prepare_kwargs(self) -> dict:
        """The options every ``prepare_*_dataset`` function takes."""
        return dict(max_length=self.max_length, on_bad_rows=self.on_bad_rows, num_proc=self.num_proc)


# ---------------------------------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------------------------------


def _checkpoint_error(path: Path, problem: str) -> AdapterError:
    return AdapterError(f"{path} {problem}: resume from another checkpoint (--resume PATH) or start again with "
                        "--overwrite")


def check_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a complete Trainer checkpoint: a ``trainer_state.json`` the Trainer can read and weights
    whose headers are sound; else an `AdapterError` naming the file at fault."""
    from safetensors import SafetensorError, safe_open
    from transformers import TrainerState

    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"checkpoint {path} not found: --resume takes a checkpoint-N folder, or nothing (the last "
                           "checkpoint in --output-dir)")
    state = path / "trainer_state.json"
    if not state.is_file():
        raise _checkpoint_error(path, "is not a complete checkpoint (no trainer_state.json)")
    try:
        TrainerState.load_from_json(str(state))
    except (ValueError, TypeError, KeyError) as error:
        raise _checkpoint_error(state, f"is corrupt ({first_line(error)})") from None
    for weights in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as error:
            raise _checkpoint_error(weights, f"is corrupt ({first_line(error)})") from None
    return path


def last_checkpoint(output_dir: str | os.PathLike) -> Path:
    """The newest complete checkpoint of the run in ``output_dir`` (an incomplete newer one, cut short while it was
    written, is skipped with a warning; a corrupt one is an error)."""
    folder = Path(output_dir).expanduser() / CHECKPOINTS
    numbered = sorted((int(match.group(1)), path) for path in (folder.iterdir() if folder.is_dir() else ())
                      if path.is_dir() and (match := re.fullmatch(r"checkpoint-(\d+)", path.name)))
    if not numbered:
        raise AdapterError(f"nothing to resume: {folder} holds no checkpoint; start a new run without --resume "
                           "(with --overwrite if --output-dir is not empty)")
    for _, path in reversed(numbered):
        if (path / "trainer_state.json").exists():
            return check_checkpoint(path)
        logger.warning("%s is incomplete (no trainer_state.json): skipped", path)
    raise AdapterError(f"no complete checkpoint in {folder} (none has a trainer_state.json): start again with "
                       "--overwrite")


def check_output_dir(output_dir: str | os.PathLike, resume: str | bool | None = None,
                     overwrite: bool = False, owned: Sequence[str] = ()) -> str | None:
    """Check ``output_dir`` against what the run means to do, changing nothing; return the checkpoint to resume.

    A new run (no ``resume``) needs an empty or new folder, or ``overwrite`` for one that holds only an adapter and
    its checkpoints (anything else there is never deleted). ``resume=True`` (or ``"last"``) continues from the last
    checkpoint in ``output_dir``: there must be one. ``resume=PATH`` continues from that checkpoint, into this
    folder's run or into an empty folder. ``owned`` names more entries that ``overwrite`` may replace (a model
    folder's files). Every refusal is an `AdapterError` that says what to do.
    """
    output_dir = Path(output_dir).expanduser()
    if resume and overwrite:
        raise ValueError("overwrite starts a new run and resume continues one: give one of them")
    if output_dir.exists() and not output_dir.is_dir():
        raise AdapterError(f"--output-dir {output_dir} is a file: give a folder for the adapter")
    entries = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    existing = next(parent for parent in (output_dir, *output_dir.absolute().parents) if parent.exists())
    if not os.access(existing, os.W_OK):
        raise AdapterError(f"cannot write to {existing}: give an --output-dir you can write to")
    if resume:
        if resume is True or resume == "last":
            return str(last_checkpoint(output_dir))
        checkpoint = check_checkpoint(resume).absolute()
        if entries and (output_dir / CHECKPOINTS).absolute() not in checkpoint.parents:
            raise AdapterError(f"{output_dir} is not empty and {checkpoint} is not one of its checkpoints: resume "
                               "into an empty --output-dir, or from a checkpoint of this folder's run")
        return str(checkpoint)
    if not entries:
        return None
    if not overwrite:
        raise AdapterError(f"{output_dir} is not empty (it holds {shorten(entries)}): add --overwrite to replace its "
                           "adapter and start a new run, --resume to continue its run, or give another --output-dir")
    foreign = [name for name in entries
               if name not in (*ADAPTER_ENTRIES, *owned, CHECKPOINTS) and not name.startswith(STAGING_PREFIX)]
    if foreign:
        raise AdapterError(f"{output_dir} holds files that are not an adapter's ({shorten(foreign)}); --overwrite "
                           "replaces only an adapter and its checkpoints: give another --output-dir")
    return None


def check_model(model: str) -> None:
    """Refuse a ``--model`` that can be neither a local model folder nor a Hub repo id, before anything loads."""
    path = Path(model).expanduser()
    if path.exists():
        if not any((path / name).is_file() for name in ("config.json", "model_index.json")):
            raise AdapterError(f"--model {model} is not a converted model folder (no config.json or model_index.json): "
                               "convert the original checkpoint first (conversion/)")
    elif not looks_like_repo_id(model):
        raise AdapterError(f"--model {model} not found: give a converted VisCPM folder or a Hub repo id (owner/name)")


def prepare_output_dir(args: TrainingArguments, resume: str | bool | None = None, overwrite: bool = False,
                       owned: Sequence[str] = ()) -> str | None:
    """:func:`check_output_dir` on every process, the main process first; with ``overwrite`` the main process then
    deletes the old run's checkpoints (and staging leftovers), so that they never mix with the new run's."""
    with args.main_process_first(local=False, desc="checking the output folder"):
        checkpoint = check_output_dir(args.output_dir, resume, overwrite, owned)
        if overwrite and args.process_index == 0:
            output_dir = Path(args.output_dir).expanduser()
            for path in (output_dir / CHECKPOINTS, *output_dir.glob(STAGING_PREFIX + "*")):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _training_args(output_dir, training_args: TrainingArguments | None, overrides: dict) -> TrainingArguments:
    if training_args is None:
        _require(output_dir is not None, "give output_dir or training_args")
        return AdapterTrainingArguments(output_dir=str(output_dir), **overrides)
    _require(not overrides, "pass either training_args or TrainingArguments overrides, not both")
    _require(output_dir is None or Path(output_dir) == Path(training_args.output_dir),
             f"output_dir {output_dir} differs from training_args.output_dir {training_args.output_dir}")
    _require(not training_args.remove_unused_columns,
             "training_args.remove_unused_columns must be False: the collators read the prepared columns")
    return training_args


def fsdp_requested(args: TrainingArguments) -> bool:
    """Whether the run asks for FSDP: ``--fsdp``, or ``accelerate launch`` with an FSDP config (which sets
    ``ACCELERATE_USE_FSDP`` and leaves ``args.fsdp`` empty)."""
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_fsdp_device(args: TrainingArguments) -> None:
    """Refuse ``--fsdp`` where accelerate would silently train without it: accelerate (1.16) turns FSDP on only for
    several accelerators (GPUs, XPUs, ...), so on the CPU or a single device outside ``torchrun`` the run would be
    plain DDP (or one process) with every weight unsharded."""
    from accelerate.utils import DistributedType

    state = getattr(args, "distributed_state", None)
    if fsdp_requested(args) and state is not None and state.distributed_type in (DistributedType.NO,
                                                                                 DistributedType.MULTI_CPU):
        where = "on the CPU" if state.device.type == "cpu" else "in one process"
        raise AdapterError(f"--fsdp shards the model over several GPUs, and this run is {where}, where accelerate "
                           "would ignore it: drop --fsdp (torchrun gives DDP), or launch on GPUs with torchrun / "
                           "accelerate launch")


def seed_run(args: TrainingArguments) -> None:
    """Seed every RNG from ``args.seed`` as `Trainer` does, but before a LoRA adapter is drawn (`Trainer` seeds only
    when it is built, after the adapter's random initialisation): the same ``--seed`` then gives the same run."""
    from transformers.trainer_utils import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def _train(model, train_dataset, save: Callable[[Path], Any], args: TrainingArguments, resume_from_checkpoint,
           overwrite, owned: Sequence[str] = (), **trainer_kwargs):
    """What the train functions do with their checked ``args`` (`_training_args`): apply the output folder's rules
    (``owned``: see :func:`check_output_dir`), train, check the weights, write the result (main process only)."""
    from transformers import Trainer

    check_streaming_steps(train_dataset, args)  # before the folder is touched
    check_fsdp_device(args)
    checkpoint = prepare_output_dir(args, resume_from_checkpoint, overwrite, owned)
    if args.activation_checkpointing:  # frozen embeddings give no grad to the checkpointed blocks' inputs
        model.enable_input_require_grads()
    run_args = dataclasses.replace(args, output_dir=str(Path(args.output_dir).expanduser() / CHECKPOINTS))
    trainer = Trainer(model=model, args=run_args, train_dataset=train_dataset, **trainer_kwargs)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    broken = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if broken:
        raise AdapterError(f"training diverged: {len(broken)} adapter weights are NaN or infinite (e.g. {broken[0]}), "
                           "so no adapter was written; lower --learning-rate and start again with --overwrite")
    if args.should_save:
        save(Path(args.output_dir).expanduser())
        logger.info("process %d of %d wrote the adapter to %s", args.process_index, args.world_size, args.output_dir)
    return model, result


def train_language_adapter(
    model: torch.nn.Module,
    train_dataset,
    output_dir: str | os.PathLike | None = None,
    data_collator: Callable | None = None,
    language: str | None = None,
    base_model: str | None = None,
    lora_config=None,
    training_args: TrainingArguments | None = None,
    resume_from_checkpoint: str | bool | None = None,
    overwrite: bool = False,
    eval_dataset=None,
    callbacks: list | None = None,
    **training_overrides,
):
    """Train a language adapter with transformers' `Trainer` and save it in ``output_dir``.

    ``model`` is a base model (an adapter from ``lora_config`` / `language_adapter_config` is added) or a `PeftModel`
    already holding the trainable adapter. ``training_args`` (an :class:`AdapterTrainingArguments` whose
    ``output_dir`` is the adapter folder), or ``output_dir`` plus any `TrainingArguments` field as an override.
    Checkpoints go to ``output_dir/checkpoints``; ``resume_from_checkpoint`` / ``overwrite`` follow
    :func:`check_output_dir`. The final adapter is a standard peft folder in ``output_dir`` (`save_language_adapter`),
    written by the main process only. Runs unchanged under ``torchrun`` / ``accelerate launch``. Returns
    ``(peft_model, train_output)``.
    """
    from peft import PeftModel

    args = _training_args(output_dir, training_args, training_overrides)
    if not isinstance(model, PeftModel):
        seed_run(args)
        model = add_language_adapter(model, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("training %d of %d parameters (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))

    def save(folder):
        save_language_adapter(model, folder, language=language, base_model=base_model)

    return _train(model, train_dataset, save, args, resume_from_checkpoint, overwrite, data_collator=data_collator,
                  eval_dataset=eval_dataset, callbacks=callbacks)


class PaintCheckpointCallback(TrainerCallback):
    """Writes the Paint adapter layout (``text_encoder/``, ``unet/``, model card) into every checkpoint, so that each
    checkpoint is also a usable Paint adapter folder (the Trainer itself saves the :class:`PaintAdapterModel`'s
    state, the adapters' weights, for resuming)."""

    def __init__(self, language: str | None = None, base_model: str | None = None):
        self.language, self.base_model = language, base_model

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_paint_adapter(model, folder, language=self.language, base_model=self.base_model)


def train_paint_adapter(model: PaintAdapterModel, train_dataset, output_dir: str | os.PathLike | None = None,
                        data_collator: Callable | None = None, language: str | None = None,
                        base_model: str | None = None, training_args: TrainingArguments | None = None,
                        resume_from_checkpoint: str | bool | None = None, overwrite: bool = False,
                        **training_overrides):
    """Train a Paint adapter with `Trainer` (arguments and folders as for :func:`train_language_adapter`; the final
    adapter folder is :func:`~viscpm.adapters.paint.save_paint_adapter`'s). One device or DDP (``torchrun``);
    DeepSpeed and FSDP are refused (the adapters are saved from the unsharded parts). Returns ``(model,
    train_output)``."""
    args = _training_args(output_dir, training_args, training_overrides)
    if args.deepspeed or fsdp_requested(args):
        raise AdapterError("Paint adapters train on one device or under torchrun (DDP): drop --deepspeed / --fsdp")

    def save(folder):
        save_paint_adapter(model, folder, language=language, base_model=base_model)

    return _train(model, train_dataset, save, args, resume_from_checkpoint, overwrite, data_collator=data_collator,
                  callbacks=[PaintCheckpointCallback(language, base_model)])


# ---------------------------------------------------------------------------------------------------------------------
# The training scripts
# ---------------------------------------------------------------------------------------------------------------------


class AdapterArgumentParser(ScriptArgumentParser, HfArgumentParser):
    """`HfArgumentParser` whose usage errors are one line with exit status 2 (not the 150-line usage text)."""


def adapter_argument_parser(dataclass_types: Sequence[type], defaults: dict | None = None, prog: str | None = None,
                            description: str | None = None) -> AdapterArgumentParser:
    """The parser of a training script: one option per field of ``dataclass_types`` (``--lora-r`` and ``--lora_r``
    alike), ``defaults`` overriding the fields' defaults."""
    parser = AdapterArgumentParser(list(dataclass_types), prog=prog, description=description)
    parser.set_defaults(**(defaults or {}))
    return parser


def parse_script_arguments(parser: HfArgumentParser, argv: Sequence[str], defaults: dict | None = None) -> tuple:
    """The dataclasses of ``argv`` (or of the JSON file that is its only argument, as in peft's examples, on top of
    ``defaults``); an unknown option, a bad value, a refused combination or a bad JSON file is a usage error."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        try:
            values = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
            _require(isinstance(values, dict), "the file must hold one JSON object of option names and values")
            return parser.parse_dict({**(defaults or {}), **values})
        except (ValueError, TypeError, OSError) as error:
            parser.error(f"{argv[0]}: {first_line(error)}")
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return tuple(parsed)
    except ValueError as error:  # a dataclass refused a value
        parser.error(first_line(error))


def run_training_script(train: Callable[..., Any], dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
                        defaults: dict | None = None, prog: str | None = None, description: str | None = None,
                        check: Callable[..., Any] | None = None) -> int:
    """Run a training script: parse ``argv`` into ``dataclass_types`` (:class:`AdapterArguments` and
    :class:`AdapterTrainingArguments` among them; ``defaults`` override their defaults), check the output folder
    before anything is loaded (:func:`check_output_dir`, or ``check(*parsed)`` when given), then call
    ``train(*parsed)``. Returns the exit status: 0, 1 with one line on stderr
    for anything the user can fix (nothing half-written is left), 2 for usage errors, 130 when interrupted."""
    parser = adapter_argument_parser(dataclass_types, defaults, prog, description)
    try:
        parsed = parse_script_arguments(parser, sys.argv[1:] if argv is None else argv, defaults)
    except SystemExit as exit:  # usage errors and --help
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    adapter = next(p for p in parsed if isinstance(p, AdapterArguments))
    args = next(p for p in parsed if isinstance(p, TrainingArguments))
    if adapter.resume is None and args.resume_from_checkpoint:  # TrainingArguments' own name for --resume PATH
        adapter.resume = args.resume_from_checkpoint
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("viscpm.adapters").setLevel(logging.INFO)
    try:
        check_model(adapter.model)  # before anything slow
        if check is None:
            check_output_dir(args.output_dir, adapter.resume, adapter.overwrite)
        else:
            check(*parsed)
        train(*parsed)
    except KeyboardInterrupt:
        print(f"interrupted: no adapter was written (checkpoints, if any, are in {Path(args.output_dir) / CHECKPOINTS}: "
              "continue with --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (AdapterError, ValueError, OSError, RuntimeError, MemoryError) as error:
        print(f"error: {first_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    if args.should_save:
        print(f"wrote {args.output_dir}")
    return EXIT_OK
