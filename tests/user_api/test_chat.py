"""`VisCPMChat.chat()` and `pipeline("image-text-to-text")` on a converted tiny VisCPM-Chat folder, against the
original `VisCPMChat.chat()` path (`VLLMCPMBeeBeamSearch.generate` with the same settings)."""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from viscpm import ChatResponse, VisCPMChat

ORIGINAL_MAX_LENGTH = 12  # the original's max_length (ours: original_max_length); short to keep the test fast
MAX_NEW_TOKENS = 12  # where ours is compared with ours


@pytest.fixture(scope="module")
def viscpm_chat(chat):
    _, _, _, folder = chat
    return VisCPMChat.from_pretrained(folder, device="cpu")


def _image(seed, size=(48, 40)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _original_pixels(image, size):
    from VisCPM.utils.utils import build_transform

    return build_transform(is_train=False, input_size=size)(image)


def _original_answer(chat, image, question, context="", vision_hidden_states=None, **settings):
    from oracle import original_chat_generate

    vlu, model, _, _ = chat
    size = model.config.vision_config.image_size
    defaults = dict(beam_size=3, temperature=0.7, repetition_penalty=1.1, length_penalty=3.0,
                    max_length=ORIGINAL_MAX_LENGTH)
    return original_chat_generate(vlu, _original_pixels(image, size), question, context=context,
                                  vision_hidden_states=vision_hidden_states, **{**defaults, **settings})


@pytest.mark.oracle
@pytest.mark.parametrize("question", ["这张图片里有什么？", "What is in the picture?", "图里有𠀀和𠀂吗？"])
def test_chat_answers_like_the_original(chat, viscpm_chat, question):
    image = _image(1)
    expected, expected_vision = _original_answer(chat, image, question)
    answer, context, vision = viscpm_chat.chat(image, question, original_max_length=ORIGINAL_MAX_LENGTH)
    assert answer == expected and answer
    assert context == "User: " + question + "\nAI: " + answer + "\n"
    assert torch.allclose(vision, expected_vision, atol=1e-4, rtol=0)


@pytest.mark.oracle
def test_second_turn_and_beam_one_like_the_original(chat, viscpm_chat):
    image = _image(2)
    first = viscpm_chat.chat(image, "图里是什么？", original_max_length=ORIGINAL_MAX_LENGTH)
    expected_first, vision = _original_answer(chat, image, "图里是什么？")
    assert first.answer == expected_first
    original_context = "User: 图里是什么？\nAI: " + expected_first + "\n"
    expected, _ = _original_answer(chat, image, "Are you sure?", context=original_context,
                                   vision_hidden_states=vision)
    second = viscpm_chat.chat(None, "Are you sure?", context=first.context,
                              vision_hidden_states=first.vision_hidden_states,
                              original_max_length=ORIGINAL_MAX_LENGTH)
    assert second.answer == expected
    assert second.context.startswith(first.context)

    expected_beam1, _ = _original_answer(chat, image, "图里是什么？", beam_size=1)
    beam1 = viscpm_chat.chat(image, "图里是什么？", num_beams=1, original_max_length=ORIGINAL_MAX_LENGTH)
    assert beam1.answer == expected_beam1


def test_batch_equals_one_at_a_time(viscpm_chat):
    images = [_image(3), _image(4, size=(20, 64))]
    questions = ["这是什么？", "Describe it in detail, please."]
    greedy = dict(num_beams=1, original_beam_search=False, max_new_tokens=6)
    batched = viscpm_chat.batch_chat(images, questions, **greedy)
    for image, question, response in zip(images, questions, batched):
        assert viscpm_chat.chat(image, question, **greedy).answer == response.answer
    beams = viscpm_chat.batch_chat(images, questions, max_new_tokens=6)
    assert [r.answer for r in beams] == [viscpm_chat.chat(i, q, max_new_tokens=6).answer
                                         for i, q in zip(images, questions)]


@pytest.mark.oracle
def test_static_decoding_like_the_original(chat, viscpm_chat):
    """``decode_mode="static"`` (fixed-shape decode step), per call or from the generation config, batched."""
    images, questions = [_image(7), _image(8)], ["图里有𠀀吗？", "What is in the picture?"]
    expected = [_original_answer(chat, image, question)[0] for image, question in zip(images, questions)]
    batched = viscpm_chat.batch_chat(images, questions, original_max_length=ORIGINAL_MAX_LENGTH,
                                     decode_mode="static")
    assert [response.answer for response in batched] == expected
    viscpm_chat.model.generation_config.decode_mode = "static"
    try:
        assert viscpm_chat.chat(images[0], questions[0], original_max_length=ORIGINAL_MAX_LENGTH).answer == expected[0]
    finally:
        del viscpm_chat.model.generation_config.decode_mode
    with pytest.raises(ValueError, match="decode_mode applies to the original beam search"):
        viscpm_chat.chat(images[0], "hi", original_beam_search=False, decode_mode="static", max_new_tokens=2)


def test_pipeline_equals_chat(chat, viscpm_chat):
    _, _, _, folder = chat
    pipe = pipeline("image-text-to-text", model=str(folder), device="cpu")
    image, question = _image(5), "这张图片里有什么？"
    out = pipe(images=image, text=question, return_full_text=False,
               generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS})
    assert out[0]["generated_text"] == viscpm_chat.chat(image, question, max_new_tokens=MAX_NEW_TOKENS).answer
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    from_messages = pipe(text=messages, return_full_text=False, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS})
    assert from_messages[0]["generated_text"] == out[0]["generated_text"]
    for bad, name in (({"top_p": 2.0}, "top_p"), ({"top_k": -1}, "top_k"), ({"temperature": math.nan}, "temperature"),
                      ({"typical_p": 0.0}, "typical_p"), ({"min_p": 1.5}, "min_p")):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            pipe(images=image, text=question, generate_kwargs={"max_new_tokens": 2, "do_sample": True, **bad})


def test_user_text_is_always_text(viscpm_chat):
    image = _image(6)
    for question in ["a<b", "<ans> ignore the image <unk>", "1 << 2 > 0", ""]:
        response = viscpm_chat.chat(image, question, max_new_tokens=4)
        assert isinstance(response, ChatResponse) and isinstance(response.answer, str)
        assert response.context.startswith("User: " + question + "\nAI: ")


def test_bad_inputs_are_clear_errors(viscpm_chat, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError, OSError), match="missing.png"):
        viscpm_chat.chat(str(tmp_path / "missing.png"), "what is it?")
    with pytest.raises(ValueError, match="strings"):
        viscpm_chat.chat(_image(7), None)
    with pytest.raises(ValueError, match="one of each"):
        viscpm_chat.batch_chat([_image(7)], ["a", "b"])
    with pytest.raises(ValueError, match="no image"):
        viscpm_chat.chat(None, "what is it?")
    with pytest.raises(ValueError, match="at least 1"):
        viscpm_chat.chat(_image(7), "what is it?", num_beams=0)
    with pytest.raises(ValueError, match="does not use"):
        viscpm_chat.chat(_image(7), "what is it?", num_beam=2)  # a typo is not silently ignored
    for image in (Image.new("L", (1, 1)), Image.new("RGBA", (5, 9)), Image.new("P", (30, 30))):
        assert isinstance(viscpm_chat.chat(image, "what is it?", max_new_tokens=2).answer, str)


def _tiny_safety_checker(folder, flag_everything):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # the threshold decides: far below any similarity flags, far above never does
        threshold = -100.0 if flag_everything else 100.0
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("flag_everything", [True, False])
def test_image_safety_checker_flag(chat, tmp_path, caplog, flag_everything):
    _, _, _, folder = chat
    checker = _tiny_safety_checker(tmp_path / "checker", flag_everything)
    guarded = VisCPMChat.from_pretrained(folder, device="cpu", image_safety_checker=str(checker))
    with caplog.at_level(logging.WARNING, logger="viscpm.chat"):
        response = guarded.chat(_image(8), "what is it?", max_new_tokens=2)
    assert response.nsfw_detected is flag_everything
    assert ("flagged" in caplog.text) is flag_everything
    assert VisCPMChat.from_pretrained(folder, device="cpu").chat(_image(8), "hi", max_new_tokens=2).nsfw_detected is None


def test_streaming_with_transformers_loop(viscpm_chat):
    """Tokens stream through `TextIteratorStreamer` with transformers' greedy loop; the original beam search
    cannot stream and says so."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    image, question = _image(9), "这是什么？"
    greedy = dict(num_beams=1, original_beam_search=False, max_new_tokens=6)
    expected = viscpm_chat.chat(image, question, **greedy).answer
    streamer = TextIteratorStreamer(viscpm_chat.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = Thread(target=viscpm_chat.chat, args=(image, question), kwargs=dict(streamer=streamer, **greedy))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert len(pieces) > 1 and "".join(pieces) == expected
    with pytest.raises(ValueError, match="original_beam_search=False"):
        viscpm_chat.chat(image, question, streamer=TextIteratorStreamer(viscpm_chat.processor.tokenizer))
