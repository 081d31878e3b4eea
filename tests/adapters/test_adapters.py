"""Language adapters (`viscpm.adapters`): data pipeline, LoRA training with `Trainer`, adapters in use.

A tiny converted VisCPM-Chat (the `chat` fixture) is trained a few steps on a tiny `datasets.Dataset` with generated
images; the checks are exact where exactness is the point (frozen base weights, adapter round trip, switching,
disabling) and against the tokenizer's own batch encoding / the processor's chat layout for the data. Paint: a tiny
pipeline built from the test_paint parts, and the training loss against the original's `VLG_CPMBee.forward`.
"""

import io
import json
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import viscpm  # noqa: F401  (registers the Auto classes)
from viscpm import adapters as A
from viscpm.adapters import BadDataError

LANGUAGE = "de"


def _png(seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


CONVERSATION = [
    {"from": "human", "value": "<image>\nWas ist 𠀀𠀁?"},
    {"from": "gpt", "value": "Eine Katze."},
    {"from": "human", "value": "Ist a<b?"},
    {"from": "gpt", "value": "Ja 𠀂𠀃 und 𠀄."},
]


def _rows():
    return [
        {"image": _png(0), "conversations": CONVERSATION},
        {"image": _png(1), "conversations": [{"from": "human", "value": "Was siehst du?"},
                                             {"from": "gpt", "value": "Einen Hund."}]},
    ]


def _fresh(folder):
    return AutoModelForImageTextToText.from_pretrained(folder).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _base_state(model):
    """Base weights of a (possibly peft-wrapped) model under their original names."""
    state = {}
    for name, value in model.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")
        state[name] = value
    return state


@pytest.fixture(scope="module")
def setup(chat, tmp_path_factory):
    """The prepared dataset, one batch of it, and an adapter trained a few steps (LoRA + query + mapping)."""
    _, _, _, folder = chat
    processor = AutoProcessor.from_pretrained(folder)
    train = A.prepare_chat_dataset(datasets.Dataset.from_list(_rows()), processor)
    collator = A.ChatAdapterCollator(processor)
    batch = collator([train[i] for i in range(len(train))])

    model = _fresh(folder)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    config = A.language_adapter_config(r=4, lora_alpha=8, lora_dropout=0.0, train_query=True, train_mapping=True)
    peft_model = A.add_language_adapter(model, config)
    with torch.no_grad():
        loss_before = peft_model(**batch).loss.item()
    out = tmp_path_factory.mktemp("adapter") / "de"
    peft_model, result = A.train_language_adapter(
        peft_model, train, out, data_collator=collator, language=LANGUAGE, base_model="openbmb/VisCPM-Chat",
        max_steps=4, learning_rate=1e-2, per_device_train_batch_size=3, use_cpu=True, save_steps=2,
        gradient_checkpointing=True, logging_steps=1, disable_tqdm=True, seed=0,
    )
    peft_model.eval()
    with torch.no_grad():
        loss_after = peft_model(**batch).loss.item()
    return dict(folder=folder, processor=processor, train=train, collator=collator, batch=batch, base=base,
                model=peft_model, out=out, loss=(loss_before, loss_after), result=result)


# -- data ------------------------------------------------------------------------------------------------------------


def test_turns_follow_the_chat_layout(chat):
    """One example per answer; each one's prompt is what the processor builds for that turn of the chat (the same
    history `chat()` returns), with the answer in `<ans>`."""
    _, _, _, folder = chat
    processor = AutoProcessor.from_pretrained(folder)
    turns = A.conversation_turns(CONVERSATION)
    assert [(q, a) for _, q, a in turns] == [("Was ist 𠀀𠀁?", "Eine Katze."), ("Ist a<b?", "Ja 𠀂𠀃 und 𠀄.")]
    assert turns[1][0] == "User: Was ist 𠀀𠀁?\nAI: Eine Katze.\n"
    messages = [{"role": "user", "content": "Was ist 𠀀𠀁?"}, {"role": "assistant", "content": "Eine Katze."},
                {"role": "user", "content": "Ist a<b?"}]
    for (context, question, answer), upto in zip(turns, (1, 3)):
        expected = processor.apply_chat_template(messages[:upto])
        ours = A.chat_training_prompt(question, answer, context, processor.query_num)
        assert list(ours) == list(expected)
        assert {**ours, "<ans>": ""} == expected
        assert ours["<ans>"] == processor.tokenizer.escape(answer)


def test_batch_is_the_tokenizer_training_layout(setup):
    """Examples encoded one by one and padded by the collator equal the tokenizer's batch encoding of the same turns
    (ids, one merged ext table holding the OOV pieces, segments, labels); the image slots are the `<unk>` run."""
    processor, batch = setup["processor"], setup["batch"]
    turns = A.conversation_turns(CONVERSATION) + A.conversation_turns(_rows()[1]["conversations"])
    prompts = [A.chat_training_prompt(q, a, c, processor.query_num) for c, q, a in turns]
    expected = processor.tokenizer(prompts, return_labels=True, padding_side="right", padding=True,
                                   return_tensors="pt")
    assert expected["ext_table_ids"].shape[1] >= 2  # the OOV pieces of different examples share one table
    for key in ("input_ids", "attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids",
                "ext_table_sub", "labels"):
        assert torch.equal(batch[key], expected[key]), key
    unk = processor.tokenizer.unk_token_id
    for row, (start, end) in enumerate(batch["image_bound"].tolist()):
        assert end - start == processor.query_num
        assert batch["input_ids"][row, start:end].eq(unk).all()
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    reference = processor.image_processor([Image.open(io.BytesIO(_png(0)))] * 2 + [Image.open(io.BytesIO(_png(1)))],
                                          return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], reference)


def test_labels_cover_the_answers_only(setup):
    processor, batch = setup["processor"], setup["batch"]
    tokenizer = processor.tokenizer
    labels, ids = batch["labels"], batch["input_ids"]
    predicted = (batch["context_mask"] == 0) & batch["attention_mask"].bool()
    assert torch.equal(labels != -100, predicted)
    answers = ["Eine Katze.", "Ja 𠀂𠀃 und 𠀄.", "Einen Hund."]
    for row, answer in enumerate(answers):
        positions = predicted[row].nonzero().flatten()
        assert ids[row, positions[0]] == tokenizer.bos_token_id  # the answer leaf's <s> predicts the first token
        assert labels[row, positions[-1]] == tokenizer.eos_token_id
        assert torch.equal(labels[row, positions[:-1]], ids[row, positions[1:]])  # next token within the answer
        assert len(positions) == 1 + len(tokenizer.tokenize(tokenizer.escape(answer)))  # <s> + the answer


# -- training --------------------------------------------------------------------------------------------------------


def test_loss_goes_down_and_only_the_adapter_changes(setup):
    before, after = setup["loss"]
    assert after < before - 0.5, setup["loss"]
    model = setup["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any("mapping.0.modules_to_save" in n for n in trainable)
    assert any("position_embedding.query.modules_to_save" in n for n in trainable)
    assert not any("vision_model.layers" in n for n in trainable)
    base = _base_state(model)
    assert base.keys() == setup["base"].keys()
    for name, value in setup["base"].items():
        assert torch.equal(base[name], value), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)


def test_saved_folder_is_a_standard_peft_adapter(setup):
    out = setup["out"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "openbmb/VisCPM-Chat"
    assert set(config["modules_to_save"]) == {A.QUERY_MODULE, *A.MAPPING_MODULES}
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md").data
    assert card.base_model == "openbmb/VisCPM-Chat" and card.language == [LANGUAGE] and card.library_name == "peft"
    assert (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_round_trip_switching_disable_and_merge(setup):
    """Reloaded adapter: identical outputs. A second adapter: different outputs; switching back and forth is exact;
    disabling gives the base model exactly; merging matches the unmerged adapter within 1e-5."""
    folder, batch = setup["folder"], setup["batch"]
    trained = _logits(setup["model"], batch)
    base = _logits(_fresh(folder), batch)

    model = A.load_language_adapters(_fresh(folder), {LANGUAGE: setup["out"]})
    assert torch.equal(_logits(model, batch), trained)
    assert not torch.allclose(trained, base, atol=1e-3)

    from peft import LoraConfig

    # Adapters meant to be switched share their modules_to_save (peft keeps a module that only some adapters save
    # on whichever copy was active last).
    other = A.language_adapter_config(r=2, lora_alpha=2, init_lora_weights=False, train_query=True,
                                      train_mapping=True)
    assert isinstance(other, LoraConfig)
    torch.manual_seed(1)
    model.add_adapter("fr", other)
    model.set_adapter("fr")
    model.eval()  # the new adapter's dropout layers are created in training mode
    second = _logits(model, batch)
    assert not torch.allclose(second, trained, atol=1e-3)
    model.set_adapter(LANGUAGE)
    assert torch.equal(_logits(model, batch), trained)
    model.set_adapter("fr")
    assert torch.equal(_logits(model, batch), second)
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), base)

    model.set_adapter(LANGUAGE)
    merged = model.merge_and_unload(adapter_names=[LANGUAGE])
    assert torch.allclose(_logits(merged, batch), trained, atol=1e-5, rtol=0)


def test_viscpm_chat_with_adapter(setup):
    from viscpm import VisCPMChat

    chat = VisCPMChat.from_pretrained(setup["folder"], device="cpu", adapter=setup["out"])
    assert torch.equal(_logits(chat.model, setup["batch"]), _logits(setup["model"], setup["batch"]))
    image = Image.open(io.BytesIO(_png(0)))
    answer, context, _ = chat.chat(image, "Was ist das?", max_new_tokens=3, num_beams=2)
    assert context.startswith("User: Was ist das?\nAI: ")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        VisCPMChat.from_pretrained(setup["folder"], device="cpu", adapter=setup["folder"])


def test_text_only_alignment_and_resume(chat, tmp_path):
    """LoRA on CPM-Bee alone with text / instruction / conversation rows (no image): the loss goes down (bf16
    autocast on), and resuming from a checkpoint gives the adapter of an uninterrupted run."""
    _, _, _, folder = chat
    processor = AutoProcessor.from_pretrained(folder)
    rows = datasets.Dataset.from_list([
        {"text": "Der Himmel ist blau.", "instruction": None, "output": None, "conversations": None},
        {"text": None, "instruction": "Übersetze: cat", "output": "Katze", "conversations": None},
        {"text": None, "instruction": None, "output": None,
         "conversations": [{"from": "human", "value": "Hallo?"}, {"from": "gpt", "value": "Guten Tag."}]},
        {"text": "", "instruction": None, "output": None, "conversations": None},
    ])
    train = A.prepare_text_dataset(rows, processor.tokenizer)
    assert len(train) == 3
    collator = A.ChatAdapterCollator(processor)
    batch = collator([train[i] for i in range(3)])
    assert "pixel_values" not in batch
    config = dict(r=4, lora_alpha=8, lora_dropout=0.0)
    common = dict(learning_rate=2e-2, per_device_train_batch_size=3, use_cpu=True, save_steps=1, disable_tqdm=True,
                  seed=0, lr_scheduler_type="constant")

    model = A.add_language_adapter(_fresh(folder), **config)
    assert not any("vision_model" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        before = model(**batch).loss.item()
    model, _ = A.train_language_adapter(model, train, tmp_path / "full", data_collator=collator, max_steps=3,
                                        bf16=True, **common)
    with torch.no_grad():
        assert model(**batch).loss.item() < before

    run = {}
    for name, steps in (("straight", 2), ("resumed", 2)):
        torch.manual_seed(0)
        peft_model = A.add_language_adapter(_fresh(folder), **config)
        resume = str(tmp_path / "straight" / "checkpoints" / "checkpoint-1") if name == "resumed" else None
        peft_model, _ = A.train_language_adapter(peft_model, train, tmp_path / name, data_collator=collator,
                                                 max_steps=steps, resume_from_checkpoint=resume, **common)
        run[name] = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    for name, value in run["straight"].items():
        assert torch.allclose(run["resumed"][name], value, atol=1e-6), name


# -- bad data --------------------------------------------------------------------------------------------------------


def test_bad_rows_are_skipped_with_a_count_or_raise(chat, tmp_path, caplog):
    _, _, _, folder = chat
    processor = AutoProcessor.from_pretrained(folder)
    (tmp_path / "ok.png").write_bytes(_png(3))
    turn = [{"from": "human", "value": "Was?"}, {"from": "gpt", "value": "Nichts."}]
    rows = [
        {"image": "ok.png", "conversations": turn},
        {"image": "missing.png", "conversations": turn},
        {"image": "corrupt.png", "conversations": turn},
        {"image": "ok.png", "conversations": []},
        {"image": None, "conversations": turn},
    ]
    (tmp_path / "corrupt.png").write_bytes(_png(4)[:60])
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="viscpm.adapters"):
        train = A.prepare_chat_dataset(A.load_conversations(str(data)), processor, image_folder=tmp_path)
    assert len(train) == 1 and train[0]["image_path"] == str(tmp_path / "ok.png")
    assert "skipped 4 of 5 chat rows" in caplog.text
    assert "2 missing image" in caplog.text and "1 corrupt image" in caplog.text and "1 empty conversation" in caplog.text

    with pytest.raises(BadDataError, match="row 1: missing image"):
        A.prepare_chat_dataset(str(data), processor, image_folder=tmp_path, on_bad_rows="raise")
    with pytest.raises(BadDataError, match="no usable chat examples"):
        A.prepare_chat_dataset(rows[1:], processor, image_folder=tmp_path)
    empty = datasets.Dataset.from_dict({"image": [], "conversations": []})
    with pytest.raises(BadDataError, match="no usable chat examples"):
        A.prepare_chat_dataset(empty, processor)
    with pytest.raises(BadDataError, match="no 'conversations' column"):
        A.prepare_chat_dataset([{"image": "ok.png", "text": "x"}], processor)
    with pytest.raises(BadDataError, match="unanswered"):
        A.conversation_turns(turn[:1])
    with pytest.raises(BadDataError, match="expected one of"):
        A.conversation_turns([turn[1], turn[0]])
    with pytest.raises(ValueError, match="on_bad_rows"):
        A.prepare_chat_dataset(str(data), processor, on_bad_rows="ignore")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        A.load_conversations(str(tmp_path / "nope.jsonl"))

    # An image that breaks after preparation (check_images=False) is a clear error when its batch is built.
    unchecked = A.prepare_chat_dataset(rows[:3], processor, image_folder=tmp_path, check_images=False)
    assert len(unchecked) == 3
    with pytest.raises(BadDataError, match="cannot open the image of row 1"):
        A.ChatAdapterCollator(processor)([unchecked[1]])
    # Long examples are skipped, counted.
    assert len(A.prepare_chat_dataset(rows[:1], processor, image_folder=tmp_path, max_length=10_000)) == 1
    with pytest.raises(BadDataError, match="longer than max_length=20"):
        A.prepare_chat_dataset(rows[:1], processor, image_folder=tmp_path, max_length=20, on_bad_rows="raise")


def test_lora_targets_only_cpmbee_projections(setup):
    import re

    pattern = A.lora_target_pattern()
    names = [n for n, _ in setup["model"].get_base_model().named_modules()]
    for name in ("language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.1.mlp.down_proj"):
        assert re.fullmatch(pattern, name)
    assert re.fullmatch(pattern, "model.layers.3.mlp.gate_proj")  # CPM-Bee alone / Paint text encoder
    assert not any(re.fullmatch(pattern, n) for n in names if n.startswith("vision_model"))
    with pytest.raises(ValueError, match="target_modules"):
        A.lora_target_pattern(["qkv"])


# -- Paint -----------------------------------------------------------------------------------------------------------


@pytest.mark.oracle
def test_paint_adapter_loss_matches_original_and_goes_down(vocab_file, tmp_path):
    """The Paint objective equals the original `VLG_CPMBee.forward` loss for the same weights and seed; a few LoRA
    steps on the text encoder (+ UNet cross-attention) lower it; the adapter folder loads into `VisCPMPaint`."""
    import copy

    from diffusers import DDPMScheduler
    from oracle import build_original_cpmbee, build_original_paint, original_paint_inputs, original_paint_state_dict
    from conftest import SCHEDULER_CONFIG, tiny_unet, tiny_vae, write_sd_base

    from viscpm import VisCPMPaint, VisCPMPaintPipeline
    from viscpm.conversion.convert_viscpm_paint import convert_viscpm_paint_checkpoint

    unet, vae = tiny_unet(), tiny_vae()
    sd_base = write_sd_base(tmp_path / "sd-base", unet, vae)
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    original = build_original_paint(build_original_cpmbee(seed=0), copy.deepcopy(unet), vae, scheduler)
    checkpoint = tmp_path / "paint.pt"
    torch.save(original_paint_state_dict(original), checkpoint)
    from oracle import TINY_ORIGINAL_CONFIG

    (tmp_path / "llm.json").write_text(json.dumps(TINY_ORIGINAL_CONFIG))
    convert_viscpm_paint_checkpoint(checkpoint, tmp_path / "hf", llm_config=tmp_path / "llm.json", sd_base=sd_base,
                                    vocab_file=vocab_file, progress=False)
    pipe = VisCPMPaintPipeline.from_pretrained(tmp_path / "hf")

    captions = ["Ein Leuchtturm am Meer", "eine rote Katze 𠀀𠀁"]
    rows = [{"image": _png(i, (20, 24)), "caption": caption} for i, caption in enumerate(captions)]
    rows.append({"image": b"broken", "caption": "kaputt"})
    train = A.prepare_paint_dataset(datasets.Dataset.from_list(rows), pipe.tokenizer)
    assert len(train) == 2
    collator = A.PaintAdapterCollator(pipe.tokenizer, resolution=16)
    batch = collator([train[0], train[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["pixel_values"].abs().max() <= 1

    # The original's loss on the same captions (its collater pads them right, as ours) and pixels.
    data, _ = original_paint_inputs(captions, captions)
    data["pixel_values"] = batch["pixel_values"]
    torch.manual_seed(7)
    with torch.no_grad():
        theirs, _ = original.model(data)
    model = A.add_paint_adapter(pipe, r=4, lora_alpha=8, train_unet_cross_attention=True)
    torch.manual_seed(7)
    with torch.no_grad():
        ours = model(**batch)["loss"]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)

    def mean_loss():
        torch.manual_seed(11)
        with torch.no_grad():
            return sum(model(**batch)["loss"].item() for _ in range(4)) / 4

    before = mean_loss()
    A.train_paint_adapter(model, train, tmp_path / "adapter", data_collator=collator, language=LANGUAGE,
                          max_steps=8, learning_rate=3e-2, per_device_train_batch_size=2, use_cpu=True, save_steps=4,
                          disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    assert mean_loss() < before
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.startswith("unet.") for n in trainable) and any(n.startswith("text_encoder.") for n in trainable)
    for part in ("text_encoder", "unet"):
        assert (tmp_path / "adapter" / part / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "checkpoints" / "checkpoint-4" / "unet" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    checkpoint = tmp_path / "adapter" / "checkpoints" / "checkpoint-4"
    saved = load_file(checkpoint / "model.safetensors")  # what the Trainer resumes from: the adapters, no base weight
    assert saved and set(saved) == {n for n, _ in model.named_parameters() if "lora_" in n}

    # Resuming from checkpoint-4 gives the adapters of the uninterrupted 8-step run.
    resumed = A.add_paint_adapter(VisCPMPaintPipeline.from_pretrained(tmp_path / "hf"), r=4, lora_alpha=8,
                                  train_unet_cross_attention=True)
    A.train_paint_adapter(resumed, train, tmp_path / "resumed", data_collator=collator, max_steps=8,
                          learning_rate=3e-2, per_device_train_batch_size=2, use_cpu=True, save_steps=4,
                          disable_tqdm=True, seed=0, lr_scheduler_type="constant", resume_from_checkpoint=str(checkpoint))
    resumed_state = dict(resumed.named_parameters())
    for name, value in model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(resumed_state[name], value, atol=1e-6), name

    paint = VisCPMPaint.from_pretrained(tmp_path / "hf", image_safety_checker=False, prompt_safety_checker=False,
                                        add_ranker=False, device="cpu", adapter=tmp_path / "adapter")
    reloaded = paint.pipeline.text_encoder(**{k: batch[k] for k in ("input_ids", "attention_mask", "segment_ids",
                                                                    "context_mask", "segment_rel", "ext_table_ids",
                                                                    "ext_table_sub")}).last_hidden_state
    model.eval()
    trained = model.text_encoder(**{k: batch[k] for k in ("input_ids", "attention_mask", "segment_ids",
                                                          "context_mask", "segment_rel", "ext_table_ids",
                                                          "ext_table_sub")}).last_hidden_state
    assert torch.equal(reloaded, trained)


def test_chat_script(chat, tmp_path, capsys):
    """The command line end to end (one step), and its usage / data errors."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "train_language_adapter_chat.py"
    spec = importlib.util.spec_from_file_location("train_language_adapter_chat", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, _, _, folder = chat
    (tmp_path / "a.png").write_bytes(_png(5))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": "a.png", "conversations": _rows()[1]["conversations"]}) + "\n")
    common = ["--model", str(folder), "--language", LANGUAGE, "--use-cpu", "--max-steps", "1",
              "--per-device-train-batch-size", "1"]
    out = tmp_path / "out"
    assert script.main([*common, "--data", str(data), "--image-folder", str(tmp_path), "--output-dir", str(out),
                        "--lora-r", "2", "--train-mapping"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert script.main([*common, "--data", str(data), "--output-dir", str(out), "--text-only", "--train-query"]) == 2
    assert script.main([*common, "--data", str(data), "--output-dir", str(tmp_path / "bad")]) == 1  # no image found
    assert "no usable chat examples" in capsys.readouterr().err
