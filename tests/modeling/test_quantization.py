"""Memory: bitsandbytes 8-bit / 4-bit (nf4) loading and accelerate offloading (`device_map` with a disk tier) of
CPM-Bee, VisCPM-Chat and the Paint text encoder.

Tiny random models (widths that bitsandbytes' CPU 4-bit kernel accepts: multiples of 64) are saved and loaded back
with `from_pretrained`, on CPU, in fp32:

* quantized: every `nn.Linear` and nothing else is replaced (the embedding, which is also the output head, the
  position bias, the norms, the patch convolution and the queries keep their float weights); 8-bit outputs stay
  within cosine 0.99 of fp32; 4-bit outputs are those of fp32 with every linear weight rounded to nf4, so our code
  runs the quantized layers as it runs `nn.Linear`;
* offloaded: with layers whose weights sit on disk, the logits and the answers equal those of the model in memory;
  `device_map="auto"` never cuts inside a `_no_split_modules` block.
"""

import copy

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
)
from transformers.integrations.accelerate import infer_auto_device_map

from viscpm import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeTokenizer
from viscpm.modeling.configuration_viscpm_chat import VisCPMChatConfig
from viscpm.modeling.generation_cpmbee import cpmbee_beam_search
from viscpm.modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
from viscpm.modeling.modeling_viscpm_paint import VisCPMPaintTextEncoder, VisCPMPaintTextEncoderConfig

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16, intermediate_size=128,
            position_bias_num_buckets=32, position_bias_num_segment_buckets=32, position_bias_max_distance=64,
            rotary_dtype="float32")
# initializer_range 0.3 (not 0.02) so that the image really moves the vision states.
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8, max_query_positions=16, initializer_range=0.3)
QUERY_NUM = 8
AUTO = {"chat": AutoModelForImageTextToText, "cpmbee": AutoModelForCausalLM, "paint": AutoModel}
KINDS = tuple(AUTO)
LM_KEYS = ("input_ids", "attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids",
           "ext_table_sub")
BEAM = dict(beam_size=3, temperature=0.7, repetition_penalty=1.1, length_penalty=3.0, max_length=6)
CHAT_PROMPT = {"image": "<unk>" * QUERY_NUM, "context": "", "question": "What are 𠀂 and <unk_2> 𠀀?", "<ans>": ""}
BEE_PROMPT = {"input": "今天天气不错", "question": "What are 𠀂 and <unk_2> 𠀀?", "<ans>": ""}
PAINT_PROMPTS = [{"caption": "a red cat on a mat", "objects": ""}, {"caption": "一只猫 𠀀", "objects": ""}]


def _config(kind):
    if kind == "chat":
        return VisCPMChatConfig(vision_config=VISION, text_config=TEXT, query_num=QUERY_NUM)
    if kind == "cpmbee":
        return CpmBeeConfig(**TEXT)
    return VisCPMPaintTextEncoderConfig(text_config=TEXT, projection_dim=64)


def _build(kind):
    classes = {"chat": VisCPMChatForConditionalGeneration, "cpmbee": CpmBeeForCausalLM,
               "paint": VisCPMPaintTextEncoder}
    torch.manual_seed(0)
    model = classes[kind](_config(kind)).eval()
    if kind == "chat":  # as a converted checkpoint: the original decoding is the saved default
        model.generation_config = VisCPMChatForConditionalGeneration.original_generation_config(model.config)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, vocab_file):
    """Folder with the three tiny models saved, the tokenizer, and their fp32 reference outputs."""
    root = tmp_path_factory.mktemp("memory")
    tokenizer = CpmBeeTokenizer(vocab_file)
    references = {}
    for kind in KINDS:
        model = _build(kind)
        model.save_pretrained(root / kind)
        references[kind] = (model, _outputs(kind, model, tokenizer))
    return root, tokenizer, references


def _load(root, kind, **kwargs):
    return AUTO[kind].from_pretrained(root / kind, **kwargs).eval()


def _encode(tokenizer, data, **kwargs):
    return tokenizer(copy.deepcopy(data), return_tensors="pt", padding=True, **kwargs)


def _pixels():
    size = VISION["image_size"]
    return torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _outputs(kind, model, tokenizer):
    """The tensors compared between loads: logits (and vision states), or the Paint conditioning."""
    if kind == "paint":
        inputs = _encode(tokenizer, PAINT_PROMPTS, padding_side="right")
        out = model(**{key: inputs[key] for key in LM_KEYS})
        return {"embeds": out.last_hidden_state, "text": out.text_hidden_state}
    inputs = _encode(tokenizer, [CHAT_PROMPT if kind == "chat" else BEE_PROMPT])
    assert inputs["ext_table_ids"].shape[-1] > 0  # the ext-table columns of the output head are covered too
    if kind == "chat":
        out = model(**{key: inputs[key] for key in LM_KEYS}, pixel_values=_pixels())
        return {"logits": out.logits, "vision": out.vision_hidden_states}
    return {"logits": model(**{key: inputs[key] for key in LM_KEYS}).logits}


def _answer(kind, model, tokenizer, decode_mode="dynamic"):
    """The original beam search's answer tokens: through `generate()` for Chat (its default path)."""
    if kind == "chat":
        inputs = _encode(tokenizer, [CHAT_PROMPT])
        sequences = model.generate(**inputs, pixel_values=_pixels(), original_max_length=BEAM["max_length"],
                                   decode_mode=decode_mode)
        assert torch.equal(sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        return sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return cpmbee_beam_search(model, **_encode(tokenizer, [BEE_PROMPT]), **BEAM, decode_mode=decode_mode)[0][0]


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


QUANTIZATION = {
    "8bit": (lambda: BitsAndBytesConfig(load_in_8bit=True), bnb.nn.Linear8bitLt),
    "nf4": (lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float32), bnb.nn.Linear4bit),
}


# -- bitsandbytes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", list(QUANTIZATION))
def test_quantized_load_replaces_the_linear_layers_only(tiny, kind, bits):
    root, _, references = tiny
    make_config, layer_class = QUANTIZATION[bits]
    reference = references[kind][0]
    model = _load(root, kind, quantization_config=make_config(), device_map="cpu")
    linears = {name for name, module in reference.named_modules() if type(module) is nn.Linear}
    assert {name for name, module in model.named_modules() if isinstance(module, layer_class)} == linears
    # Everything else keeps its float weights: the embedding (also the output head: an nn.Embedding, never a
    # quantized Linear), the position bias, the norms and, in Chat, the patch convolution, position tables and
    # queries.
    kept = {name: param for name, param in model.named_parameters()
            if name.rsplit(".", 1)[0] not in linears or name.endswith(".bias")}
    assert {"model.embed_tokens.weight", "language_model.model.embed_tokens.weight"} & set(kept)
    for name, param in kept.items():
        assert param.dtype == torch.float32 and torch.equal(param, reference.get_parameter(name)), name
    linear_bytes = sum(reference.get_submodule(name).weight.nbytes for name in linears)
    saved = reference.get_memory_footprint() - model.get_memory_footprint()
    assert saved >= {"8bit": 0.7, "nf4": 0.8}[bits] * linear_bytes  # ideally 3/4 and 7/8 (plus scales)


def _round_linear_weights_to_nf4(model, blocksize=64):
    """fp32 `model` with every `nn.Linear` weight replaced by its nf4 round trip (what a 4-bit load stores)."""
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear:
                packed, state = quantize_4bit(module.weight, blocksize=blocksize, quant_type="nf4")
                module.weight.copy_(dequantize_4bit(packed, state))
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", list(QUANTIZATION))
def test_quantized_outputs_and_answers(tiny, kind, bits):
    """8-bit: within cosine 0.99 of fp32. nf4: fp32 with the weights rounded to nf4, up to the kernel's bfloat16
    products (bitsandbytes' AVX512-BF16 CPU kernel: about 1 %, while the rounding itself moves these random tiny
    models' outputs by a third). Then the original beam search runs on the quantized layers."""
    root, tokenizer, references = tiny
    model = _load(root, kind, quantization_config=QUANTIZATION[bits][0](), device_map="cpu")
    fp32 = references[kind][1]
    outputs = _outputs(kind, model, tokenizer)
    if bits == "nf4":
        assert {m.weight.blocksize for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {64}
        rounded = _outputs(kind, _round_linear_weights_to_nf4(_build(kind)), tokenizer)
    for name, tensor in outputs.items():
        assert tensor.dtype == torch.float32 and tensor.shape == fp32[name].shape
        if bits == "8bit":
            assert _cosine(tensor, fp32[name]) > 0.99, name
        else:
            assert _relative_error(tensor, rounded[name]) < 0.03, name
            assert _relative_error(rounded[name], fp32[name]) > 0.1, name
    if kind != "paint":
        answer = _answer(kind, model, tokenizer)
        columns = fp32["logits"].shape[-1]
        assert 0 < len(answer) <= BEAM["max_length"] + 3 and all(0 <= token < columns for token in answer)
        # The fixed-shape decode step keeps its buffers in the compute dtype, not the stored int8/uint8.
        assert _answer(kind, model, tokenizer, decode_mode="static") == answer


# -- accelerate: device_map with layers offloaded to disk -----------------------------------------------------------

# Every tier is used, the input embedding (also the output head) on disk included. Chat's `query` is a parameter of
# the top module, which accelerate cannot offload.
OFFLOAD_MAPS = {
    "cpmbee": {"model.embed_tokens": "disk", "model.position_bias": "disk", "model.layers.0": "cpu",
               "model.layers.1": "disk", "model.norm": "disk"},
    "chat": {"query": "cpu", "vision_model": "disk", "mapping": "disk", "language_model.model.embed_tokens": "disk",
             "language_model.model.position_bias": "disk", "language_model.model.layers.0": "disk",
             "language_model.model.layers.1": "cpu", "language_model.model.norm": "disk"},
    "paint": {"model.embed_tokens": "disk", "model.position_bias": "disk", "model.layers": "disk",
              "model.norm": "cpu", "projection": "disk", "layer_norm": "disk"},
}


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match any submodules")  # `query`, a parameter
@pytest.mark.parametrize("kind", KINDS)
def test_offloaded_layers_give_the_same_outputs_and_answers(tiny, kind, tmp_path):
    root, tokenizer, references = tiny
    reference, expected = references[kind]
    model = _load(root, kind, device_map=OFFLOAD_MAPS[kind], offload_folder=tmp_path)
    assert model.hf_device_map == OFFLOAD_MAPS[kind]
    assert any(param.device.type == "meta" for param in model.parameters())  # weights really are on disk
    outputs = _outputs(kind, model, tokenizer)
    for name, tensor in outputs.items():
        assert tensor.device.type == "cpu"
        assert torch.allclose(tensor, expected[name], atol=1e-5, rtol=0), name
    if kind == "paint":
        return
    expected_answer = _answer(kind, reference, tokenizer)
    assert _answer(kind, model, tokenizer) == expected_answer
    assert _answer(kind, model, tokenizer, decode_mode="static") == expected_answer
    if kind == "cpmbee":  # transformers' own loop over the same layers (dynamic cache through the hooks)
        inputs = _encode(tokenizer, [BEE_PROMPT])
        settings = dict(max_new_tokens=4, do_sample=False, num_beams=1)
        assert torch.equal(model.generate(**inputs, **settings), reference.generate(**inputs, **settings))


@pytest.mark.parametrize("kind", KINDS)
def test_auto_device_maps_never_split_a_no_split_module(kind):
    """`device_map="auto"` maps over a range of memory budgets: the model is cut in many places (a memory tier and
    disk), but never inside a module listed in `_no_split_modules`; the vision embeddings, which add their own
    parameter (the class token) to their children's outputs, are such a module."""
    config = _config(kind)
    # A small vocabulary: the real embedding is about one decoder layer, not 98 % of the model as in the tiny one.
    (config.text_config if kind != "cpmbee" else config).vocab_size = 1000
    with torch.device("meta"):
        model = AUTO[kind].from_config(config)
    no_split = set(model._no_split_modules)
    expected = {"CpmBeeDecoderLayer"} | ({"VisCPMVisionEmbeddings", "VisCPMVisionLayer"} if kind == "chat" else set())
    assert no_split == expected
    whole = [name for name, module in model.named_modules() if type(module).__name__ in no_split]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    cuts = set()
    for step in range(1, 40):
        device_map = infer_auto_device_map(model, max_memory={"cpu": total * step // 20},
                                           no_split_module_classes=model._no_split_modules)
        for key in device_map:
            assert not any(key.startswith(name + ".") for name in whole), (key, device_map)
        if len(set(device_map.values())) > 1:
            cuts.update(device_map)
    assert len(cuts) > 3  # the budgets did cut the model, at several places
