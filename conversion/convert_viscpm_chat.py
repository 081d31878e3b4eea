#!/usr/bin/env python
"""Convert an original VisCPM-Chat checkpoint into a Hugging Face model folder.

    python conversion/convert_viscpm_chat.py --checkpoint viscpm_chat_balance_checkpoint.pt \\
        --output-dir viscpm-chat-hf \\
        [--llm-config cpm-bee-10b.json] [--vision-config beit3.json] [--query-num 64] [--vocab-file bee.txt] \\
        [--dtype float16] [--overwrite]

Defaults are the released model: CPM-Bee 10B, BEiT-3 large 224/16, 64 queries. `--llm-config` takes the original
CPM-Bee JSON keys (`dim_model`, `num_layers`, ...), `--vision-config` torchscale `EncoderConfig` keys
(`encoder_embed_dim`, `encoder_layers`, `encoder_attention_heads`, `encoder_ffn_embed_dim`, `img_size`,
`patch_size`, `vocab_size`). The folder then loads with `AutoModelForImageTextToText.from_pretrained` (after
`import viscpm`). The checkpoint is read with `weights_only=True` and memory-mapped; the output folder appears
only once it is complete. BEiT-3 weights VisCPM-Chat never uses (the masked-image-modelling head, the text
embedding, the mask token) are dropped, and the log says so.

An original Chat checkpoint is ``torch.save(VLU_CPMBee.state_dict())``:

* ``vpm.beit3.*`` — BEiT-3 (torchscale names, ``.A.``/``.B.`` for the image/query experts) → ``vision_model.*``;
* ``query`` (the learned query tokens) and ``mapping.0.*``/``mapping.2.*`` → same names;
* ``llm.*`` — CPM-Bee → ``language_model.model.*`` (the foundation's key map).

Dropped knowingly (each is logged), because VisCPM-Chat never reads them at inference:

* ``vpm.mim_head.weight``/``.bias`` — BEiT-3's masked-image-modelling head (pre-training only);
* ``vpm.beit3.text_embed.weight`` — BEiT-3's text embedding: the original only reads two of its rows once, to
  initialise ``query`` before training; the trained ``query`` is in the checkpoint;
* ``vpm.beit3.vision_embed.mask_token`` — replaces masked patches in masked-image-modelling only.

Everything else must be present with the shapes the config gives; a VisCPM-Paint checkpoint (``trans_block.*``,
``unet.*``) or a plain CPM-Bee one is refused with a message that says so. Loading, validation and writing are
those of :mod:`viscpm.conversion.common` (``weights_only``, memory-mapped, atomic output, safetensors, progress bars).

Exit status: 0 on success, 1 on a conversion error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from viscpm.conversion.common import (
    DEFAULT_MAX_SHARD_SIZE,
    ConversionError,
    KeyMap,
    check_converted,
    check_output_dir,
    config_differences,
    converter_parser,
    first_line,
    load_config,
    load_original_checkpoint,
    parse_dtype,
    run_converter,
    shape_of,
    shorten,
    sizes_from_shapes,
    split_by_prefix,
    write_model_folder,
)
from viscpm.conversion.convert_cpmbee import (
    convert_cpmbee_state_dict,
    cpmbee_config_differences,
    cpmbee_original_name,
    detect_prefix,
    load_cpmbee_config,
    load_tokenizer,
    map_cpmbee_key,
)
from viscpm import modeling  # the model classes load when a conversion runs, not for --help
from viscpm.modeling.configuration_viscpm_chat import VisCPMChatConfig, VisCPMVisionConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_DROPPED_KEYS",
    "VISION_KEYS",
    "build_chat_config",
    "convert_chat_state_dict",
    "convert_viscpm_chat_checkpoint",
    "load_vision_config",
    "main",
    "map_chat_key",
    "vision_config_from_original",
]


def _vision_templates():
    experts = (("A", "image"), ("B", "query"))
    params = ("weight", "bias")
    layer = "encoder.layers.{i}."
    per_expert = [  # (original under beit3., ours under vision_model.), with {E}/{e} the expert, {p} the parameter
        (layer + "self_attn_layer_norm.{E}.{p}", "layers.{i}.attention_norm.{e}.{p}"),
        (layer + "self_attn.q_proj.{E}.{p}", "layers.{i}.attention.q_proj.{e}.{p}"),
        (layer + "self_attn.k_proj.{E}.{p}", "layers.{i}.attention.k_proj.{e}.{p}"),
        (layer + "self_attn.v_proj.{E}.{p}", "layers.{i}.attention.v_proj.{e}.{p}"),
        (layer + "self_attn.inner_attn_ln.{E}.{p}", "layers.{i}.attention.inner_norm.{e}.{p}"),
        (layer + "self_attn.out_proj.{E}.{p}", "layers.{i}.attention.o_proj.{e}.{p}"),
        (layer + "final_layer_norm.{E}.{p}", "layers.{i}.mlp_norm.{e}.{p}"),
        (layer + "ffn.{E}.fc1.{p}", "layers.{i}.mlp.{e}.fc1.{p}"),
        (layer + "ffn.{E}.ffn_layernorm.{p}", "layers.{i}.mlp.{e}.inner_norm.{p}"),
        (layer + "ffn.{E}.fc2.{p}", "layers.{i}.mlp.{e}.fc2.{p}"),
        ("encoder.layer_norm.{E}.{p}", "post_layernorm.{e}.{p}"),
    ]
    templates = [
        ("vision_embed.proj.weight", "embeddings.patch_embedding.weight"),
        ("vision_embed.proj.bias", "embeddings.patch_embedding.bias"),
        ("vision_embed.cls_token", "embeddings.cls_token"),
        ("encoder.embed_positions.A.weight", "embeddings.position_embedding.image.weight"),
        ("encoder.embed_positions.B.weight", "embeddings.position_embedding.query.weight"),
    ]
    for original, ours in per_expert:
        for big, small in experts:
            for param in params:
                templates.append((original.replace("{E}", big).replace("{p}", param),
                                  ours.replace("{e}", small).replace("{p}", param)))
    return templates


VISION_KEYS = KeyMap(_vision_templates())
"""torchscale BEiT-3 names (under ``vpm.beit3.``) → ours inside `VisCPMVisionModel`. Shapes are identical."""

CHAT_DROPPED_KEYS = {
    "vpm.mim_head.weight": "BEiT-3's masked-image-modelling head (pre-training only)",
    "vpm.mim_head.bias": "BEiT-3's masked-image-modelling head (pre-training only)",
    "vpm.beit3.text_embed.weight": "BEiT-3's text embedding (only used to initialise `query` before training)",
    "vpm.beit3.vision_embed.mask_token": "BEiT-3's mask token (masked-image-modelling only)",
}
"""Original keys VisCPM-Chat never reads at inference, with the reason; dropped (and logged) on conversion."""

_TOP_LEVEL = {"query": "query"}
_MAPPING = re.compile(r"mapping\.(0|2)\.(weight|bias)")
_VISION_PREFIX, _LLM_PREFIX = "vpm.beit3.", "llm."
_HF_VISION, _HF_LLM = "vision_model.", "language_model.model."
_PAINT_MARKERS = ("trans_block.", "unet.")


def map_chat_key(key: str) -> str | None:
    """Our name for an original VisCPM-Chat key (without a wrapper prefix), or None if it is not one we keep."""
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    if _MAPPING.fullmatch(key):
        return key
    return VISION_KEYS.to_hf(key, _VISION_PREFIX, _HF_VISION) or map_cpmbee_key(key, _LLM_PREFIX, _HF_LLM)


def _original_name(hf_key: str) -> str:
    """The original key for one of ours (for messages)."""
    return VISION_KEYS.to_original(hf_key, _VISION_PREFIX, _HF_VISION) or cpmbee_original_name(
        hf_key, _LLM_PREFIX, _HF_LLM)


def convert_chat_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename an original VisCPM-Chat state dict (no wrapper prefix) to our names; tensors are not copied.

    Returns:
        ``(converted, unmapped, dropped)``: our tensors, the original keys no rule knows, and the keys of
        :data:`CHAT_DROPPED_KEYS` that were present.
    """
    llm, rest = split_by_prefix(state_dict, _LLM_PREFIX)
    converted, unmapped = convert_cpmbee_state_dict(llm, _LLM_PREFIX, _HF_LLM)
    dropped = []
    for key, tensor in rest.items():
        if key in CHAT_DROPPED_KEYS:
            dropped.append(key)
            continue
        new_key = map_chat_key(key)
        if new_key is None:
            unmapped.append(key)
        else:
            converted[new_key] = tensor
    return converted, unmapped, dropped


ORIGINAL_VISION_KEYS = {
    "encoder_embed_dim": "hidden_size",
    "encoder_layers": "num_hidden_layers",
    "encoder_attention_heads": "num_attention_heads",
    "encoder_ffn_embed_dim": "intermediate_size",
    "img_size": "image_size",
    "patch_size": "patch_size",
    "in_chans": "num_channels",
    "max_source_positions": "max_query_positions",
    "layernorm_eps": "layer_norm_eps",
    "activation_fn": "hidden_act",
}
"""torchscale `EncoderConfig` keys → ours in `VisCPMVisionConfig`."""

ORIGINAL_VISION_FIXED = {
    "multiway": True,
    "subln": True,
    "encoder_normalize_before": True,
    "normalize_output": True,
    "layernorm_embedding": False,
    "no_scale_embedding": True,
    "no_output_layer": True,
    "deepnorm": False,
    "rel_pos_buckets": 0,
    "max_rel_pos": 0,
    "xpos_rel_pos": False,
    "moe_freq": 0,
    "share_encoder_input_output_embed": False,
}
"""`EncoderConfig` flags whose values the port assumes (the released model's); any other value is refused."""

ORIGINAL_VISION_IGNORED = {
    "vocab_size", "dropout", "attention_dropout", "activation_dropout", "drop_path_rate", "checkpoint_activations",
    "fsdp", "ddp_rank", "bert_init", "mlp_ratio", "moe_expert_count", "moe_top1_expert", "moe_gating_use_fp32",
    "moe_eval_capacity_token_fraction", "moe_second_expert_policy", "moe_normalize_gate_prob_before_dropping",
    "use_xmoe", "xpos_scale_base",
}
"""Keys that only matter for training, or for parts of BEiT-3 VisCPM-Chat never runs (the text embedding)."""


def vision_config_from_original(original: Mapping) -> VisCPMVisionConfig:
    """A `VisCPMVisionConfig` from torchscale `EncoderConfig` keys (``encoder_embed_dim``, ``encoder_layers``, ...).

    Missing keys take the BEiT-3 large values. ``vocab_size`` belongs to BEiT-3's text embedding, which VisCPM-Chat
    does not run, and is accepted and ignored.

    Raises:
        ValueError: unknown keys, or flags that would change the architecture away from the one VisCPM uses
            (e.g. ``multiway=False``, ``deepnorm=True``).
    """
    unknown = sorted(set(original) - set(ORIGINAL_VISION_KEYS) - set(ORIGINAL_VISION_FIXED) - ORIGINAL_VISION_IGNORED)
    if unknown:
        raise ValueError(f"not a BEiT-3 EncoderConfig: unknown keys {unknown}")
    unsupported = [
        f"{key}={original[key]!r} (VisCPM uses {value!r})"
        for key, value in ORIGINAL_VISION_FIXED.items()
        if key in original and original[key] != value
    ]
    if unsupported:
        raise ValueError(f"unsupported BEiT-3 settings: {', '.join(unsupported)}")
    if original.get("activation_fn", "gelu") != "gelu":
        raise ValueError(f"unsupported activation_fn {original['activation_fn']!r} (VisCPM uses 'gelu')")
    return VisCPMVisionConfig(**{ours: original[key] for key, ours in ORIGINAL_VISION_KEYS.items() if key in original})


def load_vision_config(config: VisCPMVisionConfig | str | os.PathLike | Mapping | None = None) -> VisCPMVisionConfig:
    """A `VisCPMVisionConfig` (see `load_config`): nothing is BEiT-3 large 224/16; a dict or file holds torchscale
    `EncoderConfig` keys (``encoder_embed_dim``, ``encoder_layers``, ...) or is ours (``"model_type": "viscpm_vision"``)."""
    sizes = {ours: key for key, ours in ORIGINAL_VISION_KEYS.items() if ours != "hidden_act"}
    return load_config(VisCPMVisionConfig, config, "vision config", "a JSON file of torchscale EncoderConfig keys",
                       vision_config_from_original, sizes=sizes)


def build_chat_config(llm_config=None, vision_config=None, query_num: int | None = None) -> VisCPMChatConfig:
    """The composite config from the original CPM-Bee config (see `convert_cpmbee.load_cpmbee_config`), the
    vision config (see :func:`load_vision_config`) and the number of queries (default 64)."""
    text = load_cpmbee_config(llm_config)
    vision = load_vision_config(vision_config)
    try:
        return VisCPMChatConfig(
            vision_config=vision, text_config=text, query_num=64 if query_num is None else query_num
        )
    except ValueError as error:
        raise ConversionError(first_line(error)) from None


_CHAT_SHAPE_SIZES = (
    ("query_num", "query", 2, 0),
    ("vision hidden_size", "query", 2, 1),
    ("vision num_hidden_layers", _HF_VISION + "layers.", None, None),
    ("vision intermediate_size", _HF_VISION + "layers.0.mlp.image.fc1.weight", 2, 0),
    ("vision patch_size", _HF_VISION + "embeddings.patch_embedding.weight", 4, -1),
)


def _chat_config_differences(converted: Mapping[str, torch.Tensor], config: VisCPMChatConfig) -> str:
    """What the checkpoint's shapes say about the sizes, where that differs from ``config`` (for messages)."""
    vision = config.vision_config
    found = sizes_from_shapes(converted, _CHAT_SHAPE_SIZES)
    positions = shape_of(converted, _HF_VISION + "embeddings.position_embedding.image.weight", 2)
    if positions and "vision patch_size" in found:
        patches = positions[0] - 3  # class token + the two unused rows before the first position
        side = math.isqrt(max(patches, 0))
        if side * side == patches:
            found["vision image_size"] = side * found["vision patch_size"]
    ours = {
        "query_num": config.query_num,
        "vision hidden_size": vision.hidden_size,
        "vision num_hidden_layers": vision.num_hidden_layers,
        "vision intermediate_size": vision.intermediate_size,
        "vision patch_size": vision.patch_size,
        "vision image_size": vision.image_size,
    }
    parts = (config_differences(found, ours),
             cpmbee_config_differences(converted, config.text_config, _HF_LLM, label="llm "))
    return ", ".join(part for part in parts if part)


def _refuse_other_kinds(keys: list[str], source: str) -> None:
    paint = [key for key in keys if key.startswith(_PAINT_MARKERS)]
    if paint:
        raise ConversionError(
            f"{source} is a VisCPM-Paint checkpoint (it has {len(paint)} trans_block.*/unet.* weights, e.g. "
            f"{paint[0]}), not VisCPM-Chat; this converter only handles VisCPM-Chat checkpoints"
        )
    if not any(key.startswith("vpm.") for key in keys):
        if any(key.startswith(_LLM_PREFIX) or key == "input_embedding.weight" for key in keys):
            raise ConversionError(
                f"{source} has no vision encoder (vpm.*): it looks like a CPM-Bee checkpoint; convert it with "
                "conversion/convert_cpmbee.py"
            )
        raise ConversionError(
            f"{source} is not a VisCPM-Chat checkpoint (no vpm.*, query, mapping.* or llm.* weights; it has e.g. "
            f"{shorten(keys, 3)})"
        )


def convert_viscpm_chat_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    llm_config=None,
    vision_config=None,
    query_num: int | None = None,
    vocab_file: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Convert an original VisCPM-Chat checkpoint into a `VisCPMChatForConditionalGeneration` folder.

    Args:
        checkpoint: the original ``.pt`` file (``torch.save`` of ``VLU_CPMBee.state_dict()``).
        output_dir: the folder to create; it appears only once complete.
        llm_config: the original CPM-Bee JSON config (file, dict or `CpmBeeConfig`); None is CPM-Bee 10B.
        vision_config: torchscale `EncoderConfig` keys (file, dict or `VisCPMVisionConfig`); None is BEiT-3 large.
        query_num: number of query tokens; None is 64.
        vocab_file: the CPM-Bee vocabulary (``bee.txt``); when given, the processor (image processor + tokenizer)
            is saved too, so `AutoProcessor`, `pipeline("image-text-to-text")` and `VisCPMChat` load the folder.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; None keeps the checkpoint's dtype.
        overwrite: replace a non-empty ``output_dir`` (only after the new folder is complete).

    Returns:
        ``output_dir`` as a Path.

    Raises:
        ConversionError: anything wrong with the inputs, checked before the output is written.
    """
    config = build_chat_config(llm_config, vision_config, query_num)
    target_dtype = parse_dtype(dtype)
    inputs = (checkpoint, llm_config, vision_config, vocab_file)
    check_output_dir(output_dir, overwrite, inputs)
    processor = None
    if vocab_file is not None:
        image_size = config.vision_config.image_size
        processor = modeling.VisCPMChatProcessor(
            modeling.VisCPMImageProcessor(size={"height": image_size, "width": image_size}),
            load_tokenizer(vocab_file, config.text_config),
            query_num=config.query_num,
        )

    source = str(checkpoint)
    original = load_original_checkpoint(checkpoint)
    keys = list(original)
    _refuse_other_kinds(keys, source)
    prefix = detect_prefix(keys, anchor=_LLM_PREFIX + "input_embedding.weight", source=source)
    if prefix:
        outside = [key for key in keys if not key.startswith(prefix)]
        if outside:
            raise ConversionError(f"{source} mixes keys under {prefix!r} with others, e.g. {shorten(outside, 3)}")
        original = {key[len(prefix):]: tensor for key, tensor in original.items()}
    converted, unmapped, dropped = convert_chat_state_dict(original)

    model = check_converted(
        converted, modeling.VisCPMChatForConditionalGeneration, config, source=source, unexpected=unmapped,
        describe=_original_name, differences=_chat_config_differences(converted, config),
        hint="pass the sizes that belong to this checkpoint (--llm-config, --vision-config, --query-num)",
    )
    model.generation_config = modeling.VisCPMChatForConditionalGeneration.original_generation_config(config)  # saved below
    for key in dropped:
        logger.info("dropping %s: %s, not used by VisCPM-Chat at inference", prefix + key, CHAT_DROPPED_KEYS[key])
    return write_model_folder(output_dir, converted, config, model, overwrite=overwrite, inputs=inputs,
                              dtype=target_dtype, tokenizer=processor, max_shard_size=max_shard_size,
                              progress=progress, describe=_original_name)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return converter_parser(
        prog,
        "Convert an original VisCPM-Chat checkpoint (torch.save state dict) into a Hugging Face folder.",
        "the original VisCPM-Chat checkpoint (.pt / .bin)",
        {
            "--llm-config": dict(help="the original CPM-Bee config JSON; default: CPM-Bee 10B"),
            "--vision-config": dict(help="JSON of torchscale EncoderConfig keys (encoder_embed_dim, encoder_layers, "
                                         "...); default: BEiT-3 large"),
            "--query-num": dict(type=int, help="number of query tokens; default: 64"),
        },
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)  # exits 2 on usage errors
    if args.query_num is not None and args.query_num < 1:
        print(f"error: --query-num must be positive, got {args.query_num}", file=sys.stderr)
        return 2
    return run_converter(convert_viscpm_chat_checkpoint, args, llm_config=args.llm_config,
                         vision_config=args.vision_config, query_num=args.query_num)


if __name__ == "__main__":
    sys.exit(main())
