#!/usr/bin/env python
"""Train one stage of the MpM recipe (VisCPM's own training) on a converted VisCPM-Chat, VisCPM-Paint or CPM-Bee.

    python examples/train_mpm_stage.py --stage chat-align --model viscpm-chat-hf --data captions.jsonl \\
        --image-folder images/ --output-dir runs/chat-align [--mode full|partial|lora] [--modules query mapping] \\
        [--per-device-train-batch-size 8 --gradient-accumulation-steps 4 --max-steps N] [--bf16] \\
        [--resume [CHECKPOINT] | --overwrite]

Stages (`viscpm.adapters.STAGES`): `chat-align` (vision encoder + query tokens + mapping on image-caption rows
`{"image": path, "caption": text}`, CPM-Bee frozen, Adam 1e-5), `chat-instruct` (every Chat weight, or `--mode lora`,
on LLaVA conversation rows, 1e-5 / LoRA 2e-4), `paint-align` (the UNet's cross-attention and the CPM-Bee -> UNet
bridge on image-caption rows, CPM-Bee frozen, AdamW 1e-4; `--resolution`;
`--text-feature-cache DIR`: CPM-Bee's output computed once and reused), `text-align` (CPM-Bee alone on text
rows; usually `--mode lora`). The stage's learning rate and optimizer are the defaults; `--learning-rate`, `--optim`
and `--weight-decay` override them. `--mode partial --modules ...` trains part of a stage (e.g. `query mapping`).

Full / partial runs write a model folder that `from_pretrained` loads (Chat: with its processor; Paint: the whole
pipeline); LoRA runs a peft folder. `training_stage.json` records the stage: `--resume` continues a run of the same
stage and settings only, and `--overwrite` replaces only a run of the same stage. The options are those of
`StageArguments`, `StageModelArguments`, `DataArguments` and every `TrainingArguments` field (`--help` lists them);
a JSON file holding them can stand for all of them. Several GPUs: the same command under `torchrun --nproc-per-node N`
or `accelerate launch`.

Exit status: 0 on success, 1 on a data or training error (one line on stderr), 2 on a usage error, 130 on Ctrl-C.
"""

import sys

from viscpm import adapters
from viscpm.adapters import stages
from viscpm.adapters.paint import text_feature_cache


def load_model(stage: str, path: str, dtype):
    """The model and processor (Chat), pipeline and tokenizer (Paint) or model and tokenizer (CPM-Bee) of ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    load = {} if dtype is None else {"dtype": dtype}
    if stages.get_stage(stage).model == "paint":
        from viscpm import VisCPMPaintPipeline

        pipeline = VisCPMPaintPipeline.from_pretrained(path, **({} if dtype is None else {"torch_dtype": dtype}))
        return pipeline, pipeline.tokenizer
    if AutoConfig.from_pretrained(path).model_type == "cpmbee":
        return AutoModelForCausalLM.from_pretrained(path, **load), AutoTokenizer.from_pretrained(path)
    return AutoModelForImageTextToText.from_pretrained(path, **load), AutoProcessor.from_pretrained(path)


def train(stage_args: stages.StageArguments, model_args: stages.StageModelArguments,
          data_args: adapters.DataArguments, training_args: adapters.AdapterTrainingArguments) -> None:
    import torch

    dtype = None if model_args.dtype is None else getattr(torch, model_args.dtype)
    stage = stage_args.stage
    with training_args.main_process_first(desc="preparing the data"):
        rows = adapters.load_rows(data_args.source, image_folder=data_args.image_folder, split=data_args.split,
                                  streaming=data_args.streaming)
        model, processor = load_model(stage, model_args.model, dtype)
        train_data = stages.prepare_stage_dataset(
            stage, rows, processor, image_folder=data_args.image_folder, image_column=data_args.image_column,
            caption_column=stage_args.caption_column, conversations_column=stage_args.conversations_column,
            question=stage_args.question, check_images=data_args.check_images, **data_args.prepare_kwargs())
        collator = stages.stage_collator(stage, processor, resolution=stage_args.resolution)
        if stage_args.text_feature_cache:  # paint-align: CPM-Bee's output, computed once (the main process first)
            cache = text_feature_cache(train_data, model.text_encoder, processor, stage_args.text_feature_cache)
            train_data, collator = cache.dataset, cache.collator(processor, resolution=stage_args.resolution)
    print(adapters.data.count_line(train_data), file=sys.stderr)
    lora = None
    if stage_args.mode == "lora":
        lora = dict(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                    target_modules=model_args.lora_target_modules)
    stages.train_stage(
        model, train_data, stage, mode=stage_args.mode, modules=stage_args.modules, processor=processor,
        data_collator=collator,
        lora_config=lora, language=model_args.language, base_model=model_args.base_model or model_args.model,
        training_args=training_args, resume_from_checkpoint=model_args.resume, overwrite=model_args.overwrite)


def check(stage_args: stages.StageArguments, model_args: stages.StageModelArguments, data_args, training_args):
    """The output folder against the stage's record, before anything is loaded."""
    stages.check_stage_output(training_args.output_dir, stage_args.wanted(), model_args.resume, model_args.overwrite)


ARGUMENTS = (stages.StageArguments, stages.StageModelArguments, adapters.DataArguments,
             adapters.AdapterTrainingArguments)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return adapters.run_training_script(train, ARGUMENTS, argv, stages.stage_defaults(argv),
                                        prog="train_mpm_stage.py", description="Train one stage of the MpM recipe.",
                                        check=check)


if __name__ == "__main__":
    sys.exit(main())
