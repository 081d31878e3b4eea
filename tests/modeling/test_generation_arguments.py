"""Bad generation arguments are clear errors (issue 16): each case names the argument and the fix, and is raised
before any decoding work. One table per entry point: Chat's `generate()` (the original beam search and
transformers' loop), `CpmBeeForCausalLM.generate()`, `cpmbee_beam_search`, and `VisCPMChat.chat()`; the static
decoder's memory check runs in a child process under an address-space limit."""

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from viscpm import (
    CpmBeeConfig,
    CpmBeeForCausalLM,
    CpmBeeTokenizer,
    VisCPMChat,
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMChatProcessor,
    VisCPMImageProcessor,
    cpmbee_beam_search,
)

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=8, intermediate_size=48,
            position_bias_num_buckets=32, position_bias_num_segment_buckets=32, position_bias_max_distance=64,
            rotary_dtype="float32")
VISION = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=32,
              patch_size=8, max_query_positions=16)
QUERY_NUM = 8
CHAT_PROMPT = {"image": "<unk>" * QUERY_NUM, "context": "", "question": "What is it?", "<ans>": ""}
BEE_PROMPT = {"question": "What is it?", "<ans>": ""}
NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def tiny(vocab_file):
    torch.manual_seed(0)
    chat = VisCPMChatForConditionalGeneration(
        VisCPMChatConfig(vision_config=VISION, text_config=TEXT, query_num=QUERY_NUM)
    ).eval()
    chat.generation_config = chat.original_generation_config(chat.config)  # as a converted checkpoint saves it
    bee = CpmBeeForCausalLM(CpmBeeConfig(**TEXT)).eval()
    tokenizer = CpmBeeTokenizer(vocab_file)
    return chat, bee, tokenizer


def _encode(tokenizer, data):
    return dict(tokenizer([copy.deepcopy(data)], return_tensors="pt", padding=True))


def _pixels():
    return torch.randn((1, 3, VISION["image_size"], VISION["image_size"]), generator=torch.Generator().manual_seed(0))


def _meta_like(tensor):
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


# (id, arguments, error type, words the message must contain)
ORIGINAL_CASES = [
    ("temperature-zero", dict(temperature=0), ValueError, ["temperature", "> 0", "division by zero", "num_beams=1"]),
    ("temperature-nan", dict(temperature=NAN), ValueError, ["temperature", "finite number", "nan"]),
    ("temperature-inf", dict(temperature=INF), ValueError, ["temperature", "finite number", "inf"]),
    ("temperature-negative", dict(temperature=-0.5), ValueError, ["temperature", "> 0", "-0.5"]),
    ("temperature-string", dict(temperature="0.7"), TypeError, ["temperature", "number", "str"]),
    ("repetition-penalty-nan", dict(repetition_penalty=NAN), ValueError, ["repetition_penalty", "finite number"]),
    ("repetition-penalty-inf", dict(repetition_penalty=INF), ValueError, ["repetition_penalty", "finite number"]),
    ("repetition-penalty-below-one", dict(repetition_penalty=0.5), ValueError,
     ["repetition_penalty", ">= 1.0", "1.0 is no penalty"]),
    ("length-penalty-nan", dict(length_penalty=NAN), ValueError, ["length_penalty", "finite number"]),
    ("num-beams-float", dict(num_beams=2.5), TypeError, ["num_beams", "whole number", "num_beams=2"]),
    ("num-beams-bool", dict(num_beams=True), TypeError, ["num_beams", "whole number", "bool"]),
    ("num-beams-zero", dict(num_beams=0), ValueError, ["num_beams", "at least 1"]),
    ("max-new-tokens-string", dict(max_new_tokens="5"), TypeError, ["max_new_tokens", "str", "max_new_tokens=5"]),
    ("max-new-tokens-zero", dict(max_new_tokens=0), ValueError, ["max_new_tokens", "at least 1"]),
    ("max-new-tokens-negative", dict(max_new_tokens=-3), ValueError, ["max_new_tokens", "at least 1"]),
    ("decode-mode-unknown", dict(decode_mode="graph"), ValueError, ["decode_mode", "'dynamic'", "'static'"]),
    ("answer-segments-empty", dict(answer_segments=[[]]), ValueError, ["answer_segments", "non-empty", "every sample"]),
    ("answer-segments-per-sample", dict(answer_segments=[[1], [1]]), ValueError, ["answer_segments", "every sample"]),
]
TRANSFORMERS_LOOP_CASES = [
    ("num-beams-float", dict(num_beams=2.5), TypeError, ["num_beams", "whole number"]),
    ("max-new-tokens-string", dict(max_new_tokens="5"), TypeError, ["max_new_tokens", "whole number"]),
    ("num-return-sequences-float", dict(num_return_sequences=1.5), TypeError, ["num_return_sequences"]),
    ("sampling-temperature-zero", dict(do_sample=True, temperature=0.0), ValueError,
     ["temperature", "> 0", "do_sample=False"]),
    ("sampling-temperature-nan", dict(do_sample=True, temperature=NAN), ValueError, ["temperature", "finite"]),
    ("repetition-penalty-inf", dict(repetition_penalty=INF), ValueError, ["repetition_penalty", "finite"]),
    ("repetition-penalty-zero", dict(repetition_penalty=0.0), ValueError, ["repetition_penalty", "> 0"]),
    ("top-p-above-one", dict(do_sample=True, top_p=2.0), ValueError, ["top_p", "(0, 1]", "2.0"]),
    ("top-p-zero", dict(do_sample=True, top_p=0.0), ValueError, ["top_p", "(0, 1]"]),
    ("top-p-nan", dict(do_sample=True, top_p=NAN), ValueError, ["top_p", "nan"]),
    ("top-p-string", dict(do_sample=True, top_p="0.9"), TypeError, ["top_p", "number", "str"]),
    ("top-k-negative", dict(do_sample=True, top_k=-1), ValueError, ["top_k", "at least 0", "-1"]),
    ("top-k-float", dict(do_sample=True, top_k=2.5), TypeError, ["top_k", "whole number", "top_k=2"]),
    ("typical-p-above-one", dict(do_sample=True, typical_p=1.5), ValueError, ["typical_p", "(0, 1]"]),
    ("min-p-negative", dict(do_sample=True, min_p=-0.1), ValueError, ["min_p", "[0, 1]"]),
    ("min-p-above-one", dict(do_sample=True, min_p=1.1), ValueError, ["min_p", "[0, 1]"]),
    ("epsilon-cutoff-one", dict(do_sample=True, epsilon_cutoff=1.0), ValueError, ["epsilon_cutoff", "[0, 1)"]),
    ("temperature-negative", dict(do_sample=True, temperature=-1.0), ValueError, ["temperature", "> 0"]),
]
IMAGE_CASES = [
    ("pixel-values-meta", lambda inputs: dict(pixel_values=_meta_like(_pixels())), ["pixel_values", "meta tensor"]),
    ("input-ids-meta", lambda inputs: dict(input_ids=_meta_like(inputs["input_ids"]), pixel_values=_pixels()),
     ["input_ids", "meta tensor"]),
    ("pixel-values-nan", lambda inputs: dict(pixel_values=torch.full_like(_pixels(), NAN)),
     ["pixel_values", "NaN or infinite", "image processor"]),
    ("vision-states-nan", lambda inputs: dict(vision_hidden_states=torch.full((1, QUERY_NUM, 32), NAN)),
     ["vision_hidden_states", "NaN or infinite", "earlier call"]),
    ("vision-states-inf", lambda inputs: dict(vision_hidden_states=torch.full((1, QUERY_NUM, 32), INF)),
     ["vision_hidden_states", "NaN or infinite"]),
]


def _raises(call, error, words):
    with pytest.raises(error) as caught:
        call()
    assert type(caught.value) is error
    message = str(caught.value)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("arguments, error, words", [case[1:] for case in ORIGINAL_CASES],
                         ids=[case[0] for case in ORIGINAL_CASES])
def test_chat_original_beam_search_arguments(tiny, arguments, error, words):
    chat, _, tokenizer = tiny
    inputs = {**_encode(tokenizer, CHAT_PROMPT), "pixel_values": _pixels()}
    settings = {"max_new_tokens": 4, "original_beam_search": True, **arguments}
    _raises(lambda: chat.generate(**inputs, **settings), error, words)


@pytest.mark.parametrize("arguments, error, words", [case[1:] for case in TRANSFORMERS_LOOP_CASES],
                         ids=[case[0] for case in TRANSFORMERS_LOOP_CASES])
@pytest.mark.parametrize("model_kind", ["chat", "cpmbee"])
def test_transformers_loop_arguments(tiny, model_kind, arguments, error, words):
    chat, bee, tokenizer = tiny
    if model_kind == "chat":
        model, inputs = chat, {**_encode(tokenizer, CHAT_PROMPT), "pixel_values": _pixels()}
        arguments = {"original_beam_search": False, **arguments}
    else:
        model, inputs = bee, _encode(tokenizer, BEE_PROMPT)
    _raises(lambda: model.generate(**inputs, **{"max_new_tokens": 4, **arguments}), error, words)


@pytest.mark.parametrize("make, words", [case[1:] for case in IMAGE_CASES], ids=[case[0] for case in IMAGE_CASES])
@pytest.mark.parametrize("original", [True, False], ids=["original", "transformers"])
def test_chat_image_inputs(tiny, make, words, original):
    chat, _, tokenizer = tiny
    inputs = _encode(tokenizer, CHAT_PROMPT)
    inputs.update(make(inputs))
    _raises(lambda: chat.generate(**inputs, max_new_tokens=3, original_beam_search=original), ValueError, words)
    if "input_ids" not in words:  # the forward pass checks the image inputs too
        _raises(lambda: chat(**inputs), ValueError, words)


def test_cpmbee_generate_meta_input(tiny):
    _, bee, tokenizer = tiny
    inputs = _encode(tokenizer, BEE_PROMPT)
    inputs["input_ids"] = _meta_like(inputs["input_ids"])
    _raises(lambda: bee.generate(**inputs, max_new_tokens=3), ValueError, ["input_ids", "meta tensor"])


BEAM_SEARCH_CASES = [
    ("temperature-zero", dict(temperature=0.0), ValueError, ["temperature", "division by zero"]),
    ("repetition-penalty-nan", dict(repetition_penalty=NAN), ValueError, ["repetition_penalty", "finite"]),
    ("beam-size-float", dict(beam_size=1.5), TypeError, ["beam_size", "whole number", "beam_size=1"]),
    ("max-length-string", dict(max_length="5"), TypeError, ["max_length", "str", "max_length=5"]),
    ("max-length-zero", dict(max_length=0), ValueError, ["max_length", "at least 1"]),
    ("decode-mode-unknown", dict(decode_mode="graph"), ValueError, ["decode_mode must be one of"]),
    ("cuda-graph-on-cpu", dict(decode_mode="cuda_graph"), ValueError, ["cuda_graph", "CUDA device", "'static'"]),
]


@pytest.mark.parametrize("arguments, error, words", [case[1:] for case in BEAM_SEARCH_CASES],
                         ids=[case[0] for case in BEAM_SEARCH_CASES])
def test_cpmbee_beam_search_arguments(tiny, arguments, error, words):
    _, bee, tokenizer = tiny
    inputs = _encode(tokenizer, BEE_PROMPT)
    _raises(lambda: cpmbee_beam_search(bee, **inputs, **{"max_length": 4, **arguments}), error, words)


CHAT_CALL_CASES = [
    ("temperature-zero", lambda: _pixels()[0], dict(temperature=0), ValueError, ["temperature", "division by zero"]),
    ("repetition-penalty-nan", lambda: _pixels()[0], dict(repetition_penalty=NAN), ValueError,
     ["repetition_penalty", "finite"]),
    ("num-beams-float", lambda: _pixels()[0], dict(num_beams=2.5), TypeError, ["num_beams", "whole number"]),
    ("max-new-tokens-string", lambda: _pixels()[0], dict(max_new_tokens="5"), TypeError, ["max_new_tokens"]),
    ("sampling-top-p-above-one", lambda: _pixels()[0], dict(do_sample=True, top_p=2.0), ValueError,
     ["top_p", "(0, 1]", "2.0"]),
    ("sampling-top-k-negative", lambda: _pixels()[0], dict(do_sample=True, top_k=-3), ValueError,
     ["top_k", "at least 0"]),
    ("sampling-temperature-nan", lambda: _pixels()[0], dict(do_sample=True, temperature=NAN), ValueError,
     ["temperature", "finite"]),
    ("sampling-typical-p-zero", lambda: _pixels()[0], dict(do_sample=True, typical_p=0.0), ValueError,
     ["typical_p", "(0, 1]"]),
    ("sampling-min-p-two", lambda: _pixels()[0], dict(do_sample=True, min_p=2.0), ValueError, ["min_p", "[0, 1]"]),
    ("image-meta-tensor", lambda: torch.empty((3, 32, 32), device="meta"), {}, ValueError,
     ["meta device", "image"]),
]


@pytest.mark.parametrize("image, arguments, error, words", [case[1:] for case in CHAT_CALL_CASES],
                         ids=[case[0] for case in CHAT_CALL_CASES])
def test_viscpm_chat_arguments(tiny, image, arguments, error, words):
    chat, _, tokenizer = tiny
    processor = VisCPMChatProcessor(VisCPMImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                                    query_num=QUERY_NUM)
    session = VisCPMChat(chat, processor)
    _raises(lambda: session.chat(image(), "What is it?", **{"max_new_tokens": 3, **arguments}), error, words)


_STATIC_MEMORY = """
import resource, torch
from viscpm import CpmBeeConfig, CpmBeeForCausalLM, cpmbee_beam_search
limit = 8 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
torch.manual_seed(0)
model = CpmBeeForCausalLM(CpmBeeConfig(**{text})).eval()
for length in (10**7, 10**9):
    try:
        cpmbee_beam_search(model, torch.tensor([[6, 10, 7, 6]]), beam_size=3, max_length=length, decode_mode="static")
        print("no error")
    except ValueError as error:
        print("ValueError:", error)
    except BaseException as error:
        print(type(error).__name__, error)
"""


def test_static_decoding_sizes_are_refused_before_allocating():
    """Under an 8 GiB address-space limit, static buffers of 16 GB and of 16 TB are refused by our check, which
    names the limit, before anything is allocated (an allocation attempt would end in a MemoryError or a torch
    RuntimeError instead)."""
    script = textwrap.dedent(_STATIC_MEMORY).format(text=TEXT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()[-2:]
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("ValueError: "), line
        for word in ("decode_mode='static'", "GB", "RLIMIT_AS", "max_new_tokens", "decode_mode='dynamic'"):
            assert word in line, line
