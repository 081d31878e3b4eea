"""The MpM recipe's stages (`viscpm.adapters.stages`): what each preset trains, a chat-align run end to end, the
saved folder, resume, the Paint stage, the script, and the mistakes a user can make (each a clear error that changes
nothing on disk).

Tiny models: the converted tiny Chat of the `chat` fixture and the tiny Paint of the `paint` fixture, loaded fresh
from their folders wherever a test trains (the fixtures' own models are shared by other tests).
"""

import hashlib
import json
from pathlib import Path

import datasets
import pytest
import torch
from adapter_helpers import load_example, png_bytes
from transformers import AutoModelForImageTextToText, AutoProcessor

from viscpm import adapters as A
from viscpm.adapters import AdapterError, BadDataError
from viscpm.adapters.stages import STAGES, apply_stage, read_stage_record

CAPTIONS = ["A red bicycle.", "Two cats on a sofa."]
COMMON = dict(use_cpu=True, per_device_train_batch_size=2, disable_tqdm=True, seed=0, save_steps=1, logging_steps=1,
              lr_scheduler_type="constant", report_to="none")


def _fresh(folder):
    return AutoModelForImageTextToText.from_pretrained(folder).eval()


def _caption_rows():
    return [{"image": png_bytes(i), "caption": caption} for i, caption in enumerate(CAPTIONS)]


def _conversation_rows():
    turn = [{"from": "human", "value": "Was siehst du?"}, {"from": "gpt", "value": "Einen Hund."}]
    return [{"image": png_bytes(i), "conversations": turn} for i in range(2)]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# -- presets -----------------------------------------------------------------------------------------------------------


def test_chat_presets_train_what_the_recipe_says(chat):
    _, _, _, folder = chat
    model = _fresh(folder)
    all_names = [n for n, _ in model.named_parameters()]
    unused = {id(p) for p in model.vision_model.unused_without_image_outputs()}
    used_vision = {n for n, p in model.named_parameters() if n.startswith("vision_model.") and id(p) not in unused}
    mapping = {n for n in all_names if n.startswith("mapping.")}
    llm = {n for n in all_names if n.startswith("language_model.")}

    names = apply_stage(model, "chat-align")
    assert set(names) == used_vision | {"query"} | mapping
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("language_model."))

    assert set(apply_stage(model, "chat-instruct")) == used_vision | {"query"} | mapping | llm
    assert set(apply_stage(model, "text-align")) == llm
    cpmbee = model.language_model  # CPM-Bee alone: text-align trains all of it
    assert set(apply_stage(cpmbee, "text-align")) == {n for n, _ in cpmbee.named_parameters()}
    with pytest.raises(AdapterError, match="chat-align trains a VisCPMChatForConditionalGeneration, not a cpmbee"):
        apply_stage(cpmbee, "chat-align")
    assert set(apply_stage(model, "chat-align", "partial", ["query", "mapping"])) == {"query"} | mapping
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"query"} | mapping
    layer0 = set(apply_stage(model, "chat-align", "partial", ["vision_model.layers.0"]))
    assert layer0 and all(n.startswith("vision_model.layers.0.") for n in layer0)

    with pytest.raises(AdapterError, match="chat-align keeps 'llm' frozen"):
        apply_stage(model, "chat-align", "partial", ["llm"])
    with pytest.raises(AdapterError, match="keeps 'language_model.model.layers.0' frozen"):
        apply_stage(model, "chat-align", "partial", ["language_model.model.layers.0"])
    with pytest.raises(AdapterError, match="names no weight"):
        apply_stage(model, "chat-align", "partial", ["mapping.7"])
    with pytest.raises(AdapterError, match="none were given"):
        apply_stage(model, "chat-align", "partial", [])
    with pytest.raises(AdapterError, match="chat-align has no LoRA mode"):
        apply_stage(model, "chat-align", "lora")
    with pytest.raises(AdapterError, match="use prepare_stage"):
        apply_stage(model, "chat-instruct", "lora")
    with pytest.raises(AdapterError, match="unknown stage 'chat-pretrain'"):
        apply_stage(model, "chat-pretrain")
    with pytest.raises(AdapterError, match="paint-align trains a VisCPMPaintPipeline"):
        apply_stage(model, "paint-align")

    # LoRA: a language adapter on CPM-Bee, with the query tokens and the mapping in full next to it.
    peft_model, names = A.prepare_stage(_fresh(folder), "chat-instruct", "lora", r=2, lora_alpha=4)
    assert names and all("lora_" in n or ".modules_to_save." in n for n in names)
    assert any("mapping.0.modules_to_save" in n for n in names) and any(A.QUERY_MODULE in n for n in names)
    with pytest.raises(AdapterError, match="is a PeftModel"):
        apply_stage(peft_model, "chat-instruct", "full")
    for param in peft_model.parameters():  # an adapter loaded for inference only: nothing left to train
        param.requires_grad_(False)
    with pytest.raises(AdapterError, match="would train nothing"):
        apply_stage(peft_model, "chat-instruct", "lora")
    assert STAGES["chat-align"].defaults() == {"learning_rate": 1e-5, "optim": "adamw_torch", "weight_decay": 0.0}
    assert STAGES["paint-align"].defaults()["learning_rate"] == 1e-4


# -- chat-align end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligned(chat, tmp_path_factory):
    """A chat-align run of 2 steps (checkpoints at each step) on caption rows, with the weights before and after."""
    _, _, _, folder = chat
    processor = AutoProcessor.from_pretrained(folder)
    train = A.prepare_stage_dataset("chat-align", datasets.Dataset.from_list(_caption_rows()), processor)
    model = _fresh(folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path_factory.mktemp("stages") / "align"
    model, _ = A.train_stage(model, train, "chat-align", out, processor=processor, max_steps=2, learning_rate=1e-2,
                             **COMMON)
    batch = A.stage_collator("chat-align", processor)([train[0], train[1]])
    return dict(folder=folder, processor=processor, train=train, model=model.eval(), before=before, out=out,
                batch=batch)


def test_caption_rows_become_chat_examples(aligned):
    processor, train = aligned["processor"], aligned["train"]
    assert len(train) == len(CAPTIONS)
    prompt = A.chat_training_prompt(A.CAPTION_QUESTION, CAPTIONS[1], "", processor.query_num)
    encoded = processor.tokenizer([prompt], return_labels=True)
    assert train[1]["input_ids"] == encoded["input_ids"][0] and train[1]["labels"] == encoded["labels"][0]


def test_chat_align_trains_vision_query_mapping_only(aligned):
    model, before = aligned["model"], aligned["before"]
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert "query" in changed and any(n.startswith("mapping.") for n in changed)
    assert any(n.startswith("vision_model.layers.") for n in changed)
    llm = [n for n in before if n.startswith("language_model.")]
    assert llm and all(torch.equal(before[n], after[n]) for n in llm)  # every LLM weight bit-identical


def test_saved_folder_reloads_with_the_same_logits(aligned):
    out = aligned["out"]
    record = json.loads((out / A.STAGE_RECORD).read_text())
    assert record["stage"] == "chat-align" and record["mode"] == "full"
    assert {"config.json", "model.safetensors", A.STAGE_RECORD} <= set(record["outputs"]) <= {p.name for p in
                                                                                              out.iterdir()}
    assert not list(out.glob("*.bin")) and (out / "checkpoints" / "checkpoint-1" / A.STAGE_RECORD).is_file()
    reloaded = _fresh(out)
    assert type(reloaded) is type(aligned["model"])
    assert torch.equal(_logits(reloaded, aligned["batch"]), _logits(aligned["model"], aligned["batch"]))
    assert AutoProcessor.from_pretrained(out).query_num == aligned["processor"].query_num


def test_resume_continues_the_run(aligned, tmp_path):
    """One step, then a resume from that run's last checkpoint to step 2: the weights of the uninterrupted run."""
    folder, processor, train = aligned["folder"], aligned["processor"], aligned["train"]
    out = tmp_path / "run"
    options = dict(processor=processor, learning_rate=1e-2, **COMMON)
    A.train_stage(_fresh(folder), train, "chat-align", out, max_steps=1, **options)
    resumed, _ = A.train_stage(_fresh(folder), train, "chat-align", out, max_steps=2, resume_from_checkpoint=True,
                               **options)
    straight = dict(aligned["model"].named_parameters())
    for name, value in resumed.named_parameters():
        assert torch.allclose(value, straight[name], atol=1e-6), name
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    # --overwrite starts a new run of the same stage: the old checkpoints go, the new result replaces the old one.
    A.train_stage(_fresh(folder), train, "chat-align", out, mode="partial", modules=["query"], max_steps=1,
                  overwrite=True, **options)
    assert not (out / "checkpoints" / "checkpoint-2").exists()
    assert json.loads((out / A.STAGE_RECORD).read_text())["modules"] == ["query"]
    reloaded, base = _fresh(out), _fresh(folder)
    assert not torch.equal(reloaded.query, base.query) and torch.equal(reloaded.mapping[0].weight,
                                                                       base.mapping[0].weight)


def test_lora_stage_writes_a_peft_folder(chat, tmp_path):
    """text-align in LoRA mode on Chat: LoRA on CPM-Bee only, a peft folder that loads back with the same logits."""
    _, _, _, folder = chat
    processor = AutoProcessor.from_pretrained(folder)
    train = A.prepare_stage_dataset("text-align", [{"text": "Der Himmel ist blau."}, {"text": "Guten Tag."}],
                                    processor)
    model, _ = A.train_stage(_fresh(folder), train, "text-align", tmp_path / "lora", mode="lora", processor=processor,
                             lora_config=dict(r=2, lora_alpha=4, lora_dropout=0.0), max_steps=1, learning_rate=1e-2,
                             **COMMON)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model." in n for n in trainable)
    assert {"adapter_config.json", "adapter_model.safetensors", A.STAGE_RECORD} <= {
        p.name for p in (tmp_path / "lora").iterdir()}
    batch = A.stage_collator("text-align", processor)([train[0], train[1]])
    loaded = A.load_language_adapters(_fresh(folder), tmp_path / "lora")
    assert torch.equal(_logits(loaded, batch), _logits(model.eval(), batch))


# -- mistakes ----------------------------------------------------------------------------------------------------------


def test_bad_data_is_a_clear_error(aligned):
    folder, processor, train = aligned["folder"], aligned["processor"], aligned["train"]
    with pytest.raises(BadDataError, match="LLaVA conversations, which chat-instruct takes"):
        A.prepare_stage_dataset("chat-align", _conversation_rows(), processor)
    with pytest.raises(BadDataError, match="image-caption rows are for chat-align"):
        A.prepare_stage_dataset("chat-instruct", _caption_rows(), processor)
    with pytest.raises(BadDataError, match="source is empty"):
        A.prepare_stage_dataset("chat-align", [], processor)
    with pytest.raises(BadDataError, match="empty caption"):
        A.prepare_stage_dataset("chat-align", [{"image": png_bytes(0), "caption": " "}], processor,
                                on_bad_rows="raise")
    text = A.prepare_stage_dataset("text-align", [{"text": "Der Himmel ist blau."}], processor)
    model = _fresh(folder)
    out = aligned["out"].parent / "never"
    with pytest.raises(BadDataError, match="these are text-only examples"):
        A.train_stage(model, text, "chat-align", out, processor=processor, **COMMON)
    with pytest.raises(BadDataError, match="prepared examples"):
        A.train_stage(model, datasets.Dataset.from_list(_caption_rows()), "chat-align", out, processor=processor,
                      **COMMON)
    with pytest.raises(BadDataError, match="dataset is empty"):
        A.train_stage(model, train.select([]), "chat-align", out, processor=processor, **COMMON)
    assert not out.exists()


def test_another_run_or_stage_is_refused_and_nothing_changes(aligned):
    folder, processor, train, out = aligned["folder"], aligned["processor"], aligned["train"], aligned["out"]
    before = _snapshot(out)
    model = _fresh(folder)
    run = dict(processor=processor, max_steps=1, **COMMON)
    with pytest.raises(AdapterError, match="holds a chat-align \\(full\\) run, not chat-instruct"):
        A.train_stage(model, train, "chat-instruct", out, resume_from_checkpoint=True, **run)
    with pytest.raises(AdapterError, match="holds a chat-align \\(full\\) run, not chat-align \\(partial"):
        A.train_stage(model, train, "chat-align", out, mode="partial", modules=["query"], resume_from_checkpoint=True,
                      **run)
    with pytest.raises(AdapterError, match="holds a chat-align \\(full\\) run, not chat-instruct"):
        A.train_stage(model, train, "chat-instruct", out, overwrite=True, **run)
    with pytest.raises(AdapterError, match="is not empty"):
        A.train_stage(model, train, "chat-align", out, **run)
    # A checkpoint of this run resumed by another stage into an empty folder: refused as well.
    elsewhere = out.parent / "elsewhere"
    with pytest.raises(AdapterError, match="checkpoint of a chat-align \\(full\\) run, not chat-instruct"):
        A.train_stage(model, train, "chat-instruct", elsewhere, resume_from_checkpoint=str(
            out / "checkpoints" / "checkpoint-1"), **run)
    with pytest.raises(AdapterError, match="the folder the model was loaded from"):
        A.train_stage(model, train, "chat-align", folder, overwrite=True, **run)
    assert _snapshot(out) == before and not elsewhere.exists()
    # A folder holding someone else's files is never taken over, even with overwrite.
    foreign = out.parent / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match="not an adapter's"):
        A.train_stage(model, train, "chat-align", foreign, overwrite=True, **run)
    assert _snapshot(foreign) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


# -- Paint -------------------------------------------------------------------------------------------------------------


def test_paint_align_trains_cross_attention_and_trans_block(paint, tmp_path):
    from viscpm import VisCPMPaintPipeline

    pipe = VisCPMPaintPipeline.from_pretrained(paint["root"] / "hf")
    names = apply_stage(pipe, "paint-align")
    assert any(n.startswith("text_encoder.projection.") for n in names)
    assert any(n.startswith("text_encoder.layer_norm.") for n in names)
    assert any(".attn2.to_k." in n for n in names)
    assert all(n.startswith(("text_encoder.projection.", "text_encoder.layer_norm.")) or
               (n.startswith("unet.") and ".attn2." in n) for n in names)
    assert not any(p.requires_grad for p in pipe.text_encoder.model.parameters())
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    with pytest.raises(AdapterError, match="paint-align has no LoRA mode"):
        apply_stage(pipe, "paint-align", "lora")
    with pytest.raises(AdapterError, match="chat-align trains a VisCPMChatForConditionalGeneration"):
        apply_stage(pipe, "chat-align")

    rows = [{"image": png_bytes(i, (20, 24)), "caption": caption} for i, caption in enumerate(CAPTIONS)]
    train = A.prepare_stage_dataset("paint-align", rows, pipe.tokenizer)
    with pytest.raises(AdapterError, match="the folder the model was loaded from"):
        A.train_stage(pipe, train, "paint-align", paint["root"] / "hf", overwrite=True, **COMMON)
    before = {n: p.detach().clone() for n, p in pipe.text_encoder.model.named_parameters()}
    model, _ = A.train_stage(pipe, train, "paint-align", tmp_path / "out", max_steps=1, learning_rate=1e-2,
                             data_collator=A.stage_collator("paint-align", pipe.tokenizer, resolution=16), **COMMON)
    assert all(torch.equal(p, before[n]) for n, p in pipe.text_encoder.model.named_parameters())
    saved = read_stage_record(tmp_path / "out" / "checkpoints" / "checkpoint-1")
    assert saved["stage"] == "paint-align"
    from safetensors.torch import load_file

    state = load_file(tmp_path / "out" / "checkpoints" / "checkpoint-1" / "model.safetensors")
    assert set(state) == set(names)  # the checkpoint holds the trained weights, not the frozen base

    reloaded = VisCPMPaintPipeline.from_pretrained(tmp_path / "out")
    for part in ("text_encoder", "unet"):
        ours = dict(getattr(pipe, part).state_dict())
        for name, value in getattr(reloaded, part).state_dict().items():
            assert torch.equal(value, ours[name]), (part, name)
    moved = pipe.text_encoder.projection.weight
    assert not torch.equal(moved, VisCPMPaintPipeline.from_pretrained(paint["root"] / "hf").text_encoder
                           .projection.weight)


# -- the script --------------------------------------------------------------------------------------------------------


def test_script_trains_a_stage(chat, tmp_path, capsys):
    _, _, _, folder = chat
    script = load_example("train_mpm_stage")
    (tmp_path / "0.png").write_bytes(png_bytes(0))
    data = tmp_path / "captions.jsonl"
    data.write_text(json.dumps({"image": "0.png", "caption": "A red bicycle."}) + "\n", encoding="utf-8")
    common = ["--model", str(folder), "--data", str(data), "--image-folder", str(tmp_path), "--use-cpu",
              "--max-steps", "1", "--per-device-train-batch-size", "1", "--disable-tqdm", "true",
              "--logging-steps", "1", "--lr-scheduler-type", "constant"]
    out = tmp_path / "out"
    assert script.main([*common, "--stage", "chat-align", "--mode", "partial", "--modules", "query", "mapping",
                        "--output-dir", str(out)]) == 0
    record = json.loads((out / A.STAGE_RECORD).read_text())
    assert record["mode"] == "partial" and record["modules"] == ["mapping", "query"]
    logged = json.loads((out / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    assert logged[0]["learning_rate"] == STAGES["chat-align"].learning_rate  # the recipe's default reached the run
    first = _snapshot(out)
    capsys.readouterr()
    assert script.main([*common, "--stage", "chat-instruct", "--output-dir", str(out), "--resume"]) == 1
    assert "holds a chat-align (partial ['mapping', 'query']) run, not chat-instruct" in capsys.readouterr().err
    assert _snapshot(out) == first
    assert script.main([*common, "--stage", "chat-align", "--output-dir", str(out), "--overwrite"]) == 0
    assert json.loads((out / A.STAGE_RECORD).read_text())["mode"] == "full"
    capsys.readouterr()
    assert script.main([*common, "--stage", "chat-instruct", "--output-dir", str(tmp_path / "x")]) == 1
    assert "LLaVA conversation rows" in capsys.readouterr().err
    assert script.main([*common, "--stage", "chat-pretrain", "--output-dir", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_no_script_option_is_taken_by_torchrun():
    """Options after the script reach it under torchrun: none is a prefix of several torchrun options."""
    from torch.distributed.run import get_args_parser

    torchrun = {option for action in get_args_parser()._actions for option in action.option_strings}
    script = load_example("train_mpm_stage")
    parser = A.adapter_argument_parser(script.ARGUMENTS)
    ours = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    assert {"--stage", "--mode", "--modules", "--caption-column", "--resolution", "--output-dir"} <= ours
    assert [o for o in ours if o not in torchrun and sum(t.startswith(o) for t in torchrun) > 1] == []
