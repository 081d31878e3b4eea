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

TINY_ORIGINAL_CONFIG = dict(
    vocab_size=86583,
    dim_model=32,
    num_heads=4,
    dim_head=8,
    dim_ff=48,
    num_layers=2,
    dropout_p=0.0,
    position_bias_num_buckets=32,
    position_bias_num_segment_buckets=32,
    position_bias_max_distance=64,
    eps=1e-6,
    half=False,
)


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
