"""VisCPM-Paint against the original implementation.

A tiny random original Paint (CPM-Bee, bridge, UNet) is saved in the original checkpoint format, converted with
our converter (VAE, scheduler and UNet config from a tiny local "SD base" folder), loaded as a
`VisCPMPaintPipeline` and compared in fp32 with the original's text states and images for the same generator.
"""

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils.torch_utils import randn_tensor
from oracle import (
    TINY_ORIGINAL_CONFIG,
    build_original_cpmbee,
    build_original_paint,
    original_paint_images,
    original_paint_inputs,
    original_paint_state_dict,
    original_paint_text_states,
)
from transformers import (
    AutoModel,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    ChineseCLIPConfig,
    ChineseCLIPImageProcessor,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
    CLIPConfig,
    CLIPImageProcessor,
)
from transformers import pipeline as hf_pipeline

from conftest import PAINT_SIZE as SIZE
from conftest import load_script, tiny_unet, tiny_vae, write_sd_base

import viscpm  # noqa: F401  (registers the text encoder)
from viscpm.adapters import lora_target_pattern
from viscpm.conversion.common import ConversionError
from viscpm.conversion.convert_viscpm_paint import convert_viscpm_paint_checkpoint
from viscpm.modeling.modeling_viscpm_paint import VisCPMPaintTextEncoder
from viscpm import VisCPMPaint, VisCPMPaintPipeline

convert_main = load_script("convert_viscpm_paint").main
STEPS = 6
ATOL = 2e-4
ZH, EN = "一只可爱的橘猫坐在窗台上，阳光明媚", "a red bicycle leaning on a brick wall"
NEGATIVE = "模糊, low quality, blurry, distorted, ugly, watermark"
TEXT_KEYS = ("input_ids", "attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids",
             "ext_table_sub")
def _bert_vocab(folder):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", *ZH, *"模糊猫狗", "red",
             "bicycle", "cat", "the", "a", ","]
    path = folder / "bert_vocab.txt"
    path.write_text("\n".join(dict.fromkeys(words)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def paint(tmp_path_factory, vocab_file):
    """The original Paint, our converted folder and the pipeline loaded from it (no optional parts)."""
    root = tmp_path_factory.mktemp("paint")
    unet, vae = tiny_unet(), tiny_vae()
    sd_base = write_sd_base(root / "sd-base", unet, vae)
    scheduler = DDPMScheduler.from_pretrained(sd_base, subfolder="scheduler")  # as the original loads it
    original = build_original_paint(build_original_cpmbee(seed=0), unet, vae, scheduler)
    checkpoint = root / "viscpm_paint_checkpoint.pt"
    torch.save(original_paint_state_dict(original), checkpoint)
    (root / "llm.json").write_text(json.dumps(TINY_ORIGINAL_CONFIG))

    argv = ["--checkpoint", str(checkpoint), "--output-dir", str(root / "hf"), "--llm-config", str(root / "llm.json"),
            "--sd-base", str(sd_base), "--vocab-file", vocab_file, "--no-progress"]
    assert convert_main(argv) == 0
    pipe = VisCPMPaintPipeline.from_pretrained(root / "hf")
    pipe.set_progress_bar_config(disable=True)
    return {"root": root, "original": original, "pipe": pipe, "checkpoint": checkpoint, "sd_base": sd_base}


@pytest.fixture(scope="module")
def extras(tmp_path_factory):
    """Tiny optional parts: image safety checker, prompt checker (BERT classifier) and ranker (Chinese-CLIP)."""
    root = tmp_path_factory.mktemp("extras")
    vocab = _bert_vocab(root)
    torch.manual_seed(2)
    tokenizer = BertTokenizer(vocab)
    bert = dict(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=64)
    # A large init spread, so that the tiny random classifier scores different prompts differently.
    checker = BertForSequenceClassification(BertConfig(**bert, num_labels=2, initializer_range=1.0)).eval()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE,
                  patch_size=8)
    ranker = ChineseCLIPModel(ChineseCLIPConfig(text_config=bert, vision_config=vision, projection_dim=16)).eval()
    ranker_processor = ChineseCLIPProcessor(
        image_processor=ChineseCLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
        tokenizer=tokenizer,
    )
    safety = StableDiffusionSafetyChecker(CLIPConfig(text_config=dict(bert, vocab_size=99), vision_config=vision,
                                                     projection_dim=16)).eval()
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return dict(prompt_checker=checker, prompt_checker_tokenizer=tokenizer, ranker=ranker,
                ranker_processor=ranker_processor, safety_checker=safety, feature_extractor=feature_extractor)


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def _ours(pipe, prompt, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "output_type": "np", **kwargs}
    kwargs.setdefault("generator", _gen())
    return pipe(prompt, **kwargs)


def _theirs(original, prompt, negative_prompt=None, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "output_type": "np", **kwargs}
    kwargs.setdefault("generator", _gen())
    return original_paint_images(original, prompt, negative_prompt, **kwargs).images


def _with_parts(pipe, **parts):
    clone = VisCPMPaintPipeline(**{**pipe.components, **parts})
    clone.set_progress_bar_config(disable=True)
    return clone


@contextlib.contextmanager
def _batches(module, name=None):
    """The batch size of each forward call of ``module`` in the block (of its ``name`` argument, else the first)."""
    sizes = []

    def record(_, args, kwargs):
        sizes.append((kwargs[name] if name else args[0]).shape[0])

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- text encoder


def test_text_encoder_states_match_original(paint):
    """CPM-Bee states and bridged states, padded positions included, for prompts and negatives of other lengths."""
    pipe, original = paint["pipe"], paint["original"]
    prompts, negatives = [ZH, EN], ["", NEGATIVE]
    cond, uncond = original_paint_inputs(prompts, negatives)
    expected = torch.cat([original_paint_text_states(original, uncond), original_paint_text_states(original, cond)])
    with torch.no_grad():
        expected_embeds = original.sd.trans_block(expected)
    inputs = pipe.tokenizer([pipe._prompt_dict(t) for t in negatives + prompts], return_tensors="pt",
                            padding=True, padding_side="right")
    assert torch.equal(inputs["attention_mask"].sum(1), torch.cat([uncond["length"], cond["length"]]).long())
    with torch.no_grad():
        out = pipe.text_encoder(**{key: inputs[key] for key in TEXT_KEYS})
    assert out.text_hidden_state.shape == expected.shape
    assert (inputs["attention_mask"] == 0).any()  # the padded positions are compared too
    assert torch.allclose(out.text_hidden_state, expected, atol=1e-4, rtol=0)
    assert torch.allclose(out.last_hidden_state, expected_embeds, atol=1e-4, rtol=0)


def test_text_encoder_auto_class_round_trip(paint, tmp_path):
    model = AutoModel.from_pretrained(paint["root"] / "hf" / "text_encoder")
    assert isinstance(model, VisCPMPaintTextEncoder)
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "case",
    [
        dict(prompt=ZH),
        dict(prompt=EN),
        dict(prompt=EN, negative_prompt=NEGATIVE),  # longer than the prompt: the prompt gets padded
        dict(prompt=ZH, negative_prompt="模糊"),  # shorter than the prompt: the negative gets padded
        dict(prompt=ZH, num_images_per_prompt=2),
        dict(prompt=[ZH, EN], negative_prompt=["", NEGATIVE]),
    ],
    ids=["chinese", "english", "long-negative", "short-negative", "two-per-prompt", "batch-of-two"],
)
def test_images_match_original(paint, case):
    case = dict(case)
    prompt, negative = case.pop("prompt"), case.pop("negative_prompt", None)
    expected = _theirs(paint["original"], prompt, negative, **case)
    got = _ours(paint["pipe"], prompt, negative_prompt=negative, **case)
    assert got.images.shape == expected.shape
    assert np.abs(got.images - expected).max() <= ATOL
    assert expected.std() > 0.05  # a real picture, not a constant
    assert got.nsfw_content_detected == [None] * len(expected)  # no checker: reported as not checked
    assert got.prompt_refused == [False] * len(expected)


def test_images_depend_on_the_text(paint):
    """Guards the parity tests: the conditioning (padding included) moves the images far beyond the tolerance."""
    pipe = paint["pipe"]
    base = _ours(pipe, EN).images
    assert np.abs(_ours(pipe, EN, negative_prompt=NEGATIVE).images - base).max() > 100 * ATOL
    assert np.abs(_ours(pipe, ZH).images - base).max() > 100 * ATOL


def test_output_types(paint):
    pipe = paint["pipe"]
    arrays = _ours(pipe, EN).images
    pil = _ours(pipe, EN, output_type="pil").images
    assert np.array_equal(np.asarray(pil[0]), (arrays[0] * 255).round().astype("uint8"))
    tensors = _ours(pipe, EN, output_type="pt").images
    assert torch.allclose(tensors.permute(0, 2, 3, 1), torch.from_numpy(arrays))
    latents = _ours(pipe, EN, output_type="latent").images
    assert latents.shape == (1, 4, SIZE // 2, SIZE // 2)
    images, nsfw, refused = _ours(pipe, EN, return_dict=False)
    assert np.array_equal(images, arrays) and nsfw == [None] and refused == [False]


def test_swapped_scheduler_matches_original(paint):
    pipe, original = paint["pipe"], paint["original"]
    config = pipe.scheduler.config
    ours = _with_parts(pipe, scheduler=DPMSolverMultistepScheduler.from_config(config))
    got = _ours(ours, EN).images
    try:
        expected = _theirs(original, EN, scheduler=DPMSolverMultistepScheduler.from_config(config))
    finally:
        original.sd.noise_scheduler = DDPMScheduler.from_config(config)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= ATOL
    assert np.abs(got - _ours(pipe, EN).images).max() > 100 * ATOL  # it really is another sampler


def test_latents_input_matches_original(paint):
    pipe = paint["pipe"]
    latents = randn_tensor((2, 4, SIZE // 2, SIZE // 2), generator=_gen(11))
    expected = _theirs(paint["original"], EN, num_images_per_prompt=2, latents=latents.clone())
    got = _ours(pipe, EN, num_images_per_prompt=2, latents=latents.clone()).images
    assert np.abs(got - expected).max() <= ATOL
    with pytest.raises(ValueError, match="latents"):
        _ours(pipe, EN, latents=latents)  # two latents for one image


def test_prompt_embeds_input(paint):
    pipe = paint["pipe"]
    embeds, negative = pipe.encode_prompt(EN, torch.device("cpu"), 1, True, negative_prompt=NEGATIVE)
    expected = _ours(pipe, EN, negative_prompt=NEGATIVE).images
    got = _ours(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=negative).images
    assert np.array_equal(got, expected)
    # Without negative embeddings, the default negative "" is encoded and padded to the prompt's length.
    only_prompt, _ = pipe.encode_prompt(EN, torch.device("cpu"), 1, True)
    assert np.array_equal(_ours(pipe, None, prompt_embeds=only_prompt).images, _ours(pipe, EN).images)


def test_callback_sees_every_step(paint):
    pipe = paint["pipe"]
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, int(timestep), tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {}

    _ours(pipe, EN, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [s for s, *_ in seen] == list(range(STEPS))
    assert [t for _, t, *_ in seen] == pipe.scheduler.timesteps.tolist()
    assert all(shape == (1, 4, SIZE // 2, SIZE // 2) for *_, shape, _ in seen)

    def zero_latents(p, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else {}

    zeroed = _ours(pipe, EN, callback_on_step_end=zero_latents).images
    assert np.array_equal(zeroed, pipe.decode_latents(torch.zeros(1, 4, SIZE // 2, SIZE // 2)))


def test_guidance_scale_one_disables_guidance(paint):
    pipe = paint["pipe"]
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        _ours(pipe, EN, guidance_scale=1.0)
    finally:
        hook.remove()
    assert calls == [1] * STEPS


# ---------------------------------------------------------------------------------------------- optional parts


def test_ranker_returns_the_best_candidate(paint, extras):
    pipe = _with_parts(paint["pipe"], ranker=extras["ranker"], ranker_processor=extras["ranker_processor"])
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


def test_ranker_picks_per_prompt_and_image_in_one_batch(paint, extras):
    """Two prompts × two images: the ranker runs once on all 16 candidates, and each image is its own group's best
    against its own prompt (scores scripted so that another group's or prompt's column would pick another)."""
    pipe = _with_parts(paint["pipe"], ranker=extras["ranker"], ranker_processor=extras["ranker_processor"])
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


def test_prompt_checker_refuses_flagged_prompts(paint, extras):
    checker, tokenizer = extras["prompt_checker"], extras["prompt_checker_tokenizer"]
    pipe = _with_parts(paint["pipe"], prompt_checker=checker, prompt_checker_tokenizer=tokenizer)
    with torch.no_grad():
        logits = checker(**tokenizer([EN, ZH], return_tensors="pt", padding=True)).logits
    p_en, p_zh = logits.softmax(-1)[:, 1].tolist()
    assert abs(p_en - p_zh) > 1e-3
    flagged, clean = (EN, ZH) if p_en > p_zh else (ZH, EN)
    pipe.register_to_config(prompt_checker_threshold=(p_en + p_zh) / 2)  # between the two: one is refused

    # The original's rule (a transformers text-classification pipeline, label 1 above the threshold) agrees.
    classify = hf_pipeline("text-classification", model=checker, tokenizer=tokenizer, device="cpu")
    for text, refused in ((flagged, True), (clean, False)):
        top = classify(text, top_k=None)[0]
        assert (top["label"] == "LABEL_1" and top["score"] > pipe.config.prompt_checker_threshold) == refused

    out = _ours(pipe, [flagged, clean], num_images_per_prompt=2)
    assert out.prompt_refused == [True, True, False, False]
    assert not out.images[:2].any()  # nothing drawn: black
    assert out.nsfw_content_detected == [None] * 4
    assert np.array_equal(out.images[2:], _ours(paint["pipe"], clean, num_images_per_prompt=2).images)
    only = _ours(pipe, flagged)
    assert only.prompt_refused == [True] and only.images.shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize("flag_all", [False, True])
def test_safety_checker_matches_original(paint, extras, flag_all):
    safety = copy.deepcopy(extras["safety_checker"])
    if flag_all:
        with torch.no_grad():
            safety.concept_embeds_weights.fill_(-1.0)  # every image crosses the threshold
    pipe = _with_parts(paint["pipe"], safety_checker=safety, feature_extractor=extras["feature_extractor"])
    original = paint["original"]
    original.sd.image_safety_checker, original.sd.feature_extractor = safety, extras["feature_extractor"]
    try:
        expected = original_paint_images(original, [EN], None, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                                         output_type="np", generator=_gen(), num_images_per_prompt=2)
    finally:
        original.sd.image_safety_checker = original.sd.feature_extractor = None
    got = _ours(pipe, EN, num_images_per_prompt=2)
    assert got.nsfw_content_detected == [flag_all] * 2
    # (the original returns the list, or, when something was flagged, only the last image's flag)
    flags = expected.nsfw_content_detected
    assert (flags if flag_all else any(flags)) == flag_all
    assert np.abs(got.images - expected.images).max() <= ATOL
    assert (not got.images.any()) == flag_all


def test_pipeline_save_and_load_with_optional_parts(paint, extras, tmp_path):
    pipe = _with_parts(paint["pipe"], **extras)
    pipe.save_pretrained(tmp_path)
    again = VisCPMPaintPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    for name, component in pipe.components.items():
        assert type(again.components[name]) is type(component), name
    assert again.config.prompt_checker_threshold == pipe.config.prompt_checker_threshold
    a = _ours(pipe, EN, output_type="pil").images[0]
    b = _ours(again, EN, output_type="pil").images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------- drop-in


def _pil_close(a, b):
    assert a.size == b.size
    return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1  # uint8 rounding of ≤ 2e-4


def test_drop_in_generate_matches_original(paint):
    ours = VisCPMPaint.from_pretrained(paint["root"] / "hf", image_safety_checker=False, prompt_safety_checker=False,
                                       add_ranker=False, device="cpu")
    original = paint["original"]
    for kwargs in (dict(prompt=ZH), dict(prompt=EN, negative_prompt=NEGATIVE, num_images_per_prompt=2)):
        expected = original.generate(**kwargs, image_size=SIZE, generator=_gen())
        got = ours.generate(**kwargs, image_size=SIZE, generator=_gen())
        assert got.size == expected.size == (SIZE * kwargs.get("num_images_per_prompt", 1), SIZE)
        assert _pil_close(got, expected)


def test_drop_in_with_ranker_matches_original(paint, extras, tmp_path):
    _with_parts(paint["pipe"], ranker=extras["ranker"], ranker_processor=extras["ranker_processor"]).save_pretrained(tmp_path)
    ours = VisCPMPaint.from_pretrained(tmp_path, image_safety_checker=False, prompt_safety_checker=False, device="cpu")
    assert ours.pipeline.ranker is not None
    original = paint["original"]
    original.clip_ranker, original.clip_preprocessor = extras["ranker"], extras["ranker_processor"]
    try:
        expected = original.generate(EN, image_size=SIZE, generator=_gen())
    finally:
        original.clip_ranker = original.clip_preprocessor = None
    got = ours.generate(EN, image_size=SIZE, generator=_gen())
    assert got.size == (SIZE, SIZE) and _pil_close(got, expected)


def test_drop_in_refuses_like_original(paint, extras, tmp_path):
    checker = copy.deepcopy(extras["prompt_checker"])
    with torch.no_grad():
        checker.classifier.bias.copy_(torch.tensor([0.0, 10.0]))  # label 1 (unsafe) for every prompt
    tokenizer = extras["prompt_checker_tokenizer"]
    _with_parts(paint["pipe"], prompt_checker=checker, prompt_checker_tokenizer=tokenizer).save_pretrained(tmp_path)
    ours = VisCPMPaint.from_pretrained(tmp_path, image_safety_checker=False, add_ranker=False, device="cpu")
    original = paint["original"]
    original.prompt_safety_checker = hf_pipeline("text-classification", model=checker, tokenizer=tokenizer, device="cpu")
    try:
        assert original.generate(EN, image_size=SIZE, generator=_gen()) is None
    finally:
        original.prompt_safety_checker = None
    with pytest.warns(UserWarning, match="unsafe content"):
        assert ours.generate(EN, image_size=SIZE, generator=_gen()) is None


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt=""), ValueError, "empty"),
        (dict(prompt=[EN, "   "]), ValueError, "prompt 1 is empty"),
        (dict(prompt=[]), ValueError, "empty list"),
        (dict(prompt=EN, height=20), ValueError, "multiples of 8"),
        (dict(prompt=EN, width=12), ValueError, "multiples of 8"),
        (dict(prompt=EN, num_inference_steps=0), ValueError, "at least 1"),
        (dict(prompt=EN, num_images_per_prompt=2, generator=[torch.Generator()] * 3), ValueError, "3 generators"),
        (dict(prompt=[EN, ZH], negative_prompt=["x"]), ValueError, "1 negative prompts for 2"),
        (dict(prompt=None), ValueError, "exactly one of"),
        (dict(prompt=3), TypeError, "str or a list"),
        (dict(prompt=EN, output_type="jpg"), ValueError, "output_type"),
    ],
    ids=["empty", "blank-in-batch", "empty-list", "height", "width", "steps", "generators", "negatives", "none", "int",
         "output-type"],
)
def test_bad_inputs_are_clear_errors(paint, kwargs, error, match):
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": 1, **kwargs}
    with pytest.raises(error, match=match):
        paint["pipe"](**kwargs)


def test_generator_list_per_image(paint):
    generators = lambda: [_gen(5), _gen(6)]  # noqa: E731
    expected = _theirs(paint["original"], [EN, ZH], generator=generators())
    got = _ours(paint["pipe"], [EN, ZH], generator=generators()).images
    assert np.abs(got - expected).max() <= ATOL


def test_less_than_escaped_in_prompts(paint):
    pipe = paint["pipe"]
    out = _ours(pipe, "a < b <tag> 猫")
    assert out.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(out.images).all()


# ---------------------------------------------------------------------------------------------- converter


def test_converted_folder(paint):
    folder = paint["root"] / "hf"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "VisCPMPaintPipeline"
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    pipe = paint["pipe"]
    assert isinstance(pipe.scheduler, DDPMScheduler)  # the original's sampler, from SD's PNDM config
    original = paint["original"]
    for name, tensor in original.sd.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], tensor), name


def _convert_main(paint, tmp_path, checkpoint=None, **options):
    argv = ["--checkpoint", str(checkpoint or paint["checkpoint"]), "--output-dir", str(tmp_path / "out"),
            "--llm-config", str(paint["root"] / "llm.json"), "--sd-base", str(paint["sd_base"]), "--no-progress"]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return convert_main(argv)


def test_chat_checkpoint_is_refused(paint, tmp_path, capsys):
    state = torch.load(paint["checkpoint"], weights_only=True)
    state = {k: v for k, v in state.items() if k.startswith("llm.")}
    state.update({"vpm.beit3.text_embed.weight": torch.zeros(2, 2), "query": torch.zeros(64, 4),
                  "mapping.0.weight": torch.zeros(4, 4)})
    torch.save(state, tmp_path / "viscpm_chat_balance_checkpoint.pt")
    assert _convert_main(paint, tmp_path, checkpoint=tmp_path / "viscpm_chat_balance_checkpoint.pt") == 1
    err = capsys.readouterr().err
    assert "is a VisCPM-Chat checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_converter_errors(paint, tmp_path, capsys):
    # Without --llm-config the 10B config is assumed: the shapes say which sizes differ.
    argv = ["--checkpoint", str(paint["checkpoint"]), "--output-dir", str(tmp_path / "out"), "--sd-base",
            str(paint["sd_base"]), "--no-progress"]
    assert convert_main(argv) == 1
    assert "--llm-config" in capsys.readouterr().err
    # An SD base whose UNet config does not fit the checkpoint's UNet.
    other = tiny_unet()
    bigger = UNet2DConditionModel.from_config({**other.config, "block_out_channels": (8, 24)})
    write_sd_base(tmp_path / "other-base", bigger, tiny_vae())
    assert _convert_main(paint, tmp_path, sd_base=tmp_path / "other-base") == 1
    err = capsys.readouterr().err
    assert "unet." in err and "--sd-base" in err
    # An SD base folder without its VAE.
    (tmp_path / "no-vae" / "unet").mkdir(parents=True)
    assert _convert_main(paint, tmp_path, sd_base=tmp_path / "no-vae") == 1
    assert "has no vae/config.json" in capsys.readouterr().err
    # Not a Paint checkpoint at all.
    torch.save({"unrelated.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="not a VisCPM-Paint checkpoint"):
        convert_viscpm_paint_checkpoint(tmp_path / "other.pt", tmp_path / "o", llm_config=paint["root"] / "llm.json",
                                        sd_base=paint["sd_base"], vocab_file=_vocab(), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def _vocab():
    from oracle import VOCAB_FILE

    return VOCAB_FILE


def test_converter_dtype(paint, tmp_path):
    assert _convert_main(paint, tmp_path, dtype="float16", vocab_file=_vocab()) == 0
    from safetensors import safe_open

    for part in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        with safe_open(tmp_path / "out" / part, "pt") as handle:
            assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"F16"}, part
    pipe = VisCPMPaintPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float16


# ---------------------------------------------------------------------------------------------- speed


def test_one_batch_per_part(paint, extras):
    """One call: the text encoder runs once (negatives and prompts together), the UNet once per step on every image
    and ranker candidate (times two for guidance), the ranker once."""
    pipe = _with_parts(paint["pipe"], ranker=extras["ranker"], ranker_processor=extras["ranker_processor"])
    with (_batches(pipe.text_encoder, "input_ids") as text, _batches(pipe.unet) as unet,
          _batches(pipe.ranker, "pixel_values") as ranker):
        _ours(pipe, [EN, ZH], negative_prompt=NEGATIVE, num_images_per_prompt=2)
    assert text == [4]
    assert unet == [2 * 2 * 2 * 4] * STEPS
    assert ranker == [16]


def _own_unet_and_vae(paint):
    """The test pipeline with copies of its UNet and VAE (the recipes change them in place)."""
    pipe = paint["pipe"]
    return _with_parts(pipe, unet=copy.deepcopy(pipe.unet), vae=copy.deepcopy(pipe.vae))


def test_attention_runs_through_sdpa(paint):
    pipe = paint["pipe"]
    for model in (pipe.unet, pipe.vae):
        assert {type(processor) for processor in model.attn_processors.values()} == {AttnProcessor2_0}
    assert pipe.text_encoder.config._attn_implementation == "sdpa"


def test_channels_last_keeps_images(paint):
    expected = _ours(paint["pipe"], EN, negative_prompt=NEGATIVE).images
    pipe = _own_unet_and_vae(paint)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    for conv in (pipe.unet.conv_in, pipe.vae.decoder.conv_in):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert np.abs(_ours(pipe, EN, negative_prompt=NEGATIVE).images - expected).max() <= ATOL


def test_fused_qkv_keeps_images(paint):
    expected = _ours(paint["pipe"], EN, negative_prompt=NEGATIVE).images
    pipe = _own_unet_and_vae(paint)
    pipe.fuse_qkv_projections()
    for model in (pipe.unet, pipe.vae):
        assert {type(processor) for processor in model.attn_processors.values()} == {FusedAttnProcessor2_0}
    # Every fused projection runs (the VAE's encoder is not used for drawing), the cross-attention's too.
    attention = [m for model in (pipe.unet, pipe.vae.decoder) for m in model.modules()
                 if hasattr(m, "fuse_projections")]
    fused = [m.to_kv if m.is_cross_attention else m.to_qkv for m in attention]
    assert any(m.is_cross_attention for m in attention)
    used = set()
    handles = [linear.register_forward_hook(lambda module, *_: used.add(module)) for linear in fused]
    try:
        got = _ours(pipe, EN, negative_prompt=NEGATIVE).images
    finally:
        for handle in handles:
            handle.remove()
    assert len(used) == len(fused) > 0
    assert np.abs(got - expected).max() <= ATOL
    pipe.unfuse_qkv_projections()
    assert np.array_equal(_ours(pipe, EN, negative_prompt=NEGATIVE).images, expected)


def test_compiled_unet(paint, tmp_path):
    """``pipe.unet = torch.compile(pipe.unet, fullgraph=True)``: the pipeline reads the UNet's dtype and config through
    the wrapper, the denoising loop is one graph with no recompilation per step, and `save_pretrained` stores the
    plain UNet. The graph runs eagerly here (inductor on CPU takes over a minute even for this UNet);
    ``benchmarks/bench_paint.py --compile`` measures the compiled one."""
    expected = _ours(paint["pipe"], EN, negative_prompt=NEGATIVE).images
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    pipe = _own_unet_and_vae(paint)
    torch._dynamo.reset()
    try:
        pipe.unet = torch.compile(pipe.unet, backend=backend, fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = _ours(pipe, EN, negative_prompt=NEGATIVE).images
            again = _ours(pipe, EN, negative_prompt=NEGATIVE, output_type="latent").images
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    assert np.abs(got - expected).max() <= ATOL
    assert again.shape == (1, 4, SIZE // 2, SIZE // 2)
    pipe.save_pretrained(tmp_path)
    loaded = VisCPMPaintPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is UNet2DConditionModel
    assert np.abs(_ours(loaded, EN, negative_prompt=NEGATIVE).images - expected).max() <= ATOL


def _conditioning(pipe, prompt=EN, negative=NEGATIVE):
    embeds, negative_embeds = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True, negative_prompt=negative)
    return torch.cat([negative_embeds, embeds])


def test_prompt_cache_hits_and_misses(paint):
    pipe = _with_parts(paint["pipe"])
    expected = _ours(pipe, EN, negative_prompt=NEGATIVE).images
    expected_two = _ours(pipe, EN, negative_prompt=NEGATIVE, num_images_per_prompt=2).images
    pipe.enable_prompt_cache(max_size=2)
    with _batches(pipe.text_encoder, "input_ids") as calls:
        first = _ours(pipe, EN, negative_prompt=NEGATIVE).images
        assert len(calls) == 1
        second = _ours(pipe, EN, negative_prompt=NEGATIVE, num_images_per_prompt=2).images  # same texts: a hit
        assert len(calls) == 1
        assert np.array_equal(first, expected) and np.array_equal(second, expected_two)
        _ours(pipe, EN)  # another negative: another batch
        assert len(calls) == 2
        _conditioning(pipe, ZH)  # a third batch: the oldest (EN + NEGATIVE) goes
        _conditioning(pipe, EN, None)
        assert len(calls) == 3
        _conditioning(pipe, EN, NEGATIVE)
        assert len(calls) == 4
        pipe.clear_prompt_cache()
        _conditioning(pipe, EN, NEGATIVE)
        assert len(calls) == 5
        pipe.disable_prompt_cache()
        _conditioning(pipe, EN, NEGATIVE)
        _conditioning(pipe, EN, NEGATIVE)
        assert len(calls) == 7
    with pytest.raises(ValueError, match="max_size"):
        pipe.enable_prompt_cache(max_size=0)


def test_prompt_cache_follows_text_encoder_changes(paint):
    """Every detectable change of the text encoder empties the cache: the next lookup recomputes, and what it gives is
    the fresh conditioning (then cached again)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    pipe = _with_parts(paint["pipe"], text_encoder=copy.deepcopy(paint["pipe"].text_encoder))
    fresh = _with_parts(pipe)  # the same modules, no cache
    pipe.enable_prompt_cache()
    encoder = pipe.text_encoder
    base = _conditioning(fresh)
    with _batches(encoder, "input_ids") as calls:

        def check(changed: bool):
            count = len(calls)
            got = _conditioning(pipe)
            assert len(calls) == count + 1  # recomputed
            assert torch.equal(_conditioning(pipe), got) and len(calls) == count + 1  # then cached
            assert torch.equal(got, _conditioning(fresh))
            assert (not torch.allclose(got, base, atol=1e-5)) == changed

        check(False)
        with torch.no_grad():
            encoder.layer_norm.weight.mul_(1.5)  # edited in place
        check(True)
        encoder.load_state_dict(paint["pipe"].text_encoder.state_dict())
        check(False)
        encoder.to(torch.float64)
        check(False)
        encoder.to(torch.float32)
        check(False)

        encoder.model.layers[0].train()  # a module in training mode: nothing is cached
        count = len(calls)
        _conditioning(pipe)
        _conditioning(pipe)
        assert len(calls) == count + 2
        encoder.eval()

        lora = dict(target_modules=lora_target_pattern(), r=2, init_lora_weights=False)
        model = get_peft_model(encoder, LoraConfig(**lora), adapter_name="one")  # LoRA layers go into `encoder`
        model.eval()  # (the new layers start in training mode)
        check(True)
        adapted = _conditioning(pipe)
        with model.disable_adapter():
            check(False)
        model.add_adapter("two", LoraConfig(**lora))
        model.set_adapter("two")
        model.eval()
        check(True)
        assert not torch.allclose(_conditioning(pipe), adapted, atol=1e-5)
        model.set_adapter("one")
        check(True)
        assert torch.equal(_conditioning(pipe), adapted)
        model.merge_adapter()
        check(True)
        model.unmerge_adapter()
        check(True)
        for layer in encoder.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale("one", 0.0)
        check(False)

        pipe.register_modules(tokenizer=copy.deepcopy(pipe.tokenizer))
        check(False)


# ---------------------------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs a CUDA device")
def test_model_cpu_offload(paint):
    pipe = _with_parts(paint["pipe"])
    expected = _ours(pipe, EN).images
    pipe.enable_model_cpu_offload()
    got = _ours(pipe, EN, generator=_gen()).images
    assert np.abs(got - expected).max() <= 1e-3  # CPU vs GPU kernels
