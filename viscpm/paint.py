"""VisCPM-Paint for users of the original code: `VisCPMPaint`, a drop-in for ``VisCPM.VisCPMPaint``.

The work is done by :class:`~viscpm.modeling.pipeline_viscpm_paint.VisCPMPaintPipeline` on a converted folder
(see ``conversion/convert_viscpm_paint.py``); this class keeps the original's constructor options and its
``generate`` signature and return value (one PIL image: the grid of the drawn images, or ``None`` when the
prompt checker refuses the prompt), so code written for the original runs unchanged.
"""

from __future__ import annotations

import os
import warnings

import PIL.Image
import torch

from .conversion.original_format import resolve_original_format
from .modeling.pipeline_viscpm_paint import VisCPMPaintPipeline
from .safety import load_image_safety_checker

__all__ = ["VisCPMPaint", "grid_image"]

PROMPT_CHECKER_REPO, PROMPT_CHECKER_SUBFOLDER = "openbmb/VisCPM-Paint", "text-security-checker"
RANKER_REPO = "OFA-Sys/chinese-clip-vit-base-patch16"
"""Where the original takes the optional parts from when a converted folder does not hold them."""

REFUSED_MESSAGE = "Your input has unsafe content, please correct it!"


def grid_image(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """The images side by side, at most 8 per row (rows left incomplete are black), as the original returns."""
    if not images:
        raise ValueError("no images to put in a grid")
    width, height = images[0].size
    columns = min(len(images), 8)
    rows = -(-len(images) // columns)
    grid = PIL.Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


class VisCPMPaint:
    """Drop-in for the original ``VisCPMPaint``: same options, same ``generate``, same images for the same seed.

    Build it with :meth:`from_pretrained` (a converted folder or Hub repo), or around a pipeline.
    """

    def __init__(self, pipeline: VisCPMPaintPipeline):
        self.pipeline = pipeline

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        image_safety_checker: bool = True,
        prompt_safety_checker: bool = True,
        add_ranker: bool = True,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        variant: str | None = None,
        adapter: str | os.PathLike | None = None,
        **kwargs,
    ) -> VisCPMPaint:
        """Load a converted VisCPM-Paint folder.

        Args:
            image_safety_checker, prompt_safety_checker, add_ranker: as in the original. When on, the part in
                the folder is used; a folder without it gets it from the repo the original uses.
                When off, the part is dropped even if the folder has it.
            torch_dtype: dtype of the models (default: as stored).
            device: where to run (default: CUDA when available, as the original).
            adapter: a Paint language adapter folder or Hub repo (``text_encoder/`` and optionally ``unet/`` peft
                folders, see `viscpm.adapters.save_paint_adapter`), put into the pipeline's models in place.
            variant: for an original-format repo, folder or ``.pt`` (``openbmb/VisCPM-Paint``: ``"balance"``,
                ``"zhplus"``), which checkpoint to fetch and convert once into a cache folder (see
                `viscpm.conversion.original_format`); for a converted one, diffusers' weights variant.
            kwargs: passed to `VisCPMPaintPipeline.from_pretrained` (e.g. ``revision``, ``token``).
        """
        path_or_repo = resolve_original_format(path_or_repo, "paint", variant, kwargs)
        pipe = VisCPMPaintPipeline.from_pretrained(path_or_repo, torch_dtype=torch_dtype, **kwargs)
        parts = {}
        if not image_safety_checker:
            parts.update(safety_checker=None, feature_extractor=None)
        elif pipe.safety_checker is None:
            checker, extractor = load_image_safety_checker(torch_dtype=torch_dtype)
            parts.update(safety_checker=checker, feature_extractor=extractor)
        if not prompt_safety_checker:
            parts.update(prompt_checker=None, prompt_checker_tokenizer=None)
        elif pipe.prompt_checker is None:
            from transformers import BertForSequenceClassification, BertTokenizer

            parts.update(
                prompt_checker=BertForSequenceClassification.from_pretrained(
                    PROMPT_CHECKER_REPO, subfolder=PROMPT_CHECKER_SUBFOLDER),
                prompt_checker_tokenizer=BertTokenizer.from_pretrained(
                    PROMPT_CHECKER_REPO, subfolder=PROMPT_CHECKER_SUBFOLDER),
            )
        if not add_ranker:
            parts.update(ranker=None, ranker_processor=None)
        elif pipe.ranker is None:
            from transformers import AutoModel as _AutoModel
            from transformers import AutoProcessor

            parts.update(ranker=_AutoModel.from_pretrained(RANKER_REPO), ranker_processor=AutoProcessor.from_pretrained(RANKER_REPO))
        if parts:
            pipe.register_modules(**parts)
        if adapter is not None:
            from .adapters import load_paint_adapter

            load_paint_adapter(pipe, adapter)
        device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe)

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 7.5,
        image_size: int = 512,
        generator: torch.Generator | None = None,
    ) -> PIL.Image.Image | None:
        """Draw ``num_images_per_prompt`` images of ``image_size``² for ``prompt`` (50 DDPM steps).

        Returns:
            One PIL image, the drawn images side by side (at most 8 per row); ``None`` with a warning when the
            prompt checker refuses the prompt, as the original. With the ranker, each returned image is the
            best of 4 candidates (the original ranks only the first 4 candidates and returns one image, which
            is the same thing for ``num_images_per_prompt=1``). A ``guidance_scale`` ≤ 1 turns guidance off
            (the original always runs it; at exactly 1 the two agree).
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__} (use VisCPMPaintPipeline for batches)")
        output = self.pipeline(
            prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            guidance_scale=guidance_scale,
            height=image_size,
            width=image_size,
            generator=generator,
            output_type="pil",
        )
        if output.prompt_refused[0]:
            warnings.warn(REFUSED_MESSAGE, stacklevel=2)
            return None
        return grid_image(output.images)


