"""`VisCPMPaint`, the drop-in for the original class: its prompt checker and ranker, its folders, and `generate`
against the original (the tiny Paint of tests/paint_testing.py)."""

import contextlib
import copy
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from paint_testing import EN, NEGATIVE, SIZE, STEPS, ZH
from paint_testing import batches as _batches
from paint_testing import gen as _gen
from paint_testing import ours as _ours
from paint_testing import with_parts as _with_parts
from transformers import pipeline as hf_pipeline

from viscpm import VisCPMPaint, VisCPMPaintPipeline
from viscpm.paint import PARTS


# ---------------------------------------------------------------------------------------------- optional parts


def test_ranker_returns_the_best_candidate(paint, paint_extras):
    pipe = VisCPMPaint(paint["pipe"], ranker=paint_extras["ranker"], ranker_processor=paint_extras["ranker_processor"])
    candidates = _ours(pipe, EN, num_images_per_prompt=4, use_ranker=False, output_type="pil").images
    scores = pipe.rank(EN, candidates)
    assert len(set(scores.tolist())) == 4  # distinct scores: the choice is meaningful
    best = _ours(pipe, EN, output_type="pil").images
    assert len(best) == 1
    assert np.array_equal(np.asarray(best[0]), np.asarray(candidates[int(scores.argmax())]))
    # Two requested images: each is the best of its own four candidates.
    eight = _ours(pipe, EN, num_images_per_prompt=8, use_ranker=False, output_type="pil").images
    two = _ours(pipe, EN, num_images_per_prompt=2, output_type="pil").images
    for k in range(2):
        group = eight[4 * k: 4 * k + 4]
        assert np.array_equal(np.asarray(two[k]), np.asarray(group[int(pipe.rank(EN, group).argmax())]))


def test_ranker_picks_per_prompt_and_image_in_one_batch(paint, paint_extras):
    """Two prompts × two images: the ranker runs once on all 16 candidates, and each image is its own group's best
    against its own prompt (scores scripted so that another group's or prompt's column would pick another)."""
    pipe = VisCPMPaint(paint["pipe"], ranker=paint_extras["ranker"], ranker_processor=paint_extras["ranker_processor"])
    candidates = _ours(pipe, [EN, ZH], num_images_per_prompt=8, use_ranker=False).images
    best = {0: 1, 1: 3, 2: 0, 3: 2}  # group (prompt-major) -> its best candidate
    scores = torch.zeros(16, 2)
    for group, k in best.items():
        prompt = group // 2
        scores[4 * group + k, prompt] = 1.0
        scores[4 * group + (k + 1) % 4, 1 - prompt] = 2.0  # the other prompt's column prefers another candidate

    def scripted(module, args, kwargs, output):
        assert kwargs["pixel_values"].shape[0] == 16 and kwargs["input_ids"].shape[0] == 2
        output.logits_per_image = scores.clone()
        return output

    handle = pipe.ranker.register_forward_hook(scripted, with_kwargs=True)
    try:
        with _batches(pipe.ranker, "pixel_values") as calls:
            got = _ours(pipe, [EN, ZH], num_images_per_prompt=2).images
    finally:
        handle.remove()
    assert calls == [16]
    expected = candidates[[4 * group + k for group, k in best.items()]]
    assert np.array_equal(got, expected)


def test_prompt_checker_refuses_flagged_prompts(paint, paint_extras):
    checker, tokenizer = paint_extras["prompt_checker"], paint_extras["prompt_checker_tokenizer"]
    pipe = VisCPMPaint(paint["pipe"], prompt_checker=checker, prompt_checker_tokenizer=tokenizer)
    with torch.no_grad():
        logits = checker(**tokenizer([EN, ZH], return_tensors="pt", padding=True)).logits
    p_en, p_zh = logits.softmax(-1)[:, 1].tolist()
    assert abs(p_en - p_zh) > 1e-3
    flagged, clean = (EN, ZH) if p_en > p_zh else (ZH, EN)
    pipe.prompt_checker_threshold = (p_en + p_zh) / 2  # between the two: one is refused

    # The original's rule (a transformers text-classification pipeline, label 1 above the threshold) agrees.
    classify = hf_pipeline("text-classification", model=checker, tokenizer=tokenizer, device="cpu")
    for text, refused in ((flagged, True), (clean, False)):
        top = classify(text, top_k=None)[0]
        assert (top["label"] == "LABEL_1" and top["score"] > pipe.prompt_checker_threshold) == refused

    out = _ours(pipe, [flagged, clean], num_images_per_prompt=2)
    assert out.prompt_refused == [True, True, False, False]
    assert not out.images[:2].any()  # nothing drawn: black
    assert out.nsfw_content_detected == [None] * 4
    assert np.array_equal(out.images[2:], _ours(paint["pipe"], clean, num_images_per_prompt=2).images)
    only = _ours(pipe, flagged)
    assert only.prompt_refused == [True] and only.images.shape == (1, SIZE, SIZE, 3)


def test_save_and_load_with_optional_parts(paint, paint_extras, tmp_path):
    safety = {name: paint_extras[name] for name in ("safety_checker", "feature_extractor")}
    parts = {name: paint_extras[name] for name in PARTS}
    pipe = VisCPMPaint(_with_parts(paint["pipe"], **safety), **parts, prompt_checker_threshold=0.6)
    pipe.save_pretrained(tmp_path)
    again = VisCPMPaint.from_pretrained(tmp_path, device="cpu")
    for name, component in {**pipe.pipeline.components, **parts}.items():
        assert type(getattr(again.pipeline, name, None) or getattr(again, name)) is type(component), name
    assert again.prompt_checker_threshold == pipe.prompt_checker_threshold
    a = _ours(pipe, EN, output_type="pil").images[0]
    b = _ours(again, EN, output_type="pil").images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))

# ---------------------------------------------------------------------------------------------- drop-in


def _pil_close(a, b):
    assert a.size == b.size
    return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1  # uint8 rounding of ≤ 2e-4


@pytest.mark.oracle
def test_drop_in_generate_matches_original(paint):
    ours = VisCPMPaint.from_pretrained(paint["root"] / "hf", image_safety_checker=False, prompt_safety_checker=False,
                                       add_ranker=False, device="cpu")
    original = paint["original"]
    for kwargs in (dict(prompt=ZH), dict(prompt=EN, negative_prompt=NEGATIVE, num_images_per_prompt=2)):
        expected = original.generate(**kwargs, image_size=SIZE, generator=_gen())
        got = ours.generate(**kwargs, image_size=SIZE, generator=_gen())
        assert got.size == expected.size == (SIZE * kwargs.get("num_images_per_prompt", 1), SIZE)
        assert _pil_close(got, expected)


@pytest.mark.oracle
def test_drop_in_with_ranker_matches_original(paint, paint_extras, tmp_path):
    VisCPMPaint(paint["pipe"], ranker=paint_extras["ranker"], ranker_processor=paint_extras["ranker_processor"]).save_pretrained(tmp_path)
    ours = VisCPMPaint.from_pretrained(tmp_path, image_safety_checker=False, prompt_safety_checker=False, device="cpu")
    assert ours.ranker is not None
    original = paint["original"]
    original.clip_ranker, original.clip_preprocessor = paint_extras["ranker"], paint_extras["ranker_processor"]
    try:
        expected = original.generate(EN, image_size=SIZE, generator=_gen())
    finally:
        original.clip_ranker = original.clip_preprocessor = None
    got = ours.generate(EN, image_size=SIZE, generator=_gen())
    assert got.size == (SIZE, SIZE) and _pil_close(got, expected)


@pytest.mark.oracle
def test_drop_in_refuses_like_original(paint, paint_extras, tmp_path):
    checker = copy.deepcopy(paint_extras["prompt_checker"])
    with torch.no_grad():
        checker.classifier.bias.copy_(torch.tensor([0.0, 10.0]))  # label 1 (unsafe) for every prompt
    tokenizer = paint_extras["prompt_checker_tokenizer"]
    VisCPMPaint(paint["pipe"], prompt_checker=checker, prompt_checker_tokenizer=tokenizer).save_pretrained(tmp_path)
    ours = VisCPMPaint.from_pretrained(tmp_path, image_safety_checker=False, add_ranker=False, device="cpu")
    original = paint["original"]
    original.prompt_safety_checker = hf_pipeline("text-classification", model=checker, tokenizer=tokenizer, device="cpu")
    try:
        assert original.generate(EN, image_size=SIZE, generator=_gen()) is None
    finally:
        original.prompt_safety_checker = None
    with pytest.warns(UserWarning, match="unsafe content"):
        assert ours.generate(EN, image_size=SIZE, generator=_gen()) is None


# ---------------------------------------------------------------------------------------------- speed


def test_one_batch_per_part(paint, paint_extras):
    """One call: the text encoder runs once (negatives and prompts together), the UNet once per step on every image
    and ranker candidate (times two for guidance), the ranker once."""
    pipe = VisCPMPaint(paint["pipe"], ranker=paint_extras["ranker"], ranker_processor=paint_extras["ranker_processor"])
    with (_batches(pipe.pipeline.text_encoder, "input_ids") as text, _batches(pipe.pipeline.unet) as unet,
          _batches(pipe.ranker, "pixel_values") as ranker):
        _ours(pipe, [EN, ZH], negative_prompt=NEGATIVE, num_images_per_prompt=2)
    assert text == [4]
    assert unet == [2 * 2 * 2 * 4] * STEPS
    assert ranker == [16]




# ---------------------------------------------------------------------------------------------- folders


@contextlib.contextmanager
def _diffusers_warnings():
    """The warnings diffusers logs in the block (its loggers do not propagate to pytest's)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def _legacy_folder(paint, paint_extras, folder):
    """A folder as the converter and `save_pretrained` wrote them when the prompt checker and the ranker were
    pipeline components: their subfolders, and their entries and settings in model_index.json (written literally)."""
    shutil.copytree(paint["root"] / "hf", folder)
    for name in PARTS:
        paint_extras[name].save_pretrained(folder / name)
    index = json.loads((folder / "model_index.json").read_text())
    index.update({
        "prompt_checker": ["transformers", "BertForSequenceClassification"],
        "prompt_checker_tokenizer": ["transformers", "BertTokenizer"],
        "ranker": ["transformers", "ChineseCLIPModel"],
        "ranker_processor": ["transformers", "ChineseCLIPProcessor"],
        "prompt_checker_threshold": 0.6,
        "ranker_candidates": 3,
    })
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_folders_that_list_the_optional_parts_load(paint, paint_extras, tmp_path):
    """Folders with the prompt checker and ranker in model_index.json load as a plain pipeline (no warning about the
    entries) and as a VisCPMPaint that takes its parts and settings from them; so do converted folders of that time,
    which list the parts as [null, null]."""
    folder = _legacy_folder(paint, paint_extras, tmp_path / "legacy")
    with _diffusers_warnings() as warned:
        pipe = VisCPMPaintPipeline.from_pretrained(folder)
    assert warned == []
    assert set(pipe.components) == {"text_encoder", "tokenizer", "unet", "vae", "scheduler", "safety_checker",
                                    "feature_extractor"}
    painter = VisCPMPaint.from_pretrained(folder, image_safety_checker=False, device="cpu")
    for name in PARTS:
        assert type(getattr(painter, name)) is type(paint_extras[name]), name
    assert (painter.prompt_checker_threshold, painter.ranker_candidates) == (0.6, 3)
    expected = VisCPMPaint(paint["pipe"], **{name: paint_extras[name] for name in PARTS}, prompt_checker_threshold=0.6,
                           ranker_candidates=3)
    assert np.array_equal(_ours(painter, [EN, ZH]).images, _ours(expected, [EN, ZH]).images)

    converted = tmp_path / "converted"
    shutil.copytree(paint["root"] / "hf", converted)
    index = json.loads((converted / "model_index.json").read_text())
    index.update(dict.fromkeys(PARTS, [None, None]), prompt_checker_threshold=0.75, ranker_candidates=4)
    (converted / "model_index.json").write_text(json.dumps(index))
    with _diffusers_warnings() as warned:
        VisCPMPaintPipeline.from_pretrained(converted)
    assert warned == []
    painter = VisCPMPaint.from_pretrained(converted, image_safety_checker=False, prompt_safety_checker=False,
                                          add_ranker=False, device="cpu")
    assert all(getattr(painter, name) is None for name in PARTS)
    assert np.array_equal(_ours(painter, EN).images, _ours(paint["pipe"], EN).images)


def test_save_writes_the_layout_older_folders_have(paint, paint_extras, tmp_path):
    parts = {name: paint_extras[name] for name in PARTS}
    VisCPMPaint(paint["pipe"], **parts, prompt_checker_threshold=0.6, ranker_candidates=3).save_pretrained(tmp_path / "new")
    legacy = _legacy_folder(paint, paint_extras, tmp_path / "legacy")
    new_index = json.loads((tmp_path / "new" / "model_index.json").read_text())
    legacy_index = json.loads((legacy / "model_index.json").read_text())
    assert {key: new_index[key] for key in legacy_index if not key.startswith("_")} == {
        key: value for key, value in legacy_index.items() if not key.startswith("_")}
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(p.name for p in legacy.iterdir())


@pytest.mark.parametrize(
    "parts, call, error, match",
    [
        (dict(ranker=object()), None, ValueError, "`ranker` needs its preprocessor"),
        (dict(prompt_checker=object()), None, ValueError, "`prompt_checker` needs its preprocessor"),
        (dict(ranker_candidates=0), None, ValueError, "`ranker_candidates` must be at least 1"),
        ({}, dict(prompt=EN, use_ranker=True), ValueError, "`use_ranker=True` needs a ranker"),
        ({}, dict(prompt=5), TypeError, "`prompt` must be a str or a list of str"),
        ({}, dict(prompt=[]), ValueError, "`prompt` is an empty list: nothing to draw"),
    ],
    ids=["ranker-alone", "checker-alone", "no-candidates", "use-ranker-without", "prompt-int", "prompt-empty-list"],
)
def test_bad_parts_and_calls_are_clear_errors(paint, parts, call, error, match):
    with pytest.raises(error, match=match):
        VisCPMPaint(paint["pipe"], **parts)(**call)


def test_long_prompts_reach_the_ranker_cut_to_its_length(paint, paint_extras):
    """A prompt longer than the ranker's text model takes (64 positions here, 512 in Chinese-CLIP) is ranked on its
    first tokens instead of ending in an index error inside the ranker."""
    long_prompt = " ".join([EN] * 20)
    assert len(paint_extras["ranker_processor"].tokenizer(long_prompt)["input_ids"]) > 64
    painter = VisCPMPaint(paint["pipe"], ranker=paint_extras["ranker"], ranker_processor=paint_extras["ranker_processor"])
    out = _ours(painter, long_prompt)
    assert out.images.shape == (1, SIZE, SIZE, 3) and out.prompt_refused == [False]


def test_a_part_of_another_library_is_refused(paint, tmp_path):
    shutil.copytree(paint["root"] / "hf", tmp_path / "folder")
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    index["ranker"] = ["os", "system"]
    (tmp_path / "folder" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lists `ranker` as \['os', 'system'\]: VisCPMPaint loads transformers"):
        VisCPMPaint.from_pretrained(tmp_path / "folder", image_safety_checker=False, prompt_safety_checker=False,
                                    device="cpu")
