"""`viscpm demo`: the whole path, offline, on tiny models with RANDOM weights.

1. Build a tiny VisCPM-Chat and a tiny VisCPM-Paint and save them as checkpoints in the ORIGINAL format
   (``torch.save`` of a state dict with the original key names, the configs as the original JSON files, and a
   tiny local "Stable Diffusion base" folder for Paint's VAE, scheduler and UNet config).
2. Convert them with the real converters (`convert_viscpm_chat_checkpoint`, `convert_viscpm_paint_checkpoint`),
   exactly as `viscpm convert chat/paint` does.
3. Load the converted folders like any user does, paint a picture, and chat about it (two turns).

How the checkpoints are made, and why: the weights are drawn by our own classes and written under the original
names by inverting the converters' key maps (`convert_cpmbee.CPMBEE_KEYS`, `convert_viscpm_chat.VISION_KEYS`,
`convert_viscpm_paint.PAINT_BRIDGE_KEYS`), plus the keys the original has that we drop (BEiT-3's MIM head, text
embedding and mask token). That needs nothing but this package and the CPM-Bee vocabulary, so the demo runs on
a fresh machine. Building them with the original implementation would need its whole stack (torchscale,
fairscale, timm and the old releases it pins), which is a test-only dependency here. The files are laid out
as the original's are, but they are not the original code's output: that the converted models compute what the
original computes is what the test suite checks against the original; the demo shows that the user's path --
files, converter, loading, generation -- works end to end. The answers and the picture are noise.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from viscpm.chat import ChatSession
from viscpm.conversion.common import ConversionError, default_vocab_file
from viscpm.conversion.convert_cpmbee import CPMBEE_KEYS, load_cpmbee_config
from viscpm.conversion.convert_viscpm_chat import VISION_KEYS, build_chat_config, convert_viscpm_chat_checkpoint
from viscpm.conversion.convert_viscpm_paint import PAINT_BRIDGE_KEYS, convert_viscpm_paint_checkpoint
from viscpm.modeling import (
    CpmBeeTokenizer,
    VisCPMChatForConditionalGeneration,
    VisCPMPaintTextEncoder,
    VisCPMPaintTextEncoderConfig,
)

from .common import AppError, atomic_files, check_model, load_chat, load_paint, paint_images, resolve_device

__all__ = ["TINY_LLM_CONFIG", "TINY_VISION_CONFIG", "build_tiny_chat_checkpoint", "build_tiny_models",
           "build_tiny_paint_checkpoint", "original_chat_state_dict", "original_paint_state_dict", "run_demo"]

TINY_LLM_CONFIG = dict(  # the original CPM-Bee JSON keys; vocab_size is set from the vocabulary
    dim_model=64, num_heads=4, dim_head=16, dim_ff=128, num_layers=2, dropout_p=0.0, position_bias_num_buckets=32,
    position_bias_num_segment_buckets=32, position_bias_max_distance=128, eps=1e-6, half=False,
)
TINY_VISION_CONFIG = dict(  # torchscale EncoderConfig keys
    encoder_embed_dim=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_embed_dim=64, img_size=32,
    patch_size=8, vocab_size=64,
)
TINY_QUERY_NUM = 8
TINY_PAINT_SIZE = 64  # pixels; the tiny VAE halves it for the UNet
TINY_CROSS_DIM = 32
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, clip_sample=False)
"""Stable Diffusion 2.1 base's noise schedule (the original loads it as a `DDPMScheduler`)."""

DEFAULT_PROMPT = "海边的灯塔，油画风格"
DEFAULT_QUESTION = "这幅画里有什么？"
FOLLOW_UP = "What colours does it use?"
MARKER = ".viscpm-demo"
RANDOM_NOTE = ("The weights are RANDOM: the answers and the picture are noise. What the demo shows is that the "
               "whole path works: original-format files -> the real converters -> loading -> chat and paint.")


def _invert(mapping_fn, key: str) -> str:
    original = mapping_fn(key)
    if original is None:
        raise RuntimeError(f"no original name for {key}; the demo's key maps are out of date")
    return original


def original_chat_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of a `VisCPMChatForConditionalGeneration` under the original `VLU_CPMBee` names."""

    state = {}
    for name, tensor in model.state_dict().items():
        if name in ("query",) or name.startswith("mapping."):
            state[name] = tensor
        elif name.startswith("vision_model."):
            state["vpm.beit3." + _invert(VISION_KEYS.to_original, name[len("vision_model."):])] = tensor
        elif name.startswith("language_model.model."):
            state["llm." + _invert(CPMBEE_KEYS.to_original, name[len("language_model.model."):])] = tensor
        elif name.startswith("language_model.lm_head."):
            continue  # tied to the input embedding, as in the original (which has no separate head)
        else:
            raise RuntimeError(f"no original name for {name}; the demo's key maps are out of date")
    # What the original's checkpoints carry besides: BEiT-3's pre-training parts, which the converter drops.
    vision = model.config.vision_config
    generator = torch.Generator().manual_seed(0)
    state["vpm.beit3.text_embed.weight"] = torch.randn(TINY_VISION_CONFIG["vocab_size"], vision.hidden_size,
                                                       generator=generator)
    state["vpm.beit3.vision_embed.mask_token"] = torch.zeros(1, 1, vision.hidden_size)
    state["vpm.mim_head.weight"] = torch.randn(TINY_VISION_CONFIG["vocab_size"], vision.hidden_size,
                                               generator=generator)
    state["vpm.mim_head.bias"] = torch.zeros(TINY_VISION_CONFIG["vocab_size"])
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def original_paint_state_dict(text_encoder, unet) -> dict[str, torch.Tensor]:
    """A `VisCPMPaintTextEncoder` and a UNet under the original `VisCPMPaint` checkpoint names."""

    bridge = {ours: original for original, ours in PAINT_BRIDGE_KEYS.items()}
    state = {}
    for name, tensor in text_encoder.state_dict().items():
        if name in bridge:
            state[bridge[name]] = tensor
        elif name.startswith("model."):
            state["llm." + _invert(CPMBEE_KEYS.to_original, name[len("model."):])] = tensor
        else:
            raise RuntimeError(f"no original name for {name}; the demo's key maps are out of date")
    state.update({f"unet.{name}": tensor for name, tensor in unet.state_dict().items()})
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def _llm_config(vocab_size: int) -> dict:
    return {**TINY_LLM_CONFIG, "vocab_size": vocab_size}


def build_tiny_chat_checkpoint(folder: Path, vocab_size: int, seed: int = 0, llm_overrides: dict | None = None,
                               vision_overrides: dict | None = None, query_num: int = TINY_QUERY_NUM
                               ) -> dict[str, Path]:
    """Write ``viscpm_chat_tiny.pt`` (original format, random weights), ``llm.json`` and ``vision.json``; the
    overrides (original config keys) make a larger model of the same kind, e.g. for benchmarks."""

    llm = {**_llm_config(vocab_size), **(llm_overrides or {})}
    vision = {**TINY_VISION_CONFIG, **(vision_overrides or {})}
    config = build_chat_config(llm, vision, query_num)
    torch.manual_seed(seed)
    model = VisCPMChatForConditionalGeneration(config).eval()
    files = {"checkpoint": folder / "viscpm_chat_tiny.pt", "llm_config": folder / "llm.json",
             "vision_config": folder / "vision.json"}
    torch.save(original_chat_state_dict(model), files["checkpoint"])
    files["llm_config"].write_text(json.dumps(llm, indent=2) + "\n", encoding="utf-8")
    files["vision_config"].write_text(json.dumps(vision, indent=2) + "\n", encoding="utf-8")
    return files


def build_tiny_paint_checkpoint(folder: Path, vocab_size: int, seed: int = 0) -> dict[str, Path]:
    """Write ``viscpm_paint_tiny.pt`` (original format, random weights), ``llm.json`` and ``sd-base/`` (a tiny
    VAE, the SD-2.1 noise schedule and the UNet config, as ``--sd-base`` expects)."""


    llm = _llm_config(vocab_size)
    torch.manual_seed(seed)
    text_encoder = VisCPMPaintTextEncoder(VisCPMPaintTextEncoderConfig(
        text_config=load_cpmbee_config(llm), projection_dim=TINY_CROSS_DIM)).eval()
    unet = UNet2DConditionModel(
        sample_size=TINY_PAINT_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TINY_CROSS_DIM,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=TINY_PAINT_SIZE,
    ).eval()
    files = {"checkpoint": folder / "viscpm_paint_tiny.pt", "llm_config": folder / "llm.json",
             "sd_base": folder / "sd-base"}
    torch.save(original_paint_state_dict(text_encoder, unet), files["checkpoint"])
    files["llm_config"].write_text(json.dumps(llm, indent=2) + "\n", encoding="utf-8")
    vae.save_pretrained(files["sd_base"] / "vae")
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(files["sd_base"] / "scheduler")
    unet.save_config(files["sd_base"] / "unet")
    return files


def find_vocab(vocab_file: str | None) -> str:
    """The CPM-Bee vocabulary: ``vocab_file``, or the installed original package's ``bee.txt``."""

    if vocab_file is not None:
        if not Path(vocab_file).is_file():
            raise AppError(f"vocabulary {vocab_file} not found; pass the CPM-Bee bee.txt")
        return vocab_file
    found = default_vocab_file()
    if found is None:
        raise AppError("no CPM-Bee vocabulary: pass --vocab-file bee.txt, or install the original package, which "
                       "ships it (pip install --no-deps VisCPM==0.0.1.dev0)")
    return found


def build_tiny_models(output_dir: str | Path, vocab_file: str | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Build the tiny original-format checkpoints under ``output_dir/original`` and convert them with the real
    converters into ``output_dir/viscpm-chat-tiny`` and ``output_dir/viscpm-paint-tiny``; returns the two."""

    output_dir = Path(output_dir)
    vocab = find_vocab(vocab_file)
    vocab_size = CpmBeeTokenizer(vocab).vocab_size
    original = output_dir / "original"
    (original / "chat").mkdir(parents=True, exist_ok=True)
    (original / "paint").mkdir(parents=True, exist_ok=True)
    chat_files = build_tiny_chat_checkpoint(original / "chat", vocab_size, seed)
    paint_files = build_tiny_paint_checkpoint(original / "paint", vocab_size, seed + 1)
    chat_dir, paint_dir = output_dir / "viscpm-chat-tiny", output_dir / "viscpm-paint-tiny"
    try:
        convert_viscpm_chat_checkpoint(
            chat_files["checkpoint"], chat_dir, llm_config=chat_files["llm_config"],
            vision_config=chat_files["vision_config"], query_num=TINY_QUERY_NUM, vocab_file=vocab, overwrite=True,
            progress=False)
        convert_viscpm_paint_checkpoint(
            paint_files["checkpoint"], paint_dir, llm_config=paint_files["llm_config"],
            sd_base=paint_files["sd_base"], vocab_file=vocab, overwrite=True, progress=False)
    except ConversionError as error:
        raise AppError(f"converting the tiny checkpoints failed: {error}") from error
    return chat_dir, paint_dir


def _prepare_output_dir(output_dir: Path) -> None:
    """Use ``output_dir`` if it is new, empty or an earlier demo's (marked); never overwrite anything else."""
    if output_dir.exists():
        if not output_dir.is_dir():
            raise AppError(f"--output-dir {output_dir} is a file; pick a folder")
        if any(output_dir.iterdir()) and not (output_dir / MARKER).is_file():
            raise AppError(f"--output-dir {output_dir} is not empty and not an earlier demo's folder; pick another")
        for stale in ("original",):  # rebuilt below; converted folders are replaced atomically by the converters
            shutil.rmtree(output_dir / stale, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MARKER).write_text("made by `viscpm demo`; the demo may replace this folder's contents\n",
                                     encoding="utf-8")


def run_demo(output_dir: str | Path = "build/viscpm-demo", vocab_file: str | None = None,
             chat_model: str | None = None, paint_model: str | None = None, device: str | None = None,
             seed: int = 0, steps: int = 10, size: int | None = None, question: str | None = None,
             prompt: str | None = None, max_new_tokens: int = 16, out=None) -> dict[str, Path]:
    """Build, convert, paint and chat; print what happens to ``out`` (stdout) and return the files written.

    ``chat_model``/``paint_model`` are converted folders to use instead of the tiny random models.
    """
    out = out or sys.stdout
    output_dir = Path(output_dir)
    for path, kind in ((chat_model, "chat"), (paint_model, "paint")):
        if path is not None:
            check_model(path, kind)
    resolve_device(device)
    _prepare_output_dir(output_dir)
    random_weights = chat_model is None or paint_model is None
    start = time.perf_counter()

    if random_weights:
        print("building tiny VisCPM-Chat and VisCPM-Paint checkpoints with RANDOM weights in the original format, "
              "then converting them with the real converters ...", file=out, flush=True)
        chat_dir, paint_dir = build_tiny_models(output_dir, vocab_file, seed)
        print(f"  original-format checkpoints: {output_dir / 'original'}", file=out)
        print(f"  converted: {chat_dir}  and  {paint_dir}", file=out, flush=True)
    chat_dir = Path(chat_model) if chat_model is not None else chat_dir
    paint_dir = Path(paint_model) if paint_model is not None else paint_dir

    files = {"chat_model": chat_dir, "paint_model": paint_dir}
    prompt = prompt or DEFAULT_PROMPT
    painter = load_paint(str(paint_dir), device=device)
    if size is None and paint_model is None:
        size = TINY_PAINT_SIZE
    print(f"painting {prompt!r} ({steps} steps, seed {seed}) ...", file=out, flush=True)
    images, flagged = paint_images(painter, prompt, steps=steps, seed=seed, size=size)
    files["painting"] = output_dir / "painting.png"
    with atomic_files([files["painting"]]) as (temp,):
        images[0].save(temp, format="PNG")
    note = " (blacked out by the safety checker)" if flagged[0] else ""
    print(f"  wrote {files['painting']} ({images[0].width}x{images[0].height}){note}", file=out, flush=True)
    del painter

    chat = load_chat(str(chat_dir), device=device)
    session = ChatSession(chat, images[0], max_new_tokens=max_new_tokens)
    transcript = []
    for turn in (question or DEFAULT_QUESTION, FOLLOW_UP):
        answer = session.ask(turn)
        transcript.append(f"User: {turn}\nAI: {answer}\n")
        print(f"User: {turn}\nAI: {answer}", file=out, flush=True)
    files["transcript"] = output_dir / "chat.txt"
    header = f"# viscpm demo: a chat about {files['painting'].name}\n"
    if random_weights:
        header += f"# {RANDOM_NOTE}\n"
    with atomic_files([files["transcript"]]) as (temp,):
        temp.write_text(header + "".join(transcript), encoding="utf-8")

    print(f"wrote {files['transcript']}  ({time.perf_counter() - start:.1f} s in all)", file=out)
    if random_weights:
        print(RANDOM_NOTE, file=out)
    print(f"next: viscpm chat {chat_dir} --image {files['painting']} --greedy\n"
          f"      viscpm paint {paint_dir} \"{prompt}\" -o painting2.png"
          + (f" --size {size}" if size else "") + "\n"
          f"      viscpm serve {chat_dir} {paint_dir}", file=out)
    return files
