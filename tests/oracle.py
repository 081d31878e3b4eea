"""The original VisCPM implementation (installed from the registry) as a test oracle.

Only tests import this. It patches the one CUDA-only line of the original (the rotary module builds
its frequencies with ``device="cuda"``) so the original runs on CPU, and builds tiny original models
with random weights in fp32.
"""

import os

import torch


class _CpuTorch:
    """Stands in for ``torch`` inside the original rotary module: same API, but `arange` ignores `device`."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def arange(*args, **kwargs):
        kwargs.pop("device", None)
        return torch.arange(*args, **kwargs)


def _patch():
    import VisCPM.models.modules.position_embedding as position_embedding

    position_embedding.torch = _CpuTorch()


_patch()

from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer as OriginalTokenizer  # noqa: E402
from VisCPM.models.cpmbee import CPMBeeConfig as OriginalConfig  # noqa: E402
from VisCPM.models.cpmbee import CPMBeeTorch as OriginalCpmBee  # noqa: E402
from VisCPM.utils.utils import convert_data_to_id  # noqa: E402

import VisCPM.cpm_tokenizers.bee as _bee  # noqa: E402

VOCAB_FILE = os.path.join(os.path.dirname(_bee.__file__), "vocabs", "bee.txt")

# The tiny configs live in tests/originals.py, which builds stand-ins of the same models without the original.
from originals import TINY_ORIGINAL_CONFIG, TINY_VISION_CONFIG  # noqa: E402


def build_original_cpmbee(seed: int = 0, **overrides) -> "OriginalCpmBee":
    """A tiny original CPM-Bee in fp32 with random weights (the original leaves them uninitialised)."""
    config = OriginalConfig(**{**TINY_ORIGINAL_CONFIG, **overrides})
    model = OriginalCpmBee(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def cast_original_cpmbee(llm, dtype):
    """The original CPM-Bee in ``dtype``, its embedding rotation too (left in fp32, it would feed fp32 activations
    into fp16/bf16 layers)."""
    llm.to(dtype)
    for module in llm.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "dtype"):
            module.dtype, module.inv_freq = dtype, module.inv_freq.to(dtype)
    return llm


def original_prompt(datas):
    """The original's batched generation inputs for structured dicts: (model_inputs, other_info)."""
    import copy

    from VisCPM.generation.vllm_bee import VLLMCPMBeeGeneration

    builder = VLLMCPMBeeGeneration.__new__(VLLMCPMBeeGeneration)
    builder.tokenizer = OriginalTokenizer()
    builder.device = "cpu"
    return builder._process_list(copy.deepcopy(datas))


def original_logits(model, model_inputs):
    """Logits of the original's incremental `inference` over its (left-padded) prompt."""
    with torch.no_grad():
        logits, _, _ = model.inference(
            model_inputs["input_ids"], model_inputs["input_id_subs"], model_inputs["input_pos"],
            model_inputs["context"], model_inputs["sample_idx"], model_inputs["num_segments"],
            model_inputs["segment_ids"], model_inputs["segment_rel_offset"], model_inputs["segment_rel"],
            model_inputs["batch_ext_table_ids"], model_inputs["batch_ext_table_sub"],
        )
    return logits


def original_beam_search(model, datas, **settings):
    """Answers of the original beam search (`VLLMCPMBeeBeamSearch._decode`) as lists of raw ids per
    answer slot, without the closing `</s>`."""
    from types import SimpleNamespace

    from VisCPM.generation.vllm_bee import VLLMCPMBeeBeamSearch

    model_inputs, info = original_prompt(datas)
    search = VLLMCPMBeeBeamSearch.__new__(VLLMCPMBeeBeamSearch)
    search.tokenizer = OriginalTokenizer()
    search.device = "cpu"
    search.model = SimpleNamespace(llm=model)
    with torch.no_grad():
        model_inputs["hidden_states"] = model.input_embedding(model_inputs["input_ids"], model_inputs["input_id_subs"])
        results = search._decode(model_inputs, info, **settings)
    answers = []
    for result, sample_info in zip(results, info):
        slots = [[] for _ in sample_info["answer_placeholders"]]
        for word, slot in result:
            slots[slot - 1].append(word)
        answers.append([s[:-1] if s and s[-1] == search.tokenizer.eos_id else s for s in slots])
    return answers


# --------------------------------------------------------------------------------------------------
# VisCPM-Paint
# --------------------------------------------------------------------------------------------------


def build_original_paint(llm, unet, vae, scheduler, seed: int = 0, safety_checker=None, feature_extractor=None,
                         prompt_safety_checker=None, clip_ranker=None, clip_preprocessor=None):
    """The original `VisCPMPaint` around tiny local parts (its `SDWrapper` would download SD-2.1 in `__init__`).

    The bridge (`trans_block`) gets random weights from `seed`; everything runs on CPU in fp32.
    """
    from VisCPM.models.stablediffusion import CPMBeeTransBlock, SDWrapper
    from VisCPM.models.vlg_cpmbee import VLG_CPMBee
    from VisCPM.viscpm_paint import VisCPMPaint

    sd = SDWrapper.__new__(SDWrapper)
    torch.nn.Module.__init__(sd)
    sd.vae, sd.noise_scheduler, sd.unet = vae, scheduler, unet
    dim = llm.input_embedding.weight.shape[1]
    sd.trans_block = CPMBeeTransBlock(dim, dim // 4, unet.config.cross_attention_dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sd.trans_block.named_parameters():
            base = 1.0 if name == "layernorm.weight" else 0.0
            scale = 0.1 if name.startswith("layernorm") else dim**-0.5
            param.copy_(base + scale * torch.randn(param.shape, generator=generator))
    sd.image_safety_checker, sd.feature_extractor = safety_checker, feature_extractor
    sd.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    paint = VisCPMPaint.__new__(VisCPMPaint)
    paint.device = torch.device("cpu")
    paint.llm = llm
    paint.tokenizer = OriginalTokenizer()
    paint.sd = sd
    paint.model = VLG_CPMBee(llm, sd).eval()
    paint.prompt_safety_checker = prompt_safety_checker
    paint.clip_ranker, paint.clip_preprocessor = clip_ranker, clip_preprocessor
    return paint


def original_paint_state_dict(paint):
    """The original Paint checkpoint layout: `trans_block.*`, `unet.*`, `llm.*`."""
    state = {f"trans_block.{k}": v for k, v in paint.sd.trans_block.state_dict().items()}
    state.update({f"unet.{k}": v for k, v in paint.sd.unet.state_dict().items()})
    state.update({f"llm.{k}": v for k, v in paint.llm.state_dict().items()})
    return state


def original_paint_inputs(prompts, negative_prompts):
    """The original's text inputs for a batch (its `build_input`, extended to several prompts): every prompt
    and negative prompt right-padded by its collater to the longest of them all."""
    from VisCPM.utils.utils import CPMBeeCollater

    tokenizer = OriginalTokenizer()

    def item(text):
        return original_collater_item(tokenizer, {"caption": text, "objects": ""}, raw_data=text)

    cond = [item(text) for text in prompts]
    uncond = [item(text) for text in negative_prompts]
    max_len = max(x["input_ids"].shape[1] for x in cond + uncond)
    packer = CPMBeeCollater(tokenizer=tokenizer, max_len=max_len)
    return packer(cond), packer(uncond)


def original_paint_text_states(paint, data):
    """CPM-Bee last hidden states of the original for packed `data` (as `VLG_CPMBee.generate` computes them)."""
    llm = paint.llm
    with torch.no_grad():
        embeds = llm.input_embedding(data["input_ids"], data["input_id_subs"])
        _, hidden = llm(
            input=data["input_ids"], input_sub=data["input_id_subs"], length=data["length"],
            context=data["context"], sample_ids=data["sample_ids"], num_segments=data["num_segments"],
            segment=data["segment_ids"], segment_rel_offset=data["segment_rel_offset"],
            segment_rel=data["segment_rel"], span=data["span"], ext_table_ids=data["ext_table_ids"],
            ext_table_sub=data["ext_table_sub"], hidden_states=embeds,
        )
    return hidden


def original_paint_images(paint, prompts, negative_prompts=None, **generate_kwargs):
    """The original's images (`SDWrapper.generate`'s output) for a batch of prompts, e.g. with
    `output_type="np"`, `num_inference_steps`, `generator`, `height`/`width`, `num_images_per_prompt`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if negative_prompts is None or isinstance(negative_prompts, str):
        negative_prompts = ["" if negative_prompts is None else negative_prompts] * len(prompts)
    data, uncond = original_paint_inputs(prompts, negative_prompts)
    return paint.model.generate(data, uncond, **generate_kwargs)


# ---------------------------------------------------------------------------------------------------------
# VisCPM-Chat (appended): a tiny original VLU_CPMBee (BEiT-3 via torchscale + the tiny CPM-Bee above)
# ---------------------------------------------------------------------------------------------------------

def build_original_vlu(seed: int = 0, query_num: int = 64, vision_overrides=None, **llm_overrides):
    """A tiny original `VLU_CPMBee` in fp32 with random weights: torchscale BEiT-3 with the flags of VisCPM's
    `_get_large_config` (multiway, sub-LN, normalised output, no output layer) at a tiny size, wrapped in
    `BEiT3Wrapper`, plus `build_original_cpmbee(seed)`."""
    from torchscale.architecture.config import EncoderConfig
    from VisCPM.models.beit3 import BEiT3Wrapper
    from VisCPM.models.vlu_cpmbee import VLU_CPMBee

    args = EncoderConfig(
        multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
        **{**TINY_VISION_CONFIG, **(vision_overrides or {})},
    )
    torch.manual_seed(seed)  # BEiT3Wrapper/VLU_CPMBee draw their own init from the global generator
    vpm = BEiT3Wrapper(args)
    llm = build_original_cpmbee(seed=seed, **llm_overrides)
    vlu = VLU_CPMBee(llm=llm, vpm=vpm, vision_dim=args.encoder_embed_dim, query_num=query_num, device="cpu")
    norms = {
        f"{module_name}.{param_name}"
        for module_name, module in vlu.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for param_name, _ in module.named_parameters()
    }
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in vlu.named_parameters():
            if name.startswith("llm."):
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name in norms:
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.3 * noise)
    return vlu.eval()


def original_vision_hidden_states(vlu, pixel_values):
    """The original's mapped query outputs, `[batch, query_num, llm_dim]`."""
    with torch.no_grad():
        return vlu.mapping(vlu.vpm(pixel_values=pixel_values, query_embed=vlu.query))


def original_vlu_logits(vlu, data, pixel_values=None, vision_hidden_states=None):
    """Logits of the original's `llm.inference` over one prompt whose image slots were filled by
    `get_vllm_embedding` (the original supports one image bound per batch, so one prompt at a time)."""
    model_inputs, _ = original_prompt([data])
    if vision_hidden_states is not None:
        model_inputs["vision_hidden_states"] = vision_hidden_states
    else:
        model_inputs["pixel_values"] = pixel_values
    with torch.no_grad():
        hidden_states, vision = vlu.get_vllm_embedding(model_inputs)
        logits, _, _ = vlu.llm.inference(
            model_inputs["input_ids"], model_inputs["input_id_subs"], model_inputs["input_pos"],
            model_inputs["context"], model_inputs["sample_idx"], model_inputs["num_segments"],
            model_inputs["segment_ids"], model_inputs["segment_rel_offset"], model_inputs["segment_rel"],
            model_inputs["batch_ext_table_ids"], model_inputs["batch_ext_table_sub"], hidden_states=hidden_states,
        )
    return logits, vision


def original_chat_generate(vlu, pixel_values, question, context="", vision_hidden_states=None,
                           max_inp_length=3000, **settings):
    """The original `VLLMCPMBeeBeamSearch.generate` as `VisCPMChat.chat` calls it (one image, the dict
    `{"image", "context", "question", "<ans>"}`), fed a ready pixel tensor `[3, H, W]` instead of a PIL image.
    Returns `(answer string, vision_hidden_states)`."""
    from VisCPM.generation.vllm_bee import VLLMCPMBeeBeamSearch

    search = VLLMCPMBeeBeamSearch.__new__(VLLMCPMBeeBeamSearch)
    search.model = vlu
    search.tokenizer = OriginalTokenizer()
    search.transform = lambda image: image
    search.device = "cpu"
    results, vision = search.generate(
        [pixel_values], max_inp_length=max_inp_length, extra_inp_dict={"context": context, "question": question},
        vision_hidden_states=vision_hidden_states, return_vision_hidden_states=True, **settings,
    )
    return results[0]["<ans>"], vision


def original_chat_inputs(images, questions, contexts=None, query_num=64, max_inp_length=3000):
    """What the original `VisCPMChat.chat()` feeds its model (via `VLLMCPMBeeGeneration.generate`), per item:
    the prompt dict, the batched `_process_list` tensors and info, `pixel_values` from `build_transform`, and the
    item's own `image_bound` from `convert_data_to_id` (the original keeps only the last item's in a batch)."""
    import copy

    from VisCPM.generation.vllm_bee import VLLMCPMBeeGeneration
    from VisCPM.utils.utils import build_transform

    contexts = contexts if contexts is not None else [""] * len(questions)
    builder = VLLMCPMBeeGeneration.__new__(VLLMCPMBeeGeneration)
    builder.tokenizer = OriginalTokenizer()
    builder.device = "cpu"
    datas = []
    for question, context in zip(questions, contexts):
        data = {"image": builder.tokenizer.unk_token * query_num}
        data.update({"context": context, "question": question})
        data["<ans>"] = ""
        datas.append(data)
    bounds = [torch.from_numpy(builder._process_list([copy.deepcopy(d)], max_inp_length)[0]["image_bound"].numpy())
              .view(-1) for d in datas]
    model_inputs, info = builder._process_list(copy.deepcopy(datas), max_inp_length)
    transform = build_transform(is_train=False)
    pixel_values = torch.stack([transform(image) for image in images]) if images is not None else None
    return datas, model_inputs, info, pixel_values, bounds


def original_collater_item(tokenizer, data, raw_data=None):
    """One sample as the original's `CPMBeeCollater` takes it (from `convert_data_to_id`, answers not shuffled)."""
    import copy

    ids, subs, context, segments, rel, n_segments, _, _ = convert_data_to_id(
        tokenizer, copy.deepcopy(data), shuffle_answer=False, max_depth=8
    )
    return {
        "input_ids": torch.from_numpy(ids)[None], "input_id_subs": torch.from_numpy(subs)[None],
        "context": torch.from_numpy(context)[None], "segment_ids": torch.from_numpy(segments)[None],
        "segment_rel_offset": torch.zeros(1, len(ids), dtype=torch.int32),
        "segment_rel": torch.from_numpy(rel)[None],
        "sample_ids": torch.zeros(1, len(ids), dtype=torch.int32),
        "num_segments": torch.full((1, len(ids)), n_segments, dtype=torch.int32),
        "raw_data": [data if raw_data is None else raw_data],
    }
