#!/usr/bin/env python
"""Seconds per image of our `VisCPMPaintPipeline` against the original VisCPM-Paint, on one small random config,
and where the time goes (text encoder, UNet, VAE), printed as a table.

Both sides get the same weights (the original's random tiny-ish model is converted with our converter) and the
same generator, so they also draw the same image: the largest pixel difference is printed as a check. The time
of each part is measured with forward hooks (``perf_counter``, synchronised on CUDA): the text encoder is CPM-Bee
plus the bridge, the UNet counts every denoising step, the VAE is the decode. "other" is the rest (scheduler,
tokenisation, post-processing). Each side runs ``--repeats`` times after one warm-up, the two alternating; the best repeat is shown.

This is a measurement script, not a test: nothing here asserts on timing.

    cd /work/main && /work/venv/bin/python benchmarks/bench_paint.py
    ... --size 128 --steps 20 --dim 256 --layers 4 --images 2 --device cpu
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

    from viscpm.convert_paint import convert_viscpm_paint_checkpoint
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--dim", type=int, default=256, help="CPM-Bee width")
    parser.add_argument("--layers", type=int, default=4, help="CPM-Bee layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import oracle  # noqa: F401  (imports the original, which changes the thread count)

    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        original, ours = build(args, Path(tmp))
    original.device = device
    original.model.to(device)
    ours.to(device)

    from oracle import original_paint_inputs

    timer_theirs, timer_ours = PartTimer(device), PartTimer(device)
    timer_theirs.watch("text encoder", original.llm)
    timer_theirs.watch("text encoder", original.sd.trans_block)
    timer_theirs.watch("unet", original.sd.unet)
    timer_theirs.watch("vae", original.sd.vae, "decode")
    timer_ours.watch("text encoder", ours.text_encoder)
    timer_ours.watch("unet", ours.unet)
    timer_ours.watch("vae", ours.vae, "decode")

    def run_theirs():
        # The original's `VisCPMPaint.generate` path (build_input, VLG_CPMBee.generate), minus the PIL grid.
        generator = torch.Generator(device).manual_seed(args.seed)
        data, uncond = original_paint_inputs([PROMPT], [""])
        data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}
        uncond = {k: v.to(device) if torch.is_tensor(v) else v for k, v in uncond.items()}
        return original.model.generate(data, uncond, num_images_per_prompt=args.images, num_inference_steps=args.steps,
                                       height=args.size, width=args.size, generator=generator, output_type="np").images

    def run_ours():
        generator = torch.Generator(device).manual_seed(args.seed)
        return ours(PROMPT, num_images_per_prompt=args.images, num_inference_steps=args.steps, height=args.size,
                    width=args.size, generator=generator, output_type="np").images

    sides = {"ours": (run_ours, timer_ours), "original": (run_theirs, timer_theirs)}
    results, images = {}, {}
    for fn, _ in sides.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, (fn, timer) in sides.items():  # alternate the two, so that load bursts hit both alike
            timer.reset()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            images[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = time.perf_counter() - start
            if name not in results or total < results[name][0]:
                results[name] = (total, dict(timer.totals))

    print(f"VisCPM-Paint, {args.size}px, {args.steps} steps, {args.images} images, CPM-Bee {args.dim}x{args.layers}, "
          f"device {device}, threads {torch.get_num_threads()}, best of {args.repeats}")
    header = f"{'':10} {'s/image':>9} {'text enc':>9} {'unet':>9} {'vae':>9} {'other':>9}"
    print(header)
    print("-" * len(header))
    for name, (total, parts) in results.items():
        shares = [parts.get(part, 0.0) / total for part in ("text encoder", "unet", "vae")]
        other = 1.0 - sum(shares)
        print(f"{name:10} {total / args.images:9.4f} " + " ".join(f"{100 * s:8.1f}%" for s in shares)
              + f" {100 * other:8.1f}%")
    difference = abs(images["original"] - images["ours"]).max()
    print(f"\nlargest pixel difference ours vs original: {difference:.2e}")
    print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
