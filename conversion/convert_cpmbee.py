#!/usr/bin/env python
"""Convert an original CPM-Bee checkpoint into a Hugging Face model folder.

    python conversion/convert_cpmbee.py --checkpoint cpm-bee-10b.pt --output-dir cpmbee-10b-hf \\
        [--config cpm-bee-10b.json] [--vocab-file bee.txt] [--dtype float16] [--overwrite]

The folder then loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
after ``import viscpm``. The checkpoint is read with ``weights_only=True`` (no code from the file
runs) and memory-mapped; the output folder appears only once it is complete.

From Python: :func:`convert_cpmbee_checkpoint`. This module also holds what the Chat and Paint converters reuse
for their CPM-Bee part: the key map (:data:`CPMBEE_KEYS`), the original config (:func:`cpmbee_config_from_original`)
and the vocabulary (:func:`load_tokenizer`).

Exit status: 0 on success, 1 on a conversion error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
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
    require_file,
    run_converter,
    sizes_from_shapes,
    shorten,
    write_model_folder,
)
from viscpm import modeling  # the model classes load when a conversion runs, not for --help
from viscpm.modeling.configuration_cpmbee import CpmBeeConfig

__all__ = [
    "CPMBEE_KEYS",
    "ORIGINAL_CONFIG_KEYS",
    "convert_cpmbee_checkpoint",
    "convert_cpmbee_state_dict",
    "cpmbee_config_differences",
    "cpmbee_config_from_original",
    "cpmbee_original_name",
    "detect_prefix",
    "load_cpmbee_config",
    "load_tokenizer",
    "map_cpmbee_key",
    "main",
]


CPMBEE_KEYS = KeyMap(
    [
        ("input_embedding.weight", "embed_tokens.weight"),
        ("position_bias.relative_attention_bias", "position_bias.weight"),
        ("encoder.output_layernorm.weight", "norm.weight"),
        ("encoder.layers.{i}.self_att.layernorm_before_attention.weight", "layers.{i}.input_layernorm.weight"),
        ("encoder.layers.{i}.self_att.self_attention.project_q.weight", "layers.{i}.self_attn.q_proj.weight"),
        ("encoder.layers.{i}.self_att.self_attention.project_k.weight", "layers.{i}.self_attn.k_proj.weight"),
        ("encoder.layers.{i}.self_att.self_attention.project_v.weight", "layers.{i}.self_attn.v_proj.weight"),
        ("encoder.layers.{i}.self_att.self_attention.attention_out.weight", "layers.{i}.self_attn.o_proj.weight"),
        ("encoder.layers.{i}.ffn.layernorm_before_ffn.weight", "layers.{i}.post_attention_layernorm.weight"),
        ("encoder.layers.{i}.ffn.ffn.w_in.w_0.weight", "layers.{i}.mlp.gate_proj.weight"),
        ("encoder.layers.{i}.ffn.ffn.w_in.w_1.weight", "layers.{i}.mlp.up_proj.weight"),
        ("encoder.layers.{i}.ffn.ffn.w_out.weight", "layers.{i}.mlp.down_proj.weight"),
    ]
)
"""Original CPM-Bee (``CPMBeeTorch``) names → ours inside ``CpmBeeModel``. Shapes are identical."""

CPMBEE_ANCHOR_KEY = "input_embedding.weight"
"""An original key every CPM-Bee checkpoint has; where it sits tells the prefix (``""``, ``"llm."``...)."""


def map_cpmbee_key(key: str, prefix: str = "", hf_prefix: str = "model.") -> str | None:
    """Our name for an original CPM-Bee key.

    Args:
        key: the original key, e.g. ``"llm.encoder.layers.0.ffn.ffn.w_out.weight"``.
        prefix: the prefix of the language model in the original checkpoint (``""`` for a CPM-Bee
            checkpoint, ``"llm."`` for VisCPM-Chat / Paint).
        hf_prefix: the prefix of ``CpmBeeModel`` in the target model (``"model."`` for
            ``CpmBeeForCausalLM``, ``""`` for ``CpmBeeModel``).

    Returns:
        The new key, or None if ``key`` does not start with ``prefix`` or is not a CPM-Bee key.
    """
    return CPMBEE_KEYS.to_hf(key, prefix, hf_prefix)


def detect_prefix(keys: Iterable[str], anchor: str = CPMBEE_ANCHOR_KEY, source: str = "checkpoint") -> str:
    """Find the prefix under which the model sits, from where the ``anchor`` key is.

    Prefers no prefix, then the shortest one (``"llm."`` in VisCPM checkpoints, ``"module."`` in
    some training checkpoints).

    Raises:
        ConversionError: no key ends with ``anchor``.
    """
    keys = list(keys)
    prefixes = sorted({key[: -len(anchor)] for key in keys if key == anchor or key.endswith("." + anchor)}, key=len)
    if not prefixes:
        raise ConversionError(
            f"{source} holds no CPM-Bee weights (no key ending in {anchor!r}; it has e.g. {shorten(keys, 3)})"
        )
    return prefixes[0]


def convert_cpmbee_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "", hf_prefix: str = "model."
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an original CPM-Bee state dict to our names (tensors are not copied).

    Returns:
        ``(converted, unmapped)``: the renamed tensors, and the original keys that were not
        CPM-Bee keys under ``prefix`` (for a Chat/Paint checkpoint, the vision/diffusion parts).
    """
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        new_key = map_cpmbee_key(key, prefix, hf_prefix)
        if new_key is None:
            unmapped.append(key)
        else:
            converted[new_key] = tensor
    return converted, unmapped


def cpmbee_original_name(hf_key: str, prefix: str, hf_prefix: str) -> str:
    """The original key of one of our CPM-Bee keys (for messages); other keys come back as they are."""
    return CPMBEE_KEYS.to_original(hf_key, prefix, hf_prefix) or hf_key


ORIGINAL_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "dim_model": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "dim_head": "head_dim",
    "dim_ff": "intermediate_size",
    "position_bias_num_buckets": "position_bias_num_buckets",
    "position_bias_num_segment_buckets": "position_bias_num_segment_buckets",
    "position_bias_max_distance": "position_bias_max_distance",
    "eps": "rms_norm_eps",
}
"""Original CPM-Bee JSON config keys → ours; ``dropout_p``, ``half`` and ``mask_modules`` are read apart."""


def cpmbee_config_from_original(original: Mapping) -> CpmBeeConfig:
    """A :class:`CpmBeeConfig` from the original JSON config (``dim_model``, ``num_layers``, ``half``, ...).

    Missing keys take the 10B values. ``half`` says whether the original ran its embedding rotation in float16.

    Raises:
        ValueError: unknown keys, or masked (removed) attention/FFN modules, which the port does not support.
    """
    unknown = sorted(set(original) - set(ORIGINAL_CONFIG_KEYS) - {"dropout_p", "half", "mask_modules"})
    if unknown:
        raise ValueError(f"not a CPM-Bee config: unknown keys {unknown}")
    if any(any(pair) for pair in original.get("mask_modules") or ()):
        raise ValueError("configs with masked (removed) attention/FFN modules are not supported")
    values = {ours: original[key] for key, ours in ORIGINAL_CONFIG_KEYS.items() if key in original}
    return CpmBeeConfig(
        **values,
        dropout=original.get("dropout_p", 0.0) or 0.0,
        rotary_dtype="float16" if original.get("half", True) else "float32",
    )


def load_cpmbee_config(config: CpmBeeConfig | str | os.PathLike | Mapping | None = None) -> CpmBeeConfig:
    """A :class:`CpmBeeConfig` (see :func:`load_config`): nothing is the 10B model; a dict or file may be the
    original config (``dim_model``, ``num_layers``, ``half``...) or one of ours (``"model_type": "cpmbee"``)."""
    return load_config(CpmBeeConfig, config, "config", "the original CPM-Bee config JSON file",
                       cpmbee_config_from_original, sizes={ours: key for key, ours in ORIGINAL_CONFIG_KEYS.items()})


def load_tokenizer(vocab_file: str | os.PathLike, config: CpmBeeConfig) -> modeling.CpmBeeTokenizer:
    path = require_file(vocab_file, "vocabulary", "pass the CPM-Bee vocabulary (bee.txt) with --vocab-file")
    try:
        tokenizer = modeling.CpmBeeTokenizer(str(path))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConversionError(
            f"cannot read vocabulary {path}: {first_line(error)}; pass the CPM-Bee vocabulary (bee.txt) with --vocab-file"
        ) from None
    # CPM-Bee's special tokens sit at fixed ids in its vocabulary file (the tokenizer would add missing ones elsewhere).
    specials = {"<pad>": config.pad_token_id, "<unk>": config.unk_token_id, "<s>": config.bos_token_id,
                "</s>": config.eos_token_id}
    missing = [f"{token} at id {index}" for token, index in specials.items() if tokenizer.encoder.get(token) != index]
    if missing:
        raise ConversionError(
            f"cannot read vocabulary {path}: it is not a CPM-Bee vocabulary (no {', '.join(missing)}); pass the CPM-Bee "
            "vocabulary (bee.txt) with --vocab-file"
        )
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size != config.vocab_size:
        raise ConversionError(
            f"vocabulary {path} has {size} tokens but the config says vocab_size={config.vocab_size}; "
            "pass the vocabulary that belongs to this checkpoint"
        )
    return tokenizer


CPMBEE_SHAPE_SIZES = (
    ("vocab_size", "embed_tokens.weight", 2, 0),
    ("hidden_size", "embed_tokens.weight", 2, 1),
    ("num_hidden_layers", "layers.", None, None),
    ("intermediate_size", "layers.0.mlp.gate_proj.weight", 2, 0),
    ("num_attention_heads", "position_bias.weight", 2, 1),
)
"""Where our weights' shapes show the config's sizes (see :func:`~viscpm.conversion.common.sizes_from_shapes`)."""


def cpmbee_config_differences(
    converted: Mapping[str, torch.Tensor], config: CpmBeeConfig, hf_prefix: str = "model.", label: str = ""
) -> str:
    """What the checkpoint's shapes say about the config, where that differs from ``config`` (see
    :func:`~viscpm.conversion.common.config_differences`); ``hf_prefix`` is where ``CpmBeeModel`` sits.

    Only the sizes that shapes determine are read: vocabulary, width, depth, FFN width and heads.
    """
    found = sizes_from_shapes(converted, CPMBEE_SHAPE_SIZES, hf_prefix)
    return config_differences(found, {name: getattr(config, name) for name in found}, label)


def convert_cpmbee_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config: CpmBeeConfig | str | os.PathLike | Mapping | None = None,
    vocab_file: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    prefix: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Convert an original CPM-Bee checkpoint into a ``CpmBeeForCausalLM`` folder.

    Args:
        checkpoint: the original ``.pt`` file (a CPM-Bee state dict, or one whose CPM-Bee part is
            under a prefix such as ``llm.``, with nothing else in it).
        output_dir: the folder to create; it appears only once complete.
        config: the model config (see :func:`load_cpmbee_config`); None is the 10B model.
        vocab_file: the vocabulary (``bee.txt``); when given, the tokenizer is saved too.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; None keeps the checkpoint's dtype.
        overwrite: replace a non-empty ``output_dir`` (only after the new folder is complete).
        prefix: the prefix of the CPM-Bee keys; None finds it (``""``, ``"llm."``, ...).

    Returns:
        ``output_dir`` as a Path.

    Raises:
        ConversionError: anything wrong with the inputs, checked before the output is written.
    """
    cfg = load_cpmbee_config(config)
    target_dtype = parse_dtype(dtype)
    inputs = (checkpoint, config, vocab_file)
    check_output_dir(output_dir, overwrite, inputs)
    tokenizer = load_tokenizer(vocab_file, cfg) if vocab_file is not None else None

    source = str(checkpoint)
    original = load_original_checkpoint(checkpoint)
    if prefix is None:
        prefix = detect_prefix(original, source=source)
    converted, unmapped = convert_cpmbee_state_dict(original, prefix)
    if unmapped and not converted:
        raise ConversionError(f"{source} holds no CPM-Bee weights under the prefix {prefix!r}")

    hint = "pass the original config of this checkpoint with --config" if config is None else (
        "pass the config that belongs to this checkpoint"
    )

    def describe(key):
        return cpmbee_original_name(key, prefix, "model.")

    model = check_converted(converted, modeling.CpmBeeForCausalLM, cfg, source=source, unexpected=unmapped,
                            describe=describe, differences=cpmbee_config_differences(converted, cfg), hint=hint)
    return write_model_folder(output_dir, converted, cfg, model, overwrite=overwrite, inputs=inputs,
                              dtype=target_dtype, tokenizer=tokenizer, max_shard_size=max_shard_size,
                              progress=progress, describe=describe)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return converter_parser(
        prog,
        "Convert an original CPM-Bee checkpoint (torch.save state dict) into a Hugging Face folder.",
        "the original checkpoint (.pt); keys may sit under 'llm.'",
        {"--config": dict(help="the original config JSON (dim_model, num_layers, ...) or one of ours; default: the "
                               "10B model")},
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)  # exits 2 on usage errors
    return run_converter(convert_cpmbee_checkpoint, args, config=args.config)


if __name__ == "__main__":
    sys.exit(main())
