#!/usr/bin/env python
"""Seconds per image of our `VisCPMPaintPipeline` against the original VisCPM-Paint, on one small random config,
with the speed recipes each measured against our plain path in the same run, printed as a table.

Both sides get the same weights (the original's random tiny-ish model is converted with our converter) and the
same generator, so they also draw the same image: the largest pixel difference from our plain path is printed as
a check (a recipe that keeps the sampler must stay within float tolerance). Rows, each timed end to end:

* ``original`` and ``ours`` (the plain path);
* one row per recipe asked for: ``--channels-last`` (UNet and VAE), ``--fuse-qkv`` (`pipe.fuse_qkv_projections()`),
  ``--compile`` (`torch.compile` of the UNet, ``fullgraph=True``, ``--compile-mode``), ``--prompt-cache``
  (`pipe.enable_prompt_cache()`: every timed call repeats the prompt), ``--scheduler dpm`` (DPM-Solver++ with
  ``--dpm-steps`` steps instead of the original's DDPM; another sampler, so no pixel check);
* ``all`` when more than one recipe is asked for: all of them together.

`with_recipes` (importable) builds such a variant of a pipeline. The time of each part is measured with forward
hooks (``perf_counter``, synchronised on CUDA): the text encoder is CPM-Bee plus the bridge, the UNet counts every
denoising step, the VAE is the decode; "other" is the rest (scheduler, tokenisation, post-processing). Every row
runs once untimed first ("1st call": compilation, cache filling), then ``--repeats`` times, the rows alternating;
the best repeat is shown.

This is a measurement script, not a test: nothing here asserts on timing.

    cd /work/main && /work/venv/bin/python benchmarks/bench_paint.py
    ... --size 128 --steps 20 --dim 256 --layers 4 --images 2 --device cpu
    ... --channels-last --fuse-qkv --compile --prompt-cache --scheduler dpm --dpm-steps 10
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
DEFAULT_THREADS = torch.get_num_threads()  # the original package sets 1 thread on import; restore it below

PROMPT = "一只可爱的橘猫坐在窗台上，阳光明媚, a cute cat by the window"


class PartTimer:
    """Accumulates wall time spent inside the forward of some modules (via hooks)."""

    def __init__(self, device):
        self.device = device
        self.totals = {}
        self._start = {}
        self._handles = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def watch(self, name, module, method=None):
        if method is None:
            self._handles.append(module.register_forward_pre_hook(lambda *_: self._begin(name)))
            self._handles.append(module.register_forward_hook(lambda *_: self._end(name)))
            return
        original = getattr(module, method)

        def wrapped(*args, **kwargs):
            self._begin(name)
            try:
                return original(*args, **kwargs)
            finally:
                self._end(name)

        setattr(module, method, wrapped)

    def _begin(self, name):
        self._sync()
        self._start[name] = time.perf_counter()

    def _end(self, name):
        self._sync()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - self._start.pop(name)

    def reset(self):
        self.totals = {}


def build(args, workdir):
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
    from oracle import TINY_ORIGINAL_CONFIG, VOCAB_FILE, build_original_cpmbee, build_original_paint, original_paint_state_dict

    from viscpm.conversion.convert_viscpm_paint import convert_viscpm_paint_checkpoint
    from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    torch.manual_seed(args.seed)
    cross = 64
    unet = UNet2DConditionModel(
        sample_size=args.size // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=args.size,
    ).eval()
    scheduler_config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True)
    llm_config = {**TINY_ORIGINAL_CONFIG, "dim_model": args.dim, "num_layers": args.layers, "dim_head": 64,
                  "num_heads": args.dim // 64, "dim_ff": args.dim * 5 // 2}
    sd_base = workdir / "sd-base"
    vae.save_pretrained(sd_base / "vae")
    PNDMScheduler.from_config(scheduler_config).save_pretrained(sd_base / "scheduler")
    unet.save_config(sd_base / "unet")
    llm = build_original_cpmbee(seed=args.seed, **{k: v for k, v in llm_config.items() if k in TINY_ORIGINAL_CONFIG})
    original = build_original_paint(llm, copy.deepcopy(unet), copy.deepcopy(vae),
                                    DDPMScheduler.from_pretrained(sd_base, subfolder="scheduler"))
    torch.save(original_paint_state_dict(original), workdir / "paint.pt")
    (workdir / "llm.json").write_text(json.dumps(llm_config))
    convert_viscpm_paint_checkpoint(workdir / "paint.pt", workdir / "hf", llm_config=workdir / "llm.json",
                                    sd_base=sd_base, vocab_file=VOCAB_FILE, progress=False)
    ours = VisCPMPaintPipeline.from_pretrained(workdir / "hf")
    ours.set_progress_bar_config(disable=True)
    return original, ours


def with_recipes(pipe, channels_last=False, fuse_qkv=False, compile=False, compile_mode=None, scheduler="default",
                 prompt_cache=False):
    """A variant of ``pipe`` with the given speed recipes, on its own copies of the UNet and VAE (the recipes change
    them in place); the text encoder and the rest are shared. Order as diffusers advises: fuse, re-lay, compile."""
    from diffusers import DPMSolverMultistepScheduler

    from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    parts = dict(pipe.components, unet=copy.deepcopy(pipe.unet), vae=copy.deepcopy(pipe.vae))
    if scheduler == "dpm":
        parts["scheduler"] = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "default":
        raise ValueError(f"scheduler must be 'default' or 'dpm', got {scheduler!r}")
    variant = VisCPMPaintPipeline(**parts)
    variant.set_progress_bar_config(disable=True)
    if fuse_qkv:
        variant.fuse_qkv_projections()
    if channels_last:
        variant.unet.to(memory_format=torch.channels_last)
        variant.vae.to(memory_format=torch.channels_last)
    if compile:
        variant.unet = torch.compile(variant.unet, mode=compile_mode, fullgraph=True)
    if prompt_cache:
        variant.enable_prompt_cache()
    return variant


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--dim", type=int, default=256, help="CPM-Bee width")
    parser.add_argument("--layers", type=int, default=4, help="CPM-Bee layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="our pipeline's dtype (the original runs in float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    recipes = parser.add_argument_group("recipes (each adds a row measured against the plain path)")
    recipes.add_argument("--channels-last", action="store_true", help="channels_last UNet and VAE")
    recipes.add_argument("--fuse-qkv", action="store_true", help="pipe.fuse_qkv_projections() (UNet and VAE)")
    recipes.add_argument("--compile", action="store_true", help="torch.compile(pipe.unet, fullgraph=True)")
    recipes.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune)")
    recipes.add_argument("--prompt-cache", action="store_true", help="pipe.enable_prompt_cache()")
    recipes.add_argument("--scheduler", default="default", choices=["default", "dpm"],
                         help="dpm: a DPM-Solver++ row (--dpm-steps steps)")
    recipes.add_argument("--dpm-steps", type=int, default=None, help="steps of the dpm row (default: --steps)")
    args = parser.parse_args()

    import oracle  # noqa: F401  (imports the original, which changes the thread count)

    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        original, ours = build(args, Path(tmp))
    original.device = device
    original.model.to(device)
    ours.to(device)
    if args.dtype != "float32":
        ours.to(dtype=getattr(torch, args.dtype))

    from oracle import original_paint_inputs

    def run_theirs():
        # The original's `VisCPMPaint.generate` path (build_input, VLG_CPMBee.generate), minus the PIL grid.
        generator = torch.Generator(device).manual_seed(args.seed)
        data, uncond = original_paint_inputs([PROMPT], [""])
        data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}
        uncond = {k: v.to(device) if torch.is_tensor(v) else v for k, v in uncond.items()}
        return original.model.generate(data, uncond, num_images_per_prompt=args.images, num_inference_steps=args.steps,
                                       height=args.size, width=args.size, generator=generator, output_type="np").images

    def runner(pipe, steps):
        def run():
            generator = torch.Generator(device).manual_seed(args.seed)
            return pipe(PROMPT, num_images_per_prompt=args.images, num_inference_steps=steps, height=args.size,
                        width=args.size, generator=generator, output_type="np").images
        return run

    dpm_steps = args.dpm_steps or args.steps
    chosen = {name: value for name, value in (
        ("channels_last", args.channels_last), ("fuse_qkv", args.fuse_qkv), ("compile", args.compile),
        ("prompt_cache", args.prompt_cache), ("scheduler", "dpm" if args.scheduler == "dpm" else None)) if value}
    rows = {"original": (run_theirs, original.llm, original.sd.trans_block, original.sd.unet, original.sd.vae),
            "ours": (runner(ours, args.steps), ours.text_encoder, None, ours.unet, ours.vae)}
    variants = {(f"dpm {dpm_steps} steps" if name == "scheduler" else name): {name: value}
                for name, value in chosen.items()}
    if len(chosen) > 1:
        variants["all"] = chosen
    for name, options in variants.items():
        variant = with_recipes(ours, compile_mode=args.compile_mode, **options)
        steps = dpm_steps if "scheduler" in options else args.steps
        rows[name] = (runner(variant, steps), variant.text_encoder, None, variant.unet, variant.vae)

    timers = {}
    for name, (_, text_encoder, bridge, unet, vae) in rows.items():
        timer = timers[name] = PartTimer(device)
        timer.watch("text encoder", text_encoder)
        if bridge is not None:
            timer.watch("text encoder", bridge)
        timer.watch("unet", unet)
        timer.watch("vae", vae, "decode")

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    first = {name: timed(row[0])[1] for name, row in rows.items()}  # warm-up: compilation, cache filling
    results, images = {}, {}
    for _ in range(args.repeats):
        for name, row in rows.items():  # alternate the rows, so that load bursts hit them alike
            timers[name].reset()
            images[name], total = timed(row[0])
            if name not in results or total < results[name][0]:
                results[name] = (total, dict(timers[name].totals))

    print(f"VisCPM-Paint, {args.size}px, {args.steps} steps, {args.images} images, CPM-Bee {args.dim}x{args.layers}, "
          f"device {device}, ours in {args.dtype}, threads {torch.get_num_threads()}, best of {args.repeats}")
    header = (f"{'':16} {'s/image':>9} {'x orig':>7} {'x ours':>7} {'text enc':>9} {'unet':>7} {'vae':>7} "
              f"{'other':>7} {'max diff':>9} {'1st call':>9}")
    print(header)
    print("-" * len(header))
    for name, (total, parts) in results.items():
        shares = [parts.get(part, 0.0) / total for part in ("text encoder", "unet", "vae")]
        if name == "original":
            diff = f"{abs(images['original'] - images['ours']).max():9.1e}"
        elif name == "ours" or "scheduler" in variants.get(name, {}):
            diff = f"{'-':>9}"
        else:
            diff = f"{abs(images[name] - images['ours']).max():9.1e}"
        print(f"{name:16} {total / args.images:9.4f} {results['original'][0] / total:7.2f} "
              f"{results['ours'][0] / total:7.2f} {100 * shares[0]:8.1f}% {100 * shares[1]:6.1f}% "
              f"{100 * shares[2]:6.1f}% {100 * (1 - sum(shares)):6.1f}% {diff} {first[name]:8.2f}s")
    print("\nx orig / x ours: speed-up over the original / our plain path; max diff: largest pixel difference from "
          "our plain path\n(- : the plain path itself, or another sampler); 1st call: the untimed warm-up call.")
    print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
