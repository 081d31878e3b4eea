"""VisCPMImageProcessor and VisCPMChatProcessor against the original VisCPM-Chat input preparation.

The oracle: `build_transform(is_train=False)` for pixels (the `transform` fixture); `VLLMCPMBeeGeneration._process_list`
(through `convert_data_to_id`) for the prompt of `chat()`, as `oracle.original_chat_inputs` drives it.
"""

import io
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import viscpm  # noqa: F401  (registers the Auto classes)
from viscpm.modeling.image_processing_viscpm import VisCPMImageProcessor
from viscpm.modeling.processing_viscpm_chat import VisCPMChatProcessor
from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer


V = 86583


@pytest.fixture(scope="module")
def transform(oracle):
    """The original's pixel preprocessing (`build_transform(is_train=False)`)."""
    from VisCPM.utils.utils import build_transform

    return build_transform(is_train=False)


@pytest.fixture(scope="module")
def processor(vocab_file):
    return VisCPMChatProcessor(VisCPMImageProcessor(), CpmBeeTokenizer(vocab_file))


def _image(seed, height, width, mode="RGB"):
    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8), mode=mode)


def _file(tmp_path, image, name, **save_kwargs):
    path = tmp_path / name
    image.save(path, **save_kwargs)
    return path


def _pairs(ids, ext_ids, ext_sub):
    return [(int(ext_ids[i - V]), int(ext_sub[i - V])) if i >= V else (int(i), 0) for i in ids]


def _check_against_original(processor, images, questions, contexts):
    """Our batched encoding equals the original's, token for token and pixel for pixel, with correct image slots."""
    from oracle import original_chat_inputs

    enc = processor(images=images, text=questions, context=contexts)
    _, padded, info, pixels, bounds = original_chat_inputs(images, questions, contexts)
    assert torch.equal(enc["pixel_values"], pixels)  # bit-exact
    table = list(zip(padded["batch_ext_table_ids"].tolist(), padded["batch_ext_table_sub"].tolist()))
    ext_ids, ext_sub = enc["ext_table_ids"][0], enc["ext_table_sub"][0]
    assert list(zip(ext_ids.tolist(), ext_sub.tolist()))[: len(table)] == table
    width = enc["input_ids"].shape[1]
    for b in range(len(questions)):
        real = padded["context"][b] != 0
        expected = list(zip(padded["input_ids"][b][real].tolist(), padded["input_id_subs"][b][real].tolist()))
        mask = enc["attention_mask"][b].bool()
        got = _pairs(enc["input_ids"][b][mask].tolist(), ext_ids, ext_sub)
        assert got == expected + [(processor.tokenizer.bos_token_id, 0)]  # then the answer's `<s>`
        segs = padded["segment_ids"][b][real].tolist() + [int(info[b]["predict_segments"][0][0])]
        assert enc["segment_ids"][b][mask].tolist() == segs
        # image_bound: the original's own (start, end) for the item, shifted by this row's left padding.
        pad = width - int(mask.sum())
        assert enc["image_bound"][b].tolist() == [int(bounds[b][0]) + pad, int(bounds[b][1]) + pad]
        start, end = enc["image_bound"][b].tolist()
        assert end - start == 64 and enc["input_ids"][b, start:end].eq(processor.tokenizer.unk_token_id).all()
    return enc


# ---------------------------------------------------------------------------------------------- image processor


@pytest.mark.parametrize("size", [(224, 224), (1, 1), (37, 500), (480, 640), (1500, 2000), (999, 3)])
def test_pixels_bit_exact(size, transform):
    image = _image(sum(size), *size)
    out = VisCPMImageProcessor()(image)["pixel_values"]
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out[0], transform(image))


def test_input_kinds_agree(transform, tmp_path):
    image = _image(1, 61, 45)
    expected = transform(image)
    array = np.asarray(image)
    ip = VisCPMImageProcessor()
    path = _file(tmp_path, image, "a.png")
    inputs = [
        array,  # HWC uint8
        array.transpose(2, 0, 1),  # CHW uint8
        array.astype(np.float32) / 255,  # HWC float in [0, 1]
        torch.from_numpy(array).permute(2, 0, 1),  # CHW uint8 tensor
        torch.from_numpy(array).permute(2, 0, 1).float() / 255,  # CHW float tensor
        str(path),
        path,
        path.read_bytes(),
    ]
    out = ip(inputs)["pixel_values"]
    assert out.shape == (len(inputs), 3, 224, 224)
    for row in out:
        assert torch.equal(row, expected)
    assert torch.equal(ip(np.stack([array, array]))["pixel_values"][1], expected)  # 4-D batch
    assert isinstance(ip(image, return_tensors="np")["pixel_values"], np.ndarray)


def test_modes_converted(transform, tmp_path):
    ip = VisCPMImageProcessor()
    grey = _image(2, 30, 40, "L")
    assert torch.equal(ip(grey)["pixel_values"][0], transform(grey.convert("RGB")))
    palette = _image(3, 30, 40).convert("P")
    assert torch.equal(ip(palette)["pixel_values"][0], transform(palette.convert("RGB")))
    # Opaque RGBA equals convert("RGB"); transparent pixels become white (not the hidden colour).
    rgba = _image(4, 30, 40, "RGBA")
    opaque = rgba.copy()
    opaque.putalpha(255)
    assert torch.equal(ip(opaque)["pixel_values"][0], transform(opaque.convert("RGB")))
    clear = rgba.copy()
    clear.putalpha(0)
    assert ip(clear)["pixel_values"].eq(1.0).all()
    # A palette image with a transparent index, and grey + alpha.
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert ip(p)["pixel_values"].eq(1.0).all()
    assert ip(Image.new("LA", (5, 5), (0, 0)))["pixel_values"].eq(1.0).all()
    # 16-bit: scaled to 8 bits, not clipped to white.
    ramp = (np.arange(40 * 30).reshape(30, 40) * 54).astype(np.uint16)
    path16 = _file(tmp_path, Image.fromarray(ramp), "ramp16.png")
    assert Image.open(path16).mode == "I;16"
    expected = Image.fromarray(np.round(ramp / 257).astype(np.uint8)).convert("RGB")
    for source in (path16, Image.fromarray(ramp.astype(np.int32)), ramp):
        assert torch.equal(ip(source)["pixel_values"][0], transform(expected))
    # Float ("F") image in [0, 1].
    f = Image.fromarray((np.arange(12).reshape(3, 4) / 11).astype(np.float32), mode="F")
    expected = Image.fromarray(np.round(np.arange(12).reshape(3, 4) / 11 * 255).astype(np.uint8)).convert("RGB")
    assert torch.equal(ip(f)["pixel_values"][0], transform(expected))
    # Other modes go through PIL's conversion.
    cmyk = _image(5, 20, 20).convert("CMYK")
    assert torch.equal(ip(cmyk)["pixel_values"][0], transform(cmyk.convert("RGB")))
    bw = _image(6, 20, 20).convert("1")
    assert torch.equal(ip(bw)["pixel_values"][0], transform(bw.convert("RGB")))


def test_exif_orientation(transform, tmp_path):
    upright = _image(7, 40, 60)  # 60 wide, 40 tall
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera stores it: 40 wide, 60 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": undoes ROTATE_90 (which turns counter-clockwise)
    path = _file(tmp_path, stored, "rotated.png", exif=exif.tobytes())
    ip = VisCPMImageProcessor()
    assert torch.equal(ip(path)["pixel_values"][0], transform(upright))
    assert torch.equal(ip(Image.open(path))["pixel_values"][0], transform(upright))
    no_exif = VisCPMImageProcessor(apply_exif_orientation=False)
    assert torch.equal(no_exif(path)["pixel_values"][0], transform(stored))


def test_bad_images(tmp_path, monkeypatch):
    ip = VisCPMImageProcessor()
    with pytest.raises(FileNotFoundError, match="not found"):
        ip(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="is a directory"):
        ip(str(tmp_path))
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        ip(str(text_file))
    full = io.BytesIO()
    _image(8, 200, 300).save(full, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ip(str(truncated))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # the user's explicit opt-in is respected
    assert ip(str(truncated))["pixel_values"].shape == (1, 3, 224, 224)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    with pytest.raises(ValueError, match="zero size|empty"):
        ip(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="empty"):
        ip(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="channels"):
        ip(np.zeros((5, 6, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        ip(np.full((4, 4, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="unsupported image type"):
        ip(42)
    with pytest.raises(FileNotFoundError, match="image 1: .*not found"):
        ip([_image(9, 5, 5), str(tmp_path / "nope.png")])
    # Huge: above PIL's decompression-bomb limit (warning range and error range alike) is a clear error.
    big = _file(tmp_path, Image.new("RGB", (300, 200)), "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 1.5x over: PIL itself would only warn
    with pytest.raises(ValueError, match="300x200 = 60000 pixels, above PIL's decompression-bomb limit"):
        ip(str(big))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 3x over: PIL raises
    with pytest.raises(ValueError, match="too large to decode safely"):
        ip(str(big))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user disabled the guard: decoded and resized
    assert ip(str(big))["pixel_values"].shape == (1, 3, 224, 224)


# ---------------------------------------------------------------------------------------------- prompts


QUESTIONS = ["这张图片里有什么？", "What is in this image?", "图中𠀀𠀁是什么意思？", "", "再详细一点"]
CONTEXTS = ["", "", "", "", "User: 这是什么？\nAI: 一只猫。\nUser: 什么颜色？\nAI: 橘色。\n"]


@pytest.mark.oracle
def test_single_items_match_original(processor):
    for i, (question, context) in enumerate(zip(QUESTIONS, CONTEXTS)):
        enc = _check_against_original(processor, [_image(i, 40 + i, 70)], [question], [context])
        single = processor(images=_image(i, 40 + i, 70), text=question, context=context)  # unbatched call
        assert all(torch.equal(single[key], enc[key]) for key in enc)


@pytest.mark.oracle
def test_batch_matches_original_with_padding(processor):
    images = [_image(10 + i, 30 + 7 * i, 50) for i in range(len(QUESTIONS))]
    enc = _check_against_original(processor, images, QUESTIONS, CONTEXTS)
    lengths = enc["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1  # really padded
    for b in range(len(QUESTIONS)):  # each row is its single encoding, left padded
        single = processor(images=images[b], text=QUESTIONS[b], context=CONTEXTS[b])
        n = int(lengths[b])
        assert single["input_ids"].shape[1] == n
        pad = enc["input_ids"].shape[1] - n
        assert torch.equal(enc["image_bound"][b], single["image_bound"][0] + pad)
        for key in ("segment_ids", "context_mask", "attention_mask"):
            assert torch.equal(enc[key][b, pad:], single[key][0])


def test_empty_question_is_allowed(processor):
    # The original accepts "" (its question leaf is just `<s></s>`); so do we (checked against it above too).
    enc = processor(images=_image(0, 8, 8), text="")
    assert enc["input_ids"].shape[0] == 1


@pytest.mark.oracle
def test_user_text_is_always_text(processor):
    from oracle import original_chat_inputs

    tok = processor.tokenizer
    nasty = ["a<b", "1 < 2 and 3 > 2", "what is <ans> here", "x <unk> y", "<s>hi</s>", "<ans_1>", "a<b>c", "<"]
    # The original breaks: some raise inside its tokenizer...
    for question in ("a<b", "1 < 2 and 3 > 2", "a<b>c"):
        with pytest.raises(ValueError):
            original_chat_inputs(None, [question])
    # ...and the others silently become control tokens (e.g. an extra `<unk>` slot, an `<ans>` in the question).
    _, padded, _, _, _ = original_chat_inputs(None, ["x <unk> y", "what is <ans> here"])
    assert (padded["input_ids"][0] == tok.unk_token_id).sum() == 65
    assert (padded["input_ids"][1] == tok.convert_tokens_to_ids("<ans>")).sum() == 2  # the key and the question's

    plain = processor(text="plain question")
    for question in nasty:
        for context in ("", f"User: {question}\nAI: ok <ans>\n"):
            enc = processor(text=question, context=context)
            ids = enc["input_ids"][0]
            # Same structure as an ordinary prompt: 64 `<unk>` slots, one `<ans>` (the key), the same segments.
            assert int((ids == tok.unk_token_id).sum()) == 64
            assert int((ids == tok.convert_tokens_to_ids("<ans>")).sum()) == 1
            assert enc["segment_rel"].shape == plain["segment_rel"].shape
            assert torch.equal(enc["segment_ids"][0].unique(), plain["segment_ids"][0].unique())
            # The question segment decodes back to exactly what the user typed.
            question_tokens = ids[enc["segment_ids"][0] == 6][1:-1].tolist()
            assert tok.unescape(tok.decode(question_tokens)) == question
            # And it is exactly what the original gives when the text is escaped first.
            _, padded, _, _, _ = original_chat_inputs(None, [tok.escape(question)], [tok.escape(context)])
            real = padded["context"][0] != 0
            expected = list(zip(padded["input_ids"][0][real].tolist(), padded["input_id_subs"][0][real].tolist()))
            got = _pairs(ids.tolist(), enc["ext_table_ids"][0], enc["ext_table_sub"][0])
            assert got == expected + [(tok.bos_token_id, 0)]


@pytest.mark.oracle
def test_prompt_length_limit_matches_original(processor):
    from oracle import original_chat_inputs

    context = "User: 你好\nAI: 你好！\n" * 40
    n = int(processor(text="问题", context=context)["attention_mask"].sum()) + 1  # + the `<ans_1>` placeholder
    # The original keeps an answer slot at max_inp_length = n and has none at n - 1.
    original_chat_inputs(None, ["问题"], [context], max_inp_length=n)
    with pytest.raises(ValueError, match="No answer to predict"):
        original_chat_inputs(None, ["问题"], [context], max_inp_length=n - 1)
    limited = VisCPMChatProcessor(processor.image_processor, processor.tokenizer, max_prompt_length=n)
    assert limited(text="问题", context=context)["input_ids"].shape[1] == n - 1
    limited.max_prompt_length = n - 1
    with pytest.raises(ValueError, match=f"the prompt is {n} tokens, over max_prompt_length={n - 1}"):
        limited(text="问题", context=context)
    with pytest.raises(ValueError, match="over max_prompt_length=3000"):
        processor(text="问题", context="很长的上下文" * 1000)  # the default limit is the original's 3000
    with pytest.raises(ValueError, match="item 1: the prompt is"):
        processor(text=["a", "b"], context=["", "很长的上下文" * 1000])


# ---------------------------------------------------------------------------------------------- chat messages


def _chat(image=None):
    first = [{"type": "image"} if image is None else {"type": "image", "image": image},
             {"type": "text", "text": "这是什么？"}]
    return [
        {"role": "user", "content": first},
        {"role": "assistant", "content": [{"type": "text", "text": "一只 <猫>。"}]},
        {"role": "user", "content": "什么颜色 <ans>?"},
    ]


def test_chat_messages_equal_question_and_context(processor):
    image = _image(20, 33, 44)
    context = "User: 这是什么？\nAI: 一只 <猫>。\n"
    reference = processor(images=image, text="什么颜色 <ans>?", context=context)
    variants = [
        processor(images=image, text=_chat()),
        processor(text=_chat(image)),
        processor.apply_chat_template(_chat(image), tokenize=True, return_dict=True),
        processor(images=image, text=processor.apply_chat_template(_chat())),  # the "templated" prompt dict
    ]
    for enc in variants:
        assert set(enc) == set(reference)
        assert all(torch.equal(enc[key], reference[key]) for key in reference)
    assert processor.apply_chat_template(_chat()) == processor.build_prompt("什么颜色 <ans>?", context)
    assert torch.equal(processor.apply_chat_template(_chat(image), tokenize=True), reference["input_ids"])
    # A batch of chats equals the batch of (question, context) pairs.
    batch = processor(text=[_chat(image), [{"role": "user", "content": [{"type": "image", "image": image},
                                                                        {"type": "text", "text": "hi"}]}]])
    expected = processor(images=[image, image], text=["什么颜色 <ans>?", "hi"], context=[context, ""])
    assert all(torch.equal(batch[key], expected[key]) for key in expected)
    first = processor(text=_chat(image)[:1])
    assert torch.equal(first["input_ids"], processor(images=image, text="这是什么？")["input_ids"])


@pytest.mark.oracle
def test_first_turn_chat_equals_the_original_prompt(processor):
    """The question of a first-turn chat is encoded as the original's `chat()` prompt."""
    _check_against_original(processor, [_image(20, 33, 44)], ["这是什么？"], [""])


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}], "no system prompt"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "end with a user message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}],
         "one image per conversation"),
        ([{"role": "user", "content": [{"type": "video"}]}], "unsupported content part"),
        ([{"role": "tool", "content": "x"}], "unknown role"),
    ],
)
def test_bad_chats(processor, messages, message):
    with pytest.raises(ValueError, match=message):
        processor(text=messages)


def test_bad_calls(processor):
    image = _image(0, 9, 9)
    with pytest.raises(ValueError, match="nothing to process"):
        processor()
    # Images alone give their pixel values, as the image processor does.
    assert torch.equal(processor(images=image)["pixel_values"], processor.image_processor(image)["pixel_values"])
    with pytest.raises(ValueError, match="2 images for 3 questions"):
        processor(images=[image, image], text=["a", "b", "c"])
    with pytest.raises(ValueError, match="one image for 2 questions"):
        processor(images=image, text=["a", "b"])
    with pytest.raises(ValueError, match="1 contexts for 2 questions"):
        processor(text=["a", "b"], context=["x"])
    with pytest.raises(ValueError, match="given both in the chat and as `images`"):
        processor(images=image, text=_chat(image))
    with pytest.raises(ValueError, match="continue an assistant message"):
        processor.apply_chat_template(_chat(), continue_final_message=True)
    with pytest.raises(ValueError, match="must start with 'image'"):
        processor(text={"question": "x", "<ans>": ""})
    with pytest.raises(TypeError, match="unsupported arguments"):
        processor(text="a", bogus=1)


# ---------------------------------------------------------------------------------------------- decoding, pipeline


def test_post_process_is_stateless(processor):
    """Decoding reads only the ids it is given (no memory of earlier calls): the prompt and prompt + answer decode
    the same way, so their difference is the answer; pieces outside the vocabulary cannot be spelt from ids and come
    out as U+FFFD, unless the caller passes the prompt's ext table (as `chat()` does)."""
    tok = processor.tokenizer
    question = "图中𠀀𠀁和𠀂是什么？"
    enc = processor(images=_image(0, 9, 9), text=question)
    prompt = processor.build_prompt(question)
    table = tok.get_ext_tables(prompt)
    ext_ids = sorted(i for i in table if i >= V)
    assert ext_ids  # the OOV pieces live in the ext table
    answer = [tok.convert_tokens_to_ids("是"), ext_ids[0], tok.unk_token_id, tok.convert_tokens_to_ids("<"),
              tok.eos_token_id]
    sequence = torch.cat([enc["input_ids"], torch.tensor([answer])], dim=1)
    for decoder in (processor, VisCPMChatProcessor(processor.image_processor, tok)):  # a fresh one: same result
        prompt_text = decoder.post_process_image_text_to_text(enc["input_ids"])[0]
        full_text = decoder.post_process_image_text_to_text(sequence)[0]
        # Specials skipped, the image slots left out, the two OOV pieces of the question unspellable from ids.
        assert prompt_text == "imagecontextquestion图中\ufffd和\ufffd是什么？"
        assert full_text == prompt_text + "是\ufffd\ufffd<<"
    # With the prompt's table (what chat() has), exactly the original's decoding of the answer.
    expected = tok.decode_answers(prompt, [answer])["<ans>"]
    assert expected == "是" + table[ext_ids[0]] + table[tok.unk_token_id] + "<<"
    exact = processor.post_process_image_text_to_text(sequence, ext_tables=[table])[0]
    assert exact == "imagecontextquestion" + question + expected
    assert processor.post_process_image_text_to_text(torch.tensor([answer]), ext_tables=[table]) == [expected]
    # A generate() output object works too, and left padding is ignored.
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), sequence], dim=1)
    assert processor.post_process_image_text_to_text(SimpleNamespace(sequences=padded)) == [full_text]
    with pytest.raises(ValueError, match="2 ext tables for 1 rows"):
        processor.post_process_image_text_to_text(sequence, ext_tables=[table, table])


def test_pipeline_contract(processor):
    """What `pipeline("image-text-to-text")` does around the model, with a stand-in for `generate`."""
    from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline, ReturnType
    from transformers.utils.chat_template_utils import Chat

    tok = processor.tokenizer
    image = _image(30, 20, 20)
    host = SimpleNamespace(processor=processor, tokenizer=tok, dtype=torch.float32)
    answer = [tok.convert_tokens_to_ids("猫"), tok.eos_token_id]
    for inputs, question, context in [
        ({"images": image, "text": "这是什么？"}, "这是什么？", ""),
        (Chat(_chat(image)), "什么颜色 <ans>?", "User: 这是什么？\nAI: 一只 <猫>。\n"),
    ]:
        model_inputs = ImageTextToTextPipeline.preprocess(host, inputs)
        expected = processor(images=image, text=question, context=context)
        assert all(torch.equal(model_inputs[key], expected[key]) for key in expected)
        prompt_text = model_inputs.pop("text")
        generated = torch.cat([model_inputs["input_ids"], torch.tensor([answer])], dim=1)
        outputs = {"generated_sequence": generated, "prompt_text": prompt_text, "input_ids": model_inputs["input_ids"]}
        records = ImageTextToTextPipeline.postprocess(host, outputs, return_type=ReturnType.NEW_TEXT)
        assert records[0]["generated_text"] == "猫"


def test_save_and_load(processor, tmp_path):
    from transformers import AutoImageProcessor, AutoProcessor

    custom = VisCPMChatProcessor(VisCPMImageProcessor(apply_exif_orientation=False), processor.tokenizer,
                                 query_num=8, max_prompt_length=500)
    custom.save_pretrained(tmp_path)
    assert {"processor_config.json", "vocab.txt", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["query_num"] == 8 and saved["max_prompt_length"] == 500
    image = _image(40, 21, 34)
    expected = custom(images=image, text="你好 <s>", context="User: a\nAI: b\n")
    assert expected["image_bound"][0, 1] - expected["image_bound"][0, 0] == 8
    for loaded in (VisCPMChatProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is VisCPMChatProcessor
        assert loaded.query_num == 8 and loaded.max_prompt_length == 500
        assert loaded.image_processor.apply_exif_orientation is False
        out = loaded(images=image, text="你好 <s>", context="User: a\nAI: b\n")
        assert all(torch.equal(out[key], expected[key]) for key in expected)
    # A folder saved before the limit was renamed (key "max_length") keeps its limit.
    saved["max_length"] = saved.pop("max_prompt_length")
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    assert VisCPMChatProcessor.from_pretrained(tmp_path).max_prompt_length == 500
    # A model folder (config.json of type viscpm_chat) resolves the image processor through the Auto class too.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "viscpm_chat"}))
    custom.image_processor.save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is VisCPMImageProcessor


def test_remote_code_folder(processor, tmp_path, monkeypatch):
    """Saved with its auto classes, the processor loads with `trust_remote_code=True` where viscpm is not imported
    (the modeling files stand alone)."""
    import subprocess
    import sys

    monkeypatch.setattr(VisCPMChatProcessor, "_auto_class", "AutoProcessor")
    monkeypatch.setattr(VisCPMImageProcessor, "_auto_class", "AutoImageProcessor")
    monkeypatch.setattr(CpmBeeTokenizer, "_auto_class", "AutoTokenizer")
    processor.save_pretrained(tmp_path)
    assert {"processing_viscpm_chat.py", "image_processing_viscpm.py", "tokenization_cpmbee.py"} <= set(
        os.listdir(tmp_path))
    image = _image(50, 12, 13)
    expected = processor(images=image, text="远程 <ans>", context="User: x\nAI: y\n")
    torch.save({"image": np.asarray(image), **dict(expected)}, tmp_path / "expected.pt")
    script = (
        "import sys, numpy as np, torch\n"
        "from PIL import Image\n"
        "from transformers import AutoProcessor\n"
        "p = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert type(p).__module__.startswith('transformers_modules'), type(p).__module__\n"
        "assert 'viscpm' not in sys.modules\n"
        "e = torch.load(sys.argv[1] + '/expected.pt', weights_only=False)\n"
        "out = p(images=Image.fromarray(e.pop('image')), text='远程 <ans>', context='User: x\\nAI: y\\n')\n"
        "assert set(out) == set(e) and all(torch.equal(out[k], e[k]) for k in e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- processing kwargs


def test_processing_kwargs_flat_grouped_and_at_init(processor):
    """transformers' processing kwargs: flat or grouped per modality, overriding the processor's defaults."""
    image = _image(60, 20, 30)
    reference = processor(images=[image, image], text=["问", "一个更长的问题"])  # defaults: padded (left), tensors
    assert reference["attention_mask"][0, 0] == 0 and isinstance(reference["input_ids"], torch.Tensor)
    pixels = reference["pixel_values"]
    for kwargs in ({"padding_side": "right", "do_rescale": False},
                   {"text_kwargs": {"padding_side": "right"}, "images_kwargs": {"do_rescale": False}}):
        out = processor(images=[image, image], text=["问", "一个更长的问题"], **kwargs)
        assert out["attention_mask"][0, -1] == 0
        assert torch.equal(out["input_ids"][1], reference["input_ids"][1])
        # Not rescaled: (x - 0.5) / 0.5 on 0..255 values, the same x as the default's x / 255.
        assert torch.allclose((out["pixel_values"][0] * 0.5 + 0.5) / 255, pixels[0] * 0.5 + 0.5, atol=1e-6)
    as_lists = processor(images=[image, image], text=["问", "一个更长的问题"], common_kwargs={"return_tensors": None},
                         padding=False)
    assert isinstance(as_lists["input_ids"], list) and len(as_lists["input_ids"][0]) < len(as_lists["input_ids"][1])
    assert isinstance(processor(images=image, text="问", return_tensors="np")["pixel_values"], np.ndarray)
    padded = processor(images=image, text="问", padding="max_length", max_length=120)
    assert padded["input_ids"].shape == (1, 120)
    with pytest.raises(ValueError, match="passed two times"):
        processor(images=image, text="问", do_rescale=False, images_kwargs={"do_rescale": True})
    with pytest.raises(ValueError, match="does not take videos"):
        processor(images=image, text="问", videos=[np.zeros((2, 8, 8, 3))])
    # do_rescale / rescale_factor at init are honoured too.
    halved = VisCPMChatProcessor(VisCPMImageProcessor(rescale_factor=1 / 510), processor.tokenizer)
    assert torch.allclose(halved(images=image, text="问")["pixel_values"] * 0.5 + 0.5,
                          (pixels[0] * 0.5 + 0.5) / 2, atol=1e-6)
    assert VisCPMImageProcessor(do_rescale=False)(image)["pixel_values"].abs().max() > 2  # 0..255 scale kept


def test_nested_images_and_multimodal_tokens(processor):
    images = [_image(61, 20, 30), _image(62, 25, 25)]
    flat = processor(images=images, text=["a", "b"])
    nested = processor(images=[[images[0]], [images[1]]], text=["a", "b"])
    assert all(torch.equal(flat[key], nested[key]) for key in flat)
    single = processor(images=[[images[0]]], text="a")
    assert torch.equal(single["pixel_values"], flat["pixel_values"][:1])
    with pytest.raises(ValueError, match="item 1: got 2 images"):
        processor(images=[[images[0]], images], text=["a", "b"])
    out = processor(images=images, text=["a", "a much longer question"], return_mm_token_type_ids=True)
    for row, (start, end) in enumerate(out["image_bound"].tolist()):
        assert out["mm_token_type_ids"][row].nonzero().flatten().tolist() == list(range(start, end))
    counts = processor._get_num_multimodal_tokens(image_sizes=[(20, 30), (25, 25)])["num_image_tokens"]
    assert counts == out["mm_token_type_ids"].sum(-1).tolist() == [processor.query_num] * 2


def test_chat_template_tokenized_is_chat_prompt(processor):
    """`apply_chat_template(messages, tokenize=True)` (what the pipeline calls) gives chat()'s prompt: the earlier
    turns become the context, the last user turn the question, the image part the pixels."""
    image = _image(63, 30, 30)
    pipeline_kwargs = dict(continue_final_message=False, return_tensors="pt", tokenize=True, return_dict=True,
                           add_generation_prompt=True, processor_kwargs={})
    out = processor.apply_chat_template(_chat(image), **pipeline_kwargs)
    expected = processor(images=image, text="什么颜色 <ans>?", context="User: 这是什么？\nAI: 一只 <猫>。\n")
    assert set(out) == set(expected) and all(torch.equal(out[key], expected[key]) for key in expected)
    import base64

    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    messages = [{"role": "user", "content": [
        {"type": "image", "base64": "data:image/png;base64," + base64.b64encode(encoded.getvalue()).decode()},
        {"type": "text", "text": "hi"}]}]
    from_base64 = processor.apply_chat_template(messages, **pipeline_kwargs)
    assert torch.equal(from_base64["pixel_values"], processor(images=image, text="hi")["pixel_values"])
    with pytest.raises(ValueError, match="drop tools"):
        processor.apply_chat_template(_chat(image), tools=[{"name": "x"}])
