"""The image safety checker both VisCPM-Chat and VisCPM-Paint use: Stable Diffusion's, as the original does."""

from __future__ import annotations

import os

import torch

__all__ = ["SAFETY_CHECKER_REPO", "SAFETY_FEATURE_EXTRACTOR_REPO", "load_image_safety_checker"]

SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"
SAFETY_FEATURE_EXTRACTOR_REPO = "openai/clip-vit-base-patch32"


def load_image_safety_checker(source: str | os.PathLike | None = None, torch_dtype: torch.dtype | None = None):
    """``(StableDiffusionSafetyChecker, CLIPImageProcessor)`` from ``source`` (a repo id or folder; default: the
    original's). The CLIP image processor comes from ``source`` when it has one, else from the original's repo."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    source = str(source or SAFETY_CHECKER_REPO)
    checker = StableDiffusionSafetyChecker.from_pretrained(source, torch_dtype=torch_dtype)
    has_processor = os.path.isfile(os.path.join(source, "preprocessor_config.json"))
    extractor = CLIPImageProcessor.from_pretrained(source if has_processor else SAFETY_FEATURE_EXTRACTOR_REPO)
    return checker, extractor
