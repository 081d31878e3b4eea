"""TRL (the real `trl` package) trains VisCPM-Chat: the processor's answered-chat encoding that TRL's vision-language
collator asks for, the collated batch (labels on the answer only, the same targets and loss as CPM-Bee's own training
layout), and `SFTTrainer` runs through examples/train_chat_trl.py on the tiny converted Chat of the `chat` fixture.

Why `viscpm.adapters.trl.VisCPMSFTTrainer` (TRL's `SFTTrainer` with its loss overridden) and not `SFTTrainer` itself is
pinned by `test_plain_sft_trainer_needs_a_standard_lm_head`: if TRL or the model changes so that it passes, the
override is no longer needed.
"""

import io
import json

import datasets
import pytest
import torch
from adapter_helpers import load_example, png_bytes
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from viscpm.adapters.trl import VisCPMSFTTrainer

QUESTION = "Was siehst du <image> und a<b?"  # a user's `<image>` / `<` stay text
ANSWER = "Einen Hund </s> <unk>."  # a user's `</s>` / `<unk>` too: the only real `</s>` closes the answer


def _image(seed):
    return Image.open(io.BytesIO(png_bytes(seed))).convert("RGB")


def _messages(question=QUESTION, answer=ANSWER, image=None, history=()):
    """A chat ending with its answer: TRL's format (string contents; TRL puts the row's image into the first user
    message) or, given `image`, the image part in place."""
    turns = [*history, question]
    messages = []
    for i, text in enumerate(turns):
        content = [{"type": "image", "image": image}, {"type": "text", "text": text}] if i == 0 and image else text
        messages.append({"role": "user", "content": content})
        if i < len(history):
            messages.append({"role": "assistant", "content": f"Antwort {i}."})
    return messages + [{"role": "assistant", "content": answer}]


def _rows():
    return [{"images": [_image(0)], "messages": _messages()},
            {"images": [_image(1)], "messages": _messages("Und jetzt?", "Eine Katze.", history=("Hallo?",))}]


@pytest.fixture(scope="module")
def processor(chat):
    return AutoProcessor.from_pretrained(chat[3])


def _fresh(chat):
    return AutoModelForImageTextToText.from_pretrained(chat[3])


def test_answered_chat_is_the_training_layout(processor):
    """An answered chat encodes as the prompt `chat()` asks (token for token, the user's `<...>` escaped) followed by
    the answer and one `</s>`; `assistant_masks` marks exactly the answer tokens and that `</s>`, and TRL's
    next-token targets on them are CPM-Bee's own training labels."""
    tok = processor.tokenizer
    image = _image(3)
    out = processor.apply_chat_template(_messages(image=image), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    prompt = processor(images=image, text=QUESTION)  # what chat() asks: ends with the answer's opening <s>
    n = prompt["input_ids"].shape[1]
    for key in ("input_ids", "segment_ids", "image_bound", "pixel_values"):
        assert torch.equal(out[key][:, :n] if key in ("input_ids", "segment_ids") else out[key], prompt[key]), key
    ids, mask = out["input_ids"][0].tolist(), out["assistant_masks"][0].tolist()
    assert ids[n - 1] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[n:].count(tok.eos_token_id) == 1  # the answer's typed "</s>" is text
    assert mask == [0] * n + [1] * (len(ids) - n)
    assert tok.decode(ids[n:-1]) == tok.escape(ANSWER)  # CPM-Bee text: the user's `<` is `<<`
    assert ids.count(tok.unk_token_id) == processor.query_num  # the answer's "<unk>" is text, not an image slot
    assert processor.apply_chat_template(_messages()) == processor.training_prompt(QUESTION, ANSWER)

    # TRL's labels: input_ids where the mask is 1; the target of position p is labels[p + 1].
    labels = torch.where(out["assistant_masks"] == 1, out["input_ids"], -100)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    cpmbee = tok([processor.training_prompt(QUESTION, ANSWER)], return_labels=True, return_tensors="pt")
    assert torch.equal(targets[:, :-1], cpmbee["labels"])  # the last position (the closing </s>) has no target
    assert torch.equal(out["input_ids"][:, :-1], cpmbee["input_ids"])


def test_collated_batch_masks_the_prompt_and_gives_cpmbee_loss(chat, processor):
    """TRL's collator on two chats (different lengths, one with history): labels only on each answer and its `</s>`,
    right padding masked, and the model's loss on them (shifted) equals its loss on CPM-Bee's own training batch."""
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    rows = _rows()
    batch = collator([dict(row) for row in rows])
    assert "assistant_masks" not in batch
    for row, (labels, ids, attention) in enumerate(zip(batch["labels"], batch["input_ids"], batch["attention_mask"])):
        kept = (labels != -100).nonzero().flatten().tolist()
        length = int(attention.sum())
        answer = processor.tokenizer.unescape(processor.tokenizer.decode(ids[kept[0]:kept[-1]].tolist()))
        assert answer == (ANSWER if row == 0 else "Eine Katze.")
        assert kept == list(range(kept[0], length)) and ids[length - 1] == processor.tokenizer.eos_token_id
        assert bool((batch["context_mask"][row][kept] == 0).all())  # nothing of the prompt is trained
        assert bool((labels[length:] == -100).all())

    model = _fresh(chat).eval()
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        ours = model(**inputs, shift_labels=targets).loss
        prompts = []
        for row in rows:
            question, context, _ = processor.conversation_to_prompt(row["messages"][:-1])
            prompts.append(processor.training_prompt(question, row["messages"][-1]["content"], context))
        own = processor.tokenizer(prompts, return_labels=True, return_tensors="pt", padding=True)
        pixels = processor.image_processor([row["images"][0] for row in rows])["pixel_values"]
        reference = model(**own, pixel_values=pixels).loss
    assert torch.isfinite(ours) and torch.allclose(ours, reference, atol=1e-5), (ours, reference)


def test_sft_trainer_trains_the_answer_and_saves(chat, tmp_path):
    """`VisCPMSFTTrainer` (TRL's SFTTrainer, the example's) on a JSONL file: the loss is finite and goes down, the
    weights change, and the saved folder loads with `from_pretrained` (with the trained weights)."""
    example = load_example("train_chat_trl")
    (tmp_path / "img").mkdir()
    lines = []
    for i, row in enumerate(_rows()):
        (tmp_path / "img" / f"{i}.png").write_bytes(png_bytes(i))
        lines.append(json.dumps({"images": [f"img/{i}.png"], "messages": row["messages"]}))
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")

    model, processor = _fresh(chat), AutoProcessor.from_pretrained(chat[3])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=6, learning_rate=3e-3, per_device_train_batch_size=2,
                       use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=None, logging_steps=1,
                       save_strategy="no", report_to="none", disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    trainer = VisCPMSFTTrainer(model, args=config, train_dataset=example.load_chats(str(data)),
                                       processing_class=processor)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] * 0.9, losses
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert any(name.startswith("language_model.") for name in changed)
    assert any(name.startswith(("mapping.", "query", "vision_model.")) for name in changed)

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert all(torch.equal(p, dict(model.named_parameters())[name]) for name, p in loaded.named_parameters())
    AutoProcessor.from_pretrained(out)

    # The script end to end (two steps) writes a folder that loads too.
    assert example.main(["--model", str(chat[3]), "--data", str(data), "--output-dir", str(tmp_path / "script"),
                         "--max-steps", "2", "--batch-size", "2", "--cpu"]) == 0
    AutoModelForImageTextToText.from_pretrained(tmp_path / "script")


def test_plain_sft_trainer_needs_a_standard_lm_head(chat, processor, tmp_path):
    """SFTTrainer's own loss is a fused LM head over `model.base_model(...).last_hidden_state` and a linear
    `get_output_embeddings()`; VisCPM-Chat's head (scaled tied embedding + per-batch ext-table columns) is neither.
    Pinned, so that the override in the example is dropped once it is not needed."""
    config = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True, bf16=False,
                       gradient_checkpointing=False, max_length=None, report_to="none", disable_tqdm=True)
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    trainer = SFTTrainer(_fresh(chat), args=config, train_dataset=datasets.Dataset.from_list(_rows()),
                         processing_class=processor, data_collator=collator)
    with pytest.raises(AttributeError, match="last_hidden_state"):
        trainer.train()


def test_mistakes_are_clear_errors(chat, processor):
    answered, open_chat = _messages(), _messages()[:-1]
    with pytest.raises(ValueError, match="mixes chats"):
        processor.apply_chat_template([answered, open_chat], tokenize=True)
    with pytest.raises(ValueError, match="add_generation_prompt"):
        processor.apply_chat_template(answered, tokenize=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="needs tokenize=True and return_dict=True"):
        processor.apply_chat_template(answered, return_assistant_tokens_mask=True)
    with pytest.raises(ValueError, match="over max_length=20: a training example is not cut"):
        processor.apply_chat_template(answered, tokenize=True, truncation=True, max_length=20)
    with pytest.raises(ValueError, match="end with a user message"):
        processor(text=answered)  # __call__ encodes prompts; answered chats go through apply_chat_template
    example = load_example("train_chat_trl")
    rows = datasets.Dataset.from_list([{"images": [_image(0)], "prompt": open_chat,
                                        "completion": answered[-1:]}])
    with pytest.raises(ValueError, match="rows with 'messages'"):
        VisCPMSFTTrainer(_fresh(chat), args=SFTConfig(output_dir="unused", use_cpu=True, bf16=False,
                                                              report_to="none"),
                                 train_dataset=rows, processing_class=processor)
    # A question-ended chat has no answer to mask.
    out = processor.apply_chat_template(open_chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert int(out["assistant_masks"].sum()) == 0
