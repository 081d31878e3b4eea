#!/usr/bin/env python
"""Draw with VisCPM-Paint: the original's interface, then the diffusers pipeline with another scheduler.

    python examples/paint.py --model openbmb/VisCPM-Paint --variant zhplus "海边的灯塔，油画风格"
    python examples/paint.py --model viscpm-paint-hf "a lighthouse by the sea, oil painting" --steps 30

`VisCPMPaint.generate` is the original's call (its safety checkers and ranker when the folder has them); the
pipeline is a `StableDiffusionPipeline`-like diffusers pipeline, here with a DPM-Solver scheduler and a seed.
"""

import argparse

import torch
from diffusers import DPMSolverMultistepScheduler

from viscpm import VisCPMPaint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="海边的灯塔，油画风格")
    parser.add_argument("--model", default="openbmb/VisCPM-Paint", help="a converted folder, a Hub repo or a .pt")
    parser.add_argument("--variant", help="for openbmb/VisCPM-Paint: balance or zhplus")
    parser.add_argument("--negative", default="模糊, low quality")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="painting", help="file name stem: STEM.png and STEM-dpm.png")
    args = parser.parse_args(argv)

    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    # None: the safety checkers and the ranker the folder has, nothing fetched for those it lacks.
    painter = VisCPMPaint.from_pretrained(args.model, variant=args.variant, torch_dtype=dtype,
                                          image_safety_checker=None, prompt_safety_checker=None, add_ranker=None)
    generator = torch.Generator(painter.device).manual_seed(args.seed)
    grid = painter.generate(args.prompt, negative_prompt=args.negative, image_size=args.size, generator=generator)
    if grid is not None:  # None: the prompt checker refused the prompt
        grid.save(f"{args.output}.png")

    pipe = painter.pipeline
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator(pipe.device).manual_seed(args.seed)
    image = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps, height=args.size,
                 width=args.size, generator=generator).images[0]
    image.save(f"{args.output}-dpm.png")
    return grid, image


if __name__ == "__main__":
    main()
