#!/usr/bin/env python
"""Convert an original VisCPM-Paint checkpoint into a diffusers pipeline folder.

    python conversion/convert_viscpm_paint.py --checkpoint viscpm_paint_zhplus_checkpoint.pt --output-dir viscpm-paint \\
        [--llm-config cpm-bee-10b.json] [--sd-base stabilityai/stable-diffusion-2-1-base] [--vocab-file bee.txt] \\
        [--dtype float16] [--overwrite]

``trans_block.*``, ``unet.*`` and ``llm.*`` come from the checkpoint; the VAE, the scheduler and the UNet
config from ``--sd-base`` (a Hub repo id or a local folder with ``vae/``, ``scheduler/``, ``unet/config.json``).
The folder then loads with ``VisCPMPaintPipeline.from_pretrained`` or ``viscpm.VisCPMPaint.from_pretrained``.
The checkpoint is read with ``weights_only=True`` and memory-mapped; the output appears only once complete.

A Paint checkpoint (``viscpm_paint_balance_checkpoint.pt``, ``viscpm_paint_zhplus_checkpoint.pt``) holds three
parts: ``llm.*`` (CPM-Bee), ``trans_block.*`` (the bridge to the UNet) and ``unet.*`` (a Stable Diffusion 2.1
UNet, diffusers names). The VAE, the scheduler and the UNet's config are not in it: the original takes them
from ``stabilityai/stable-diffusion-2-1-base``, and so does the converter (or from a local folder with
``vae/``, ``scheduler/`` and ``unet/config.json``).

The output folder loads with ``VisCPMPaintPipeline.from_pretrained``::

    model_index.json  text_encoder/  tokenizer/  unet/  vae/  scheduler/

Reading, validating and writing reuse :mod:`viscpm.conversion.common` (safe loading, named key errors, safetensors,
an output folder that appears only once complete). Only :class:`~viscpm.conversion.common.ConversionError` is raised
for problems with the user's input.

Exit status: 0 on success, 1 on a conversion error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from viscpm.conversion.common import (
    DEFAULT_MAX_SHARD_SIZE,
    ConversionError,
    atomic_output_dir,
    check_converted,
    check_output_dir,
    converter_parser,
    expected_parameter_shapes,
    first_line,
    load_original_checkpoint,
    parse_dtype,
    run_converter,
    save_model_folder,
    shorten,
    split_by_prefix,
    validate_state_dict,
    write_safetensors,
)
from viscpm.conversion.convert_cpmbee import (
    convert_cpmbee_state_dict,
    cpmbee_original_name,
    load_cpmbee_config,
    load_tokenizer,
)
from viscpm import modeling  # the model classes load when a conversion runs, not for --help
from viscpm.modeling.configuration_viscpm_paint import VisCPMPaintTextEncoderConfig

__all__ = [
    "DEFAULT_SD_BASE",
    "PAINT_BRIDGE_KEYS",
    "convert_paint_state_dict",
    "convert_viscpm_paint_checkpoint",
    "load_sd_base",
    "main",
]

DEFAULT_SD_BASE = "stabilityai/stable-diffusion-2-1-base"
"""Where the original takes the VAE, the scheduler and the UNet config from."""

PAINT_BRIDGE_KEYS = {
    "trans_block.w_out_res.weight": "projection.weight",
    "trans_block.layernorm.weight": "layer_norm.weight",
    "trans_block.layernorm.bias": "layer_norm.bias",
}
"""Original bridge keys → ours in `VisCPMPaintTextEncoder`."""

_CHAT_PREFIXES = ("vpm.", "mapping.")
_CHAT_KEYS = ("query",)


def _is_chat_key(key: str) -> bool:
    return key.startswith(_CHAT_PREFIXES) or key in _CHAT_KEYS


def convert_paint_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Split and rename an original Paint state dict (tensors are not copied).

    Returns:
        ``(text_encoder, unet, unexpected)``: `VisCPMPaintTextEncoder` keys, `UNet2DConditionModel` keys,
        and the original keys that belong to neither.

    Raises:
        ConversionError: it is a VisCPM-Chat checkpoint, or it lacks one of the three parts.
    """
    chat = [key for key in state_dict if _is_chat_key(key)]
    if chat:
        raise ConversionError(
            f"{source} is a VisCPM-Chat checkpoint (it has {shorten(chat, 3)}), not a VisCPM-Paint one; "
            "convert it with the Chat converter, or pass viscpm_paint_*_checkpoint.pt here"
        )
    llm, rest = split_by_prefix(state_dict, "llm.")
    text_encoder, unexpected = convert_cpmbee_state_dict(llm, prefix="llm.", hf_prefix="model.")
    unet: dict[str, torch.Tensor] = {}
    for key, value in rest.items():
        if key.startswith("unet."):
            unet[key[len("unet."):]] = value
        elif key in PAINT_BRIDGE_KEYS:
            text_encoder[PAINT_BRIDGE_KEYS[key]] = value
        else:
            unexpected.append(key)
    absent = [part for part, present in (
        ("llm.* (CPM-Bee)", any(k.startswith("model.") for k in text_encoder)),
        ("trans_block.* (the text bridge)", "projection.weight" in text_encoder),
        ("unet.* (the UNet)", bool(unet)),
    ) if not present]
    if absent:
        raise ConversionError(
            f"{source} is not a VisCPM-Paint checkpoint: it has no {' and no '.join(absent)} weights "
            f"(it has e.g. {shorten(list(state_dict), 3)})"
        )
    return text_encoder, unet, unexpected


def _original_name(key: str) -> str:
    for original, ours in PAINT_BRIDGE_KEYS.items():
        if key == ours:
            return original
    return cpmbee_original_name(key, "llm.", "model.")


def load_sd_base(sd_base: str | os.PathLike = DEFAULT_SD_BASE):
    """The VAE, the scheduler (as the original's `DDPMScheduler`) and the UNet config of ``sd_base``.

    ``sd_base`` is a Hub repo id or a local folder with ``vae/``, ``scheduler/`` and ``unet/config.json``.

    Raises:
        ConversionError: a part is missing or unreadable (naming which one and where).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    local = Path(sd_base)
    if local.exists():
        if not local.is_dir():
            raise ConversionError(f"--sd-base {local} is a file; pass a folder with vae/, scheduler/ and unet/config.json")
        for part in ("vae/config.json", "scheduler/scheduler_config.json", "unet/config.json"):
            if not (local / part).is_file():
                raise ConversionError(
                    f"--sd-base {local} has no {part}; it needs vae/, scheduler/ and unet/config.json "
                    f"(as in {DEFAULT_SD_BASE})"
                )
    elif str(sd_base).startswith((".", "/", "~")) or str(sd_base).count("/") > 1:
        raise ConversionError(f"--sd-base {sd_base} not found (neither a local folder nor a Hub repo id)")

    def load(what, fn):
        try:
            return fn()
        except Exception as error:  # diffusers reports missing files / offline Hub / bad JSON in many ways
            raise ConversionError(f"cannot load the {what} from --sd-base {sd_base}: {first_line(error)[:300]}") from None

    vae = load("VAE", lambda: AutoencoderKL.from_pretrained(sd_base, subfolder="vae"))
    scheduler = load("scheduler", lambda: DDPMScheduler.from_pretrained(sd_base, subfolder="scheduler"))
    unet_config = load("UNet config", lambda: UNet2DConditionModel.load_config(sd_base, subfolder="unet"))
    return vae, scheduler, unet_config


def _model_index() -> dict:
    """The pipeline's components. `viscpm.VisCPMPaint`'s prompt checker and ranker are not written: it fetches the
    original's when a folder lists none (see viscpm/paint.py for how a folder holds them)."""
    import diffusers

    return {
        "_class_name": "VisCPMPaintPipeline",
        "_diffusers_version": diffusers.__version__,
        "text_encoder": ["viscpm.modeling.modeling_viscpm_paint", "VisCPMPaintTextEncoder"],
        "tokenizer": ["viscpm.modeling.tokenization_cpmbee", "CpmBeeTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }


def convert_viscpm_paint_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    llm_config=None,
    sd_base: str | os.PathLike = DEFAULT_SD_BASE,
    vocab_file: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Convert an original VisCPM-Paint checkpoint into a `VisCPMPaintPipeline` folder.

    Args:
        checkpoint: the original ``.pt`` file (``llm.*``, ``trans_block.*``, ``unet.*``).
        output_dir: the folder to create; it appears only once complete.
        llm_config: the CPM-Bee config (original JSON, ours, a dict or a `CpmBeeConfig`); None is the 10B model.
        sd_base: Hub repo id or local folder for the VAE, scheduler and UNet config.
        vocab_file: the CPM-Bee vocabulary (``bee.txt``); required, the pipeline needs its tokenizer.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for every part; None keeps the checkpoint's
            dtype (and the VAE's own).

    Raises:
        ConversionError: anything wrong with the inputs, checked before the output is written.
    """
    from diffusers import UNet2DConditionModel

    if vocab_file is None:
        raise ConversionError("no vocabulary given: pass --vocab-file bee.txt (the CPM-Bee vocabulary)")
    text_config = load_cpmbee_config(llm_config)
    target_dtype = parse_dtype(dtype)
    inputs = (checkpoint, llm_config, sd_base, vocab_file)
    check_output_dir(output_dir, overwrite, inputs)
    tokenizer = load_tokenizer(vocab_file, text_config)
    vae, scheduler, unet_config = load_sd_base(sd_base)

    source = str(checkpoint)
    original = load_original_checkpoint(checkpoint)
    text_state, unet_state, unexpected = convert_paint_state_dict(original, source)

    projection = text_state["projection.weight"]
    config = VisCPMPaintTextEncoderConfig(text_config=text_config, projection_dim=int(projection.shape[0]))
    cross = unet_config.get("cross_attention_dim")
    if cross is not None and cross != config.projection_dim:
        raise ConversionError(
            f"{source}: the text bridge outputs {config.projection_dim} features but the UNet config from "
            f"--sd-base {sd_base} has cross_attention_dim={cross}; pass the Stable Diffusion base it was trained on"
        )
    hint = "pass the CPM-Bee config of this checkpoint with --llm-config" if llm_config is None else (
        "pass the CPM-Bee config that belongs to this checkpoint")
    check_converted(text_state, modeling.VisCPMPaintTextEncoder, config, source=source, unexpected=unexpected,
                    describe=_original_name, hint=hint)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
    except Exception as error:
        raise ConversionError(f"the UNet config from --sd-base {sd_base} is invalid: {first_line(error)}") from None
    validate_state_dict(
        unet_state,
        expected_parameter_shapes(unet),
        describe=lambda key: "unet." + key,
        source=source,
        summary=f"UNet config from --sd-base {sd_base}",
        hint="pass the Stable Diffusion base this checkpoint was trained on with --sd-base",
    )

    with atomic_output_dir(output_dir, overwrite, inputs) as tmp:
        (tmp / "text_encoder").mkdir()
        save_model_folder(tmp / "text_encoder", text_state, config, modeling.VisCPMPaintTextEncoder, dtype=target_dtype,
                          max_shard_size=max_shard_size, progress=progress, describe=_original_name)
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "unet").mkdir()
        write_safetensors(unet_state, tmp / "unet", dtype=target_dtype, max_shard_size=max_shard_size,
                          weights_name="diffusion_pytorch_model.safetensors", progress=progress,
                          describe=lambda key: "unet." + key)
        unet.save_config(tmp / "unet")
        if target_dtype is not None:
            vae = vae.to(target_dtype)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n", encoding="utf-8")
    return Path(output_dir)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return converter_parser(
        prog,
        "Convert an original VisCPM-Paint checkpoint into a diffusers pipeline folder.",
        "the original checkpoint (viscpm_paint_*_checkpoint.pt)",
        {
            "--llm-config": dict(help="the original CPM-Bee config JSON or one of ours; default: CPM-Bee 10B"),
            "--sd-base": dict(default=DEFAULT_SD_BASE, help="Hub repo or local folder with vae/, scheduler/, "
                                                            f"unet/config.json (default: {DEFAULT_SD_BASE})"),
        },
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)  # exits 2 on usage errors
    return run_converter(convert_viscpm_paint_checkpoint, args, llm_config=args.llm_config, sd_base=args.sd_base)


if __name__ == "__main__":
    sys.exit(main())
