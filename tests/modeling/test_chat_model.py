"""VisCPM-Chat model against the original implementation.

A tiny original `VLU_CPMBee` (torchscale BEiT-3 + CPM-Bee, random weights, fp32) is saved in the original
checkpoint format, converted with the script, loaded with `from_pretrained`, and compared: the mapped query
outputs, the logits of a prompt with an image, and the answers of the original beam search (the path
`VisCPMChat.chat` takes) against ours (the oracle tests; without the original, the others run on a stand-in
checkpoint of the same format). The converter's own tests are in tests/conversion/test_convert_chat.py.
"""

import copy

import pytest
import torch
from conftest import CHAT_QUERY_NUM
from originals import TINY_ORIGINAL_CONFIG, TINY_VISION_CONFIG
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

import viscpm  # noqa: F401  (registers the Auto classes)
from viscpm.modeling.configuration_viscpm_chat import VisCPMChatConfig, VisCPMVisionConfig
from viscpm.modeling.modeling_viscpm_chat import (
    VisCPMChatForConditionalGeneration,
    VisCPMVisionModel,
    find_image_bound,
)

QUERY_NUM = CHAT_QUERY_NUM
# VisCPMChat.chat's settings, with a short answer limit to keep the test fast.
CHAT = dict(beam_size=3, temperature=0.7, repetition_penalty=1.1, length_penalty=3.0, max_length=16)
LM_KEYS = ("attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids", "ext_table_sub")


def _pixels(count, seed=3):
    size = TINY_VISION_CONFIG["img_size"]
    return torch.randn((count, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _prompt(question, context=""):
    return {"image": "<unk>" * QUERY_NUM, "context": context, "question": question, "<ans>": ""}


def _encode(tokenizer, datas):
    return tokenizer(copy.deepcopy(datas), return_tensors="pt", padding=True, truncation=True, max_length=3000)


def _our_answer(model, tokenizer, question, context="", **image):
    data = _prompt(question, context)
    inputs = _encode(tokenizer, [data])
    answers, vision = model.original_beam_search(**inputs, **image, **CHAT)
    return tokenizer.decode_answers(data, answers[0])["<ans>"], vision


# -- features and logits ----------------------------------------------------------------------------------------


@pytest.mark.oracle
def test_vision_features_match_original(chat):
    from oracle import original_vision_hidden_states

    vlu, model, _, _ = chat
    pixels = _pixels(3)
    expected = original_vision_hidden_states(vlu, pixels)
    with torch.no_grad():
        ours = model.get_vision_hidden_states(pixels)
    assert ours.shape == (3, QUERY_NUM, TINY_ORIGINAL_CONFIG["dim_model"])
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0)
    # The images differ, so the features must too (the queries read the image, not only themselves).
    assert (ours[0] - ours[1]).abs().max() > 1e-2


def test_vision_encoder_sdpa_equals_eager(chat):
    _, model, _, _ = chat
    pixels = _pixels(2)
    vision = copy.deepcopy(model.vision_model)
    query = model.query.expand(2, -1, -1)
    with torch.no_grad():
        eager = vision(pixels, query_embeds=query).last_hidden_state
        vision.config._attn_implementation = "sdpa"
        sdpa = vision(pixels, query_embeds=query).last_hidden_state
    assert torch.allclose(eager, sdpa, atol=1e-5, rtol=0)
    assert eager.shape[1] == (TINY_VISION_CONFIG["img_size"] // TINY_VISION_CONFIG["patch_size"]) ** 2 + 1 + QUERY_NUM


PROMPTS = [
    _prompt("这张图片里有什么？"),
    _prompt("What is in the picture? 𠀀 and 𠀂", context="User: hi\nAI: hello there\n"),
]


@pytest.mark.oracle
def test_image_bound_matches_original(chat):
    from oracle import original_prompt

    _, _, tokenizer, _ = chat
    inputs = _encode(tokenizer, PROMPTS)
    bound = find_image_bound(inputs["input_ids"], inputs["segment_ids"], inputs["attention_mask"], query_num=QUERY_NUM)
    pad = (inputs["attention_mask"] == 0).sum(1)
    for row, data in enumerate(PROMPTS):
        model_inputs, _ = original_prompt([data])
        assert (bound[row] - pad[row]).tolist() == model_inputs["image_bound"].reshape(-1).tolist()


@pytest.mark.oracle
def test_logits_match_original(chat):
    from oracle import original_vlu_logits

    vlu, model, tokenizer, _ = chat
    pixels = _pixels(len(PROMPTS))
    batch = _encode(tokenizer, PROMPTS)
    with torch.no_grad():
        batched = model(**{k: batch[k] for k in ("input_ids", *LM_KEYS)}, pixel_values=pixels, use_cache=False)
    for row, data in enumerate(PROMPTS):
        expected, expected_vision = original_vlu_logits(vlu, data, pixel_values=pixels[row: row + 1])
        inputs = _encode(tokenizer, [data])
        with torch.no_grad():
            out = model(**{k: inputs[k] for k in ("input_ids", *LM_KEYS)}, pixel_values=pixels[row: row + 1])
        # Our prompt is the original's plus the answer's <s>.
        assert out.logits.shape[-1] == expected.shape[-1]
        assert torch.allclose(out.logits[0, :-1], expected[0], atol=1e-4, rtol=0)
        assert torch.allclose(out.vision_hidden_states, expected_vision, atol=1e-4, rtol=0)
        # Left-padded in a batch with another prompt and another image: the same numbers (the batch's ext table
        # may hold further columns, the other prompt's out-of-vocabulary pieces).
        real = batch["attention_mask"][row].bool()
        width = expected.shape[-1]
        assert torch.allclose(batched.logits[row][real][:-1, :width], expected[0], atol=1e-4, rtol=0)


def test_image_changes_the_logits(chat):
    """The image slots really are replaced: the logits depend on the image."""
    _, model, tokenizer, _ = chat
    inputs = _encode(tokenizer, PROMPTS[:1])
    args = {k: inputs[k] for k in ("input_ids", *LM_KEYS)}
    with torch.no_grad():
        a = model(**args, pixel_values=_pixels(1, seed=1)).logits[:, -1]
        b = model(**args, pixel_values=_pixels(1, seed=2)).logits[:, -1]
        text_only = model(**args).logits[:, -1]
    assert (a - b).abs().max() > 1e-3 and (a - text_only).abs().max() > 1e-3


# -- the original beam search (what chat() runs) -------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize(
    "question",
    ["这张图片里有什么？请详细描述。", "What is in the picture? Describe it.", "图中写的是𠀀还是𠀂？"],
    ids=["chinese", "english", "oov"],
)
def test_beam_search_answers_match_original(chat, question):
    from oracle import original_chat_generate

    vlu, model, tokenizer, _ = chat
    pixels = _pixels(1)
    expected, expected_vision = original_chat_generate(vlu, pixels[0], question, **CHAT)
    ours, vision = _our_answer(model, tokenizer, question, pixel_values=pixels)
    assert ours == expected and expected
    assert torch.allclose(vision, expected_vision, atol=1e-4, rtol=0)


@pytest.mark.oracle
def test_beam_search_copies_oov_pieces_like_original(chat):
    """With `<unk>` made attractive, answers copy the question's out-of-vocabulary pieces (ext table and the
    `<unk>` entry): the decoded strings must still agree."""
    from oracle import original_chat_generate

    vlu, model, tokenizer, _ = chat
    vlu, model = copy.deepcopy(vlu), copy.deepcopy(model)
    with torch.no_grad():
        vlu.llm.input_embedding.weight[1] *= 8.0
        model.language_model.model.embed_tokens.weight[1] *= 8.0
    pixels = _pixels(1)
    question = "图中写的是𠀀还是𠀂？"
    expected, _ = original_chat_generate(vlu, pixels[0], question, **CHAT)
    ours, _ = _our_answer(model, tokenizer, question, pixel_values=pixels)
    assert ours == expected
    assert "𠀀" in expected or "𠀂" in expected


@pytest.mark.oracle
def test_second_turn_with_context_and_vision_states(chat):
    from oracle import original_chat_generate

    vlu, model, tokenizer, _ = chat
    pixels = _pixels(1)
    first_q = "这张图片里有什么？"
    first, expected_vision = original_chat_generate(vlu, pixels[0], first_q, **CHAT)
    ours_first, vision = _our_answer(model, tokenizer, first_q, pixel_values=pixels)
    assert ours_first == first
    context = "User: " + first_q + "\n" + "AI: " + first + "\n"
    question = "What colour is it?"
    expected, _ = original_chat_generate(vlu, pixels[0], question, context=context,
                                         vision_hidden_states=expected_vision, **CHAT)
    ours, vision_again = _our_answer(model, tokenizer, question, context, vision_hidden_states=vision)
    assert ours == expected
    assert torch.equal(vision_again, vision)  # handed back unchanged, no image needed


@pytest.mark.oracle
def test_beam_one_and_early_endings_match_original(chat):
    """Beam 1 and beam 3, as they are and with `</s>` made likely (its embedding, tied to its output column, is
    pointed along the prompt's mean final hidden state), so hypotheses finish before the length limit."""
    from oracle import original_chat_generate

    vlu, model, tokenizer, _ = chat
    pixels = _pixels(1, seed=5)
    data = _prompt("你好")
    with torch.no_grad():
        hidden = model(**_encode(tokenizer, [data]), pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    direction = hidden[0].mean(0) / hidden[0].mean(0).norm()
    ended_early = False
    for eos_embedding in (None, direction * 1.3 * TINY_ORIGINAL_CONFIG["dim_model"] ** 0.5):
        v, m = copy.deepcopy(vlu), copy.deepcopy(model)
        if eos_embedding is not None:
            with torch.no_grad():
                v.llm.input_embedding.weight[7] = eos_embedding
                m.language_model.model.embed_tokens.weight[7] = eos_embedding
        for beams in (1, 3):
            settings = {**CHAT, "beam_size": beams}
            expected, _ = original_chat_generate(v, pixels[0], data["question"], **settings)
            answers, _ = m.original_beam_search(**_encode(tokenizer, [data]), pixel_values=pixels, **settings)
            assert tokenizer.decode_answers(data, answers[0])["<ans>"] == expected, (eos_embedding is None, beams)
            ended_early |= len(answers[0][0]) < CHAT["max_length"]
    assert ended_early


# -- generate() ---------------------------------------------------------------------------------------------------


def test_greedy_generate_batched_equals_single(chat):
    _, model, tokenizer, _ = chat
    pixels = _pixels(len(PROMPTS))
    batch = _encode(tokenizer, PROMPTS)
    out = model.generate(**batch, pixel_values=pixels, max_new_tokens=6, do_sample=False, num_beams=1,
                         original_beam_search=False)
    length = batch["input_ids"].shape[1]
    for row, data in enumerate(PROMPTS):
        inputs = _encode(tokenizer, [data])
        single = model.generate(**inputs, pixel_values=pixels[row: row + 1], max_new_tokens=6, do_sample=False, num_beams=1,
                         original_beam_search=False)
        assert single[0, inputs["input_ids"].shape[1]:].tolist() == out[row, length:].tolist()
        # The first greedy token is the argmax of the prompt's last logits (the image was used on the prompt step).
        with torch.no_grad():
            logits = model(**inputs, pixel_values=pixels[row: row + 1]).logits[0, -1]
        logits[1] = -1e4 if not inputs["unk_allowed"][0] else logits[1]
        assert int(logits.argmax()) == int(single[0, inputs["input_ids"].shape[1]])


def test_generate_with_vision_states_equals_with_pixels(chat):
    _, model, tokenizer, _ = chat
    pixels = _pixels(2)
    batch = _encode(tokenizer, PROMPTS)
    with torch.no_grad():
        vision = model.get_vision_hidden_states(pixels)
    a = model.generate(**batch, pixel_values=pixels, max_new_tokens=5, do_sample=False)  # the original beam search
    b = model.generate(**batch, vision_hidden_states=vision, max_new_tokens=5, do_sample=False)  # the original beam search
    assert torch.equal(a, b)


def test_sampling_and_hf_beam_search_with_images(chat):
    _, model, tokenizer, _ = chat
    pixels = _pixels(2)
    batch = _encode(tokenizer, PROMPTS)
    torch.manual_seed(0)
    a = model.generate(**batch, pixel_values=pixels, max_new_tokens=4, do_sample=True, top_k=20)
    torch.manual_seed(0)
    b = model.generate(**batch, pixel_values=pixels, max_new_tokens=4, do_sample=True, top_k=20)
    assert torch.equal(a, b)
    beams = model.generate(**batch, pixel_values=pixels, max_new_tokens=4, num_beams=3, num_return_sequences=2,
                           do_sample=False, original_beam_search=False)
    assert beams.shape == (4, batch["input_ids"].shape[1] + 4)
    # The best beam of each prompt starts like beam search over the same prompt alone.
    single = model.generate(**_encode(tokenizer, PROMPTS[1:]), pixel_values=pixels[1:], max_new_tokens=4,
                            num_beams=3, do_sample=False, original_beam_search=False)
    assert beams[2, -4:].tolist() == single[0, -4:].tolist()


def test_training_loss_reaches_vision_and_checkpointing_agrees(chat):
    """With labels (the tokenizer's training layout), the loss back-propagates into the queries, the vision
    encoder and the mapping; gradient checkpointing gives the same gradients."""
    _, model, tokenizer, _ = chat
    data = {**_prompt("这是什么？"), "<ans>": "一只猫"}
    inputs = tokenizer([data], return_tensors="pt", padding=True, return_labels=True)
    pixels = _pixels(1)

    def gradients(checkpointing):
        trained = copy.deepcopy(model).train()
        if checkpointing:
            trained.gradient_checkpointing_enable()
        loss = trained(**inputs, pixel_values=pixels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None}

    loss, grads = gradients(False)
    loss_ckpt, grads_ckpt = gradients(True)
    assert torch.isfinite(loss) and torch.allclose(loss, loss_ckpt)
    for name in ("query", "mapping.0.weight", "vision_model.layers.0.attention.q_proj.image.weight",
                 "vision_model.embeddings.patch_embedding.weight"):
        assert grads[name].abs().sum() > 0, name
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-5), name


# -- loading, saving, configs ---------------------------------------------------------------------------------------


def test_save_load_round_trip_and_half_precision(chat, tmp_path):
    _, model, tokenizer, _ = chat
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager")
    inputs = _encode(tokenizer, PROMPTS)
    pixels = _pixels(2)
    with torch.no_grad():
        reference = model(**inputs, pixel_values=pixels).logits
        assert torch.equal(reference, reloaded(**inputs, pixel_values=pixels).logits)
    half = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.vision_model.dtype == torch.bfloat16 and half.language_model.dtype == torch.bfloat16
    with torch.no_grad():
        out = half(**inputs, pixel_values=pixels)
    assert out.vision_hidden_states.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_auto_classes_and_config():
    config = AutoConfig.for_model(
        "viscpm_chat",
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                           image_size=16, patch_size=8),
        text_config=dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                         intermediate_size=24),
        query_num=4,
    )
    assert isinstance(config, VisCPMChatConfig) and isinstance(config.vision_config, VisCPMVisionConfig)
    assert type(AutoModel.from_config(config)) is VisCPMChatForConditionalGeneration
    model = AutoModelForImageTextToText.from_config(config)
    assert model.query.shape == (4, 16) and model.mapping[2].weight.shape == (16, 16)
    assert type(AutoModel.from_config(config.vision_config)) is VisCPMVisionModel
    assert set(VisCPMChatForConditionalGeneration._no_split_modules) == {
        "VisCPMVisionEmbeddings", "VisCPMVisionLayer", "CpmBeeDecoderLayer"
    }
    again = VisCPMChatConfig.from_dict(config.to_dict())
    assert again.vision_config.to_dict() == config.vision_config.to_dict() and again.query_num == 4


def test_clear_errors_for_bad_inputs(chat):
    _, model, tokenizer, _ = chat
    inputs = _encode(tokenizer, PROMPTS[:1])
    args = {k: inputs[k] for k in ("input_ids", *LM_KEYS)}
    with pytest.raises(ValueError, match="32x32"):
        model(**args, pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="image_bound"):
        model(**args, pixel_values=_pixels(1), image_bound=torch.tensor([[3, 10]]))
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        model(**args, vision_hidden_states=torch.zeros(2, QUERY_NUM, TINY_ORIGINAL_CONFIG["dim_model"]))
    text_only = _encode(tokenizer, [{"question": "hi", "<ans>": ""}])
    with pytest.raises(ValueError, match="no image slots"):
        model(**{k: text_only[k] for k in ("input_ids", *LM_KEYS)}, pixel_values=_pixels(1))
