"""VisCPM-Paint's text encoder and pipeline against the original implementation.

The tiny Paint of tests/paint_testing.py: converted from the original checkpoint format and compared in fp32 with
the original's text states and images for the same generator (the oracle tests).
"""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor
from paint_testing import ATOL, EN, NEGATIVE, STEPS, TEXT_KEYS, ZH
from paint_testing import batches as _batches
from paint_testing import gen as _gen
from paint_testing import ours as _ours
from paint_testing import theirs as _theirs
from paint_testing import with_parts as _with_parts
from transformers import AutoModel

from conftest import PAINT_SIZE as SIZE

import viscpm  # noqa: F401  (registers the text encoder)
from viscpm import VisCPMPaintPipeline
from viscpm.adapters import lora_target_pattern
from viscpm.modeling.modeling_viscpm_paint import VisCPMPaintTextEncoder


# ---------------------------------------------------------------------------------------------- text encoder


@pytest.mark.oracle
def test_text_encoder_states_match_original(paint):
    """CPM-Bee states and bridged states, padded positions included, for prompts and negatives of other lengths."""
    from oracle import original_paint_inputs, original_paint_text_states

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


@pytest.mark.oracle
@pytest.mark.parametrize(
    "case",
    [
        dict(prompt=ZH),
        dict(prompt=EN),
        dict(prompt=EN, negative_prompt=NEGATIVE),  # longer than the prompt: the prompt gets padded
        dict(prompt=ZH, negative_prompt="模糊"),  # shorter than the prompt: the negative gets padded
        dict(prompt=ZH, num_images_per_prompt=2),
    ],
    ids=["chinese", "english", "long-negative", "short-negative", "two-per-prompt"],
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
    images, nsfw = _ours(pipe, EN, return_dict=False)
    assert np.array_equal(images, arrays) and nsfw == [None]


@pytest.mark.oracle
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


@pytest.mark.oracle
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
    embeds, negative, *_ = pipe.encode_prompt(EN, torch.device("cpu"), 1, True, negative_prompt=NEGATIVE)
    expected = _ours(pipe, EN, negative_prompt=NEGATIVE).images
    got = _ours(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=negative).images
    assert np.array_equal(got, expected)
    # Without negative embeddings, the default negative "" is encoded and padded to the prompt's length.
    only_prompt, *_ = pipe.encode_prompt(EN, torch.device("cpu"), 1, True)
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


# ---------------------------------------------------------------------------------------------- StableDiffusionPipeline's arguments


def test_text_encoder_hidden_states(paint):
    """`output_hidden_states` (argument or config) gives CPM-Bee's states: each layer's input, then the output after the
    final norm, which is `text_hidden_state`; the bridge of that is `last_hidden_state`."""
    encoder = paint["pipe"].text_encoder
    inputs = paint["pipe"].tokenizer([{"caption": EN, "objects": ""}], return_tensors="pt")
    inputs = {key: inputs[key] for key in TEXT_KEYS}
    with torch.no_grad():
        plain = encoder(**inputs)
        out = encoder(**inputs, output_hidden_states=True)
        encoder.config.output_hidden_states = True
        try:
            from_config = encoder(**inputs)
            as_tuple = encoder(**inputs, return_dict=False)
        finally:
            encoder.config.output_hidden_states = False
    assert plain.hidden_states is None
    assert len(out.hidden_states) == encoder.config.text_config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[-1], out.text_hidden_state)
    assert torch.equal(encoder.bridge(out.hidden_states[-1]), out.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(from_config.hidden_states, out.hidden_states))
    assert len(as_tuple) == 3 and torch.equal(as_tuple[2][0], out.hidden_states[0])


def test_clip_skip_uses_earlier_layers(paint):
    pipe = paint["pipe"]
    embeds, *_ = pipe.encode_prompt(EN, torch.device("cpu"), 1, False, clip_skip=1)
    encoder = pipe.text_encoder
    inputs = pipe.tokenizer([pipe._prompt_dict(EN)], return_tensors="pt")
    with torch.no_grad():
        states = encoder(**{key: inputs[key] for key in TEXT_KEYS}, output_hidden_states=True).hidden_states
        expected = encoder.bridge(encoder.model.norm(states[-2]))
    assert torch.equal(embeds, expected)
    assert np.abs(_ours(pipe, EN, clip_skip=1).images - _ours(pipe, EN).images).max() > 100 * ATOL
    assert np.array_equal(_ours(pipe, EN, clip_skip=0).images, _ours(pipe, EN).images)


def test_guidance_rescale(paint, monkeypatch):
    import viscpm.modeling.pipeline_viscpm_paint as module

    pipe, calls = paint["pipe"], []
    rescale = module.rescale_noise_cfg
    monkeypatch.setattr(module, "rescale_noise_cfg", lambda *args, **kwargs: calls.append(kwargs) or rescale(*args, **kwargs))
    assert np.array_equal(_ours(pipe, EN, guidance_rescale=0.0).images, _ours(pipe, EN).images) and calls == []
    rescaled = _ours(pipe, EN, guidance_rescale=0.7).images
    assert calls == [{"guidance_rescale": 0.7}] * STEPS
    assert np.abs(rescaled - _ours(pipe, EN).images).max() > 100 * ATOL


def test_custom_timesteps_and_eta(paint):
    pipe = paint["pipe"]
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert np.array_equal(_ours(pipe, EN, timesteps=timesteps).images, _ours(pipe, EN).images)
    assert np.abs(_ours(pipe, EN, timesteps=timesteps[::2]).images - _ours(pipe, EN).images).max() > 100 * ATOL
    with pytest.raises(ValueError, match="does not support custom sigmas"):
        _ours(pipe, EN, sigmas=[1.0, 0.5])
    ddim = _with_parts(pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    assert np.abs(_ours(ddim, EN, eta=1.0).images - _ours(ddim, EN, eta=0.0).images).max() > 100 * ATOL
    assert np.array_equal(_ours(pipe, EN, eta=1.0).images, _ours(pipe, EN).images)  # DDPM takes no eta


def test_cross_attention_kwargs_reach_the_processors(paint):
    class Recording(AttnProcessor2_0):
        seen = []

        def __call__(self, attn, hidden_states, *args, tag=None, **kwargs):
            Recording.seen.append(tag)
            return super().__call__(attn, hidden_states, *args, **kwargs)

    pipe = _own_unet_and_vae(paint)
    pipe.unet.set_attn_processor(Recording())
    got = _ours(pipe, EN, cross_attention_kwargs={"tag": "hello"}).images
    assert Recording.seen and set(Recording.seen) == {"hello"}
    assert np.abs(got - _ours(paint["pipe"], EN).images).max() <= ATOL


def test_cfg_cutoff_callbacks(paint):
    """diffusers' SDCFGCutoffCallback (one prompt) and the same cut for a batch whose rows have masks: guidance turns
    off mid-way, the prompts' rows of `prompt_embeds` (and of the attention mask) stay."""
    pipe = paint["pipe"]

    def cut_batch(pipeline, step, timestep, tensors):
        if step == 2:
            pipeline._guidance_scale = 0.0
            return {"prompt_embeds": tensors["prompt_embeds"][-2:]}
        return {}

    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        single = _ours(pipe, EN, negative_prompt=NEGATIVE,
                       callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2))
        batch = _ours(pipe, [EN, ZH], negative_prompt=["", NEGATIVE], callback_on_step_end=cut_batch,
                      callback_on_step_end_tensor_inputs=["prompt_embeds"], generator=[_gen(1), _gen(2)])
    finally:
        hook.remove()
    assert calls == [2] * 3 + [1] * (STEPS - 3) + [4] * 3 + [2] * (STEPS - 3)
    assert np.isfinite(single.images).all() and np.isfinite(batch.images).all()
    assert np.abs(single.images - _ours(pipe, EN, negative_prompt=NEGATIVE).images).max() > 100 * ATOL


def test_prompt_embeds_with_masks_equal_the_prompts(paint):
    pipe = paint["pipe"]
    prompts, negatives = [EN, ZH], [NEGATIVE, ""]
    embeds, negative, mask, negative_mask = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True,
                                                               negative_prompt=negatives)
    assert mask is not None and torch.equal(mask, negative_mask) and not bool(mask.all())
    generators = lambda: [_gen(1), _gen(2)]  # noqa: E731
    expected = _ours(pipe, prompts, negative_prompt=negatives, generator=generators()).images
    got = _ours(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=negative, prompt_attention_mask=mask,
                negative_prompt_attention_mask=negative_mask, generator=generators()).images
    assert np.array_equal(got, expected)


# ---------------------------------------------------------------------------------------------- image safety checker


@pytest.mark.oracle
@pytest.mark.parametrize("flag_all", [False, True])
def test_safety_checker_matches_original(paint, paint_extras, flag_all):
    from oracle import original_paint_images

    safety = copy.deepcopy(paint_extras["safety_checker"])
    if flag_all:
        with torch.no_grad():
            safety.concept_embeds_weights.fill_(-1.0)  # every image crosses the threshold
    pipe = _with_parts(paint["pipe"], safety_checker=safety, feature_extractor=paint_extras["feature_extractor"])
    original = paint["original"]
    original.sd.image_safety_checker, original.sd.feature_extractor = safety, paint_extras["feature_extractor"]
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


# ---------------------------------------------------------------------------------------------- batches


@pytest.mark.oracle
@pytest.mark.parametrize("per_prompt", [1, 2])
def test_batch_images_match_original_one_prompt_at_a_time(paint, per_prompt):
    """A batch of prompts whose prompt/negative pairs have different lengths, one generator per image: each image is
    the original's for its prompt alone (the original paints one prompt per call; padding to the batch's longest
    is masked, so an image does not depend on the other prompts of its batch)."""
    prompts, negatives, seeds = [ZH, EN, "猫"], ["", NEGATIVE, ""], [[5, 6], [7, 8], [9, 10]]
    expected = np.concatenate([
        _theirs(paint["original"], prompt, negative, num_images_per_prompt=per_prompt,
                generator=[_gen(seed) for seed in group[:per_prompt]])
        for prompt, negative, group in zip(prompts, negatives, seeds)])
    generators = [_gen(seed) for group in seeds for seed in group[:per_prompt]]
    got = _ours(paint["pipe"], prompts, negative_prompt=negatives, num_images_per_prompt=per_prompt,
                generator=generators).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= ATOL


def test_batch_equals_single(paint):
    """Each image of a batch equals the image of its prompt alone (same generator), whatever the other prompts."""
    pipe, long_prompt = paint["pipe"], "，".join([EN, ZH, NEGATIVE] * 4)
    prompts, negatives = [EN, ZH, long_prompt], [NEGATIVE, "", "模糊"]
    batch = _ours(pipe, prompts, negative_prompt=negatives, generator=[_gen(i) for i in range(3)]).images
    for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
        single = _ours(pipe, prompt, negative_prompt=negative, generator=_gen(i)).images[0]
        assert np.abs(batch[i] - single).max() <= 1e-5, prompt
    # Without the mask (the original's batching, every row padded to the longest) the first two would differ.
    embeds, negative_embeds, *_ = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True, negative_prompt=negatives)
    unmasked = _ours(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                     generator=[_gen(i) for i in range(3)]).images
    assert np.abs(unmasked[0] - batch[0]).max() > 100 * ATOL
    assert np.abs(unmasked[2] - batch[2]).max() <= 1e-5


def test_less_than_escaped_in_prompts(paint):
    pipe = paint["pipe"]
    out = _ours(pipe, "a < b <tag> 猫")
    assert out.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(out.images).all()


# ---------------------------------------------------------------------------------------------- speed


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
    embeds, negative_embeds, *_ = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True, negative_prompt=negative)
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

