"""VisCPM-Paint for users of the original code: `VisCPMPaint`, a drop-in for ``VisCPM.VisCPMPaint``.

`VisCPMPaint` wraps a :class:`~viscpm.modeling.pipeline_viscpm_paint.VisCPMPaintPipeline` (the diffusers pipeline,
which draws) with the two parts of the original that are not diffusion:

* the prompt checker: a text classifier (``BertForSequenceClassification`` in the original) whose label 1 above
  ``prompt_checker_threshold`` refuses a prompt; nothing is drawn for it;
* the ranker: a CLIP-like model (Chinese-CLIP in the original) that draws ``ranker_candidates`` images per requested
  image and keeps the one it scores highest against the prompt.

It keeps the original's constructor options and its ``generate`` signature and return value (one PIL image: the grid
of the drawn images, or ``None`` when the prompt checker refuses the prompt), so code written for the original runs
unchanged; calling it (``painter(prompts, ...)``) draws batches and reports per image.

Where the parts live in a folder: in the subfolders ``prompt_checker/``, ``prompt_checker_tokenizer/``, ``ranker/``
and ``ranker_processor/``, each listed in ``model_index.json`` as ``["transformers", "<class>"]`` beside the settings
``prompt_checker_threshold`` and ``ranker_candidates``. That is the layout folders had when these parts were pipeline
components, so older folders load unchanged; `VisCPMPaintPipeline.from_pretrained` ignores these entries, and
[`VisCPMPaint.save_pretrained`] writes them.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .conversion.original_format import resolve_original_format
from .modeling.pipeline_viscpm_paint import VisCPMPaintPipeline, prompt_list
from .safety import load_image_safety_checker

__all__ = ["VisCPMPaint", "VisCPMPaintOutput", "grid_image"]

logger = logging.getLogger(__name__)

PROMPT_CHECKER_REPO, PROMPT_CHECKER_SUBFOLDER = "openbmb/VisCPM-Paint", "text-security-checker"
RANKER_REPO = "OFA-Sys/chinese-clip-vit-base-patch16"
"""Where the original takes the optional parts from when a converted folder does not hold them."""

REFUSED_MESSAGE = "Your input has unsafe content, please correct it!"
PARTS = ("prompt_checker", "prompt_checker_tokenizer", "ranker", "ranker_processor")
"""The folder entries (subfolders and ``model_index.json`` keys) of `VisCPMPaint`'s own parts."""
HUB_OPTIONS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "proxies")


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


@dataclass
class VisCPMPaintOutput:
    """
    Args:
        images: ``num_images_per_prompt`` per prompt, prompt-major, as the pipeline returns them; images of refused
            prompts and images the safety checker flagged are black.
        nsfw_content_detected (`list[bool | None]`): per image, whether the image safety checker flagged it; ``None``
            where it did not run (no checker, a refused prompt, or ``output_type="latent"``).
        prompt_refused (`list[bool]`): per image, whether the prompt checker refused its prompt (nothing was drawn).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool | None]
    prompt_refused: list[bool]


class VisCPMPaint:
    """Drop-in for the original ``VisCPMPaint``: same options, same ``generate``, same images for the same seed.

    Build it with :meth:`from_pretrained` (a converted folder or Hub repo), or around a pipeline and the optional
    parts: ``prompt_checker`` + ``prompt_checker_tokenizer`` (a ``*ForSequenceClassification`` model and its
    tokenizer), ``ranker`` + ``ranker_processor`` (``ChineseCLIPModel`` or any model with ``logits_per_image``, and
    its processor).
    """

    def __init__(
        self,
        pipeline: VisCPMPaintPipeline,
        prompt_checker=None,
        prompt_checker_tokenizer=None,
        ranker=None,
        ranker_processor=None,
        prompt_checker_threshold: float = 0.75,
        ranker_candidates: int = 4,
    ):
        for name, model, partner in (("prompt_checker", prompt_checker, prompt_checker_tokenizer),
                                     ("ranker", ranker, ranker_processor)):
            if model is not None and partner is None:
                raise ValueError(f"`{name}` needs its preprocessor too (`prompt_checker_tokenizer` / `ranker_processor`)")
        if ranker_candidates < 1:
            raise ValueError(f"`ranker_candidates` must be at least 1, got {ranker_candidates}")
        self.pipeline = pipeline
        self.prompt_checker, self.prompt_checker_tokenizer = prompt_checker, prompt_checker_tokenizer
        self.ranker, self.ranker_processor = ranker, ranker_processor
        self.prompt_checker_threshold = prompt_checker_threshold
        self.ranker_candidates = ranker_candidates

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        image_safety_checker: bool | None = True,
        prompt_safety_checker: bool | None = True,
        add_ranker: bool | None = True,
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
                When off, the part is dropped even if the folder has it. ``None``: the folder's part if it has
                one, nothing fetched (what the command line and the apps use).
            torch_dtype: dtype of the models (default: as stored).
            device: where to run (default: CUDA when available, as the original).
            adapter: a Paint language adapter folder or Hub repo (``text_encoder/`` and optionally ``unet/`` peft
                folders, see `viscpm.adapters.save_paint_adapter`), put into the pipeline's models in place.
            variant: for an original-format repo, folder or ``.pt`` (``openbmb/VisCPM-Paint``: ``"balance"``,
                ``"zhplus"``), which checkpoint to fetch and convert once into a cache folder (see
                `viscpm.conversion.original_format`); for a converted one, diffusers' weights variant.
            kwargs: passed to `VisCPMPaintPipeline.from_pretrained` (e.g. ``revision``, ``token``); the Hub options
                among them also to the optional parts.
        """
        path_or_repo = resolve_original_format(path_or_repo, "paint", variant, kwargs)
        pipe = VisCPMPaintPipeline.from_pretrained(path_or_repo, torch_dtype=torch_dtype, **kwargs)
        if image_safety_checker is False:
            pipe.register_modules(safety_checker=None, feature_extractor=None)
        elif image_safety_checker and pipe.safety_checker is None:
            checker, extractor = load_image_safety_checker(torch_dtype=torch_dtype)
            pipe.register_modules(safety_checker=checker, feature_extractor=extractor)

        hub = {key: kwargs[key] for key in HUB_OPTIONS if key in kwargs}
        index = VisCPMPaintPipeline.load_config(path_or_repo, **hub)
        parts = {name: _load_part(path_or_repo, name, index.get(name), torch_dtype, hub) for name in PARTS}
        if prompt_safety_checker and parts["prompt_checker"] is None:
            from transformers import BertForSequenceClassification, BertTokenizer

            parts["prompt_checker"] = BertForSequenceClassification.from_pretrained(
                PROMPT_CHECKER_REPO, subfolder=PROMPT_CHECKER_SUBFOLDER)
            parts["prompt_checker_tokenizer"] = BertTokenizer.from_pretrained(
                PROMPT_CHECKER_REPO, subfolder=PROMPT_CHECKER_SUBFOLDER)
        if add_ranker and parts["ranker"] is None:
            from transformers import AutoModel, AutoProcessor

            parts["ranker"] = AutoModel.from_pretrained(RANKER_REPO)
            parts["ranker_processor"] = AutoProcessor.from_pretrained(RANKER_REPO)
        if prompt_safety_checker is False:
            parts.update(prompt_checker=None, prompt_checker_tokenizer=None)
        if add_ranker is False:
            parts.update(ranker=None, ranker_processor=None)
        if adapter is not None:
            from .adapters import load_paint_adapter

            load_paint_adapter(pipe, adapter)
        settings = {key: index[key] for key in ("prompt_checker_threshold", "ranker_candidates") if key in index}
        painter = cls(pipe, **parts, **settings)
        painter.to(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        pipe.set_progress_bar_config(disable=True)
        return painter

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Save the pipeline (``kwargs`` go to its `save_pretrained`), the optional parts in their subfolders, and
        their entries and settings in ``model_index.json``; :meth:`from_pretrained` reads it all back."""
        save_directory = Path(save_directory)
        self.pipeline.save_pretrained(save_directory, **kwargs)
        index_file = save_directory / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8"))
        for name in PARTS:
            part = getattr(self, name)
            if part is None:
                index[name] = [None, None]
                continue
            library = type(part).__module__.split(".")[0]
            if library != "transformers":
                raise ValueError(f"`{name}` must be a transformers class to be saved and loaded, got {type(part)}")
            part.save_pretrained(save_directory / name)
            index[name] = [library, type(part).__name__]
        index.update(prompt_checker_threshold=self.prompt_checker_threshold, ranker_candidates=self.ranker_candidates)
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def to(self, device: str | torch.device) -> VisCPMPaint:
        """Move the pipeline and the optional models to ``device``."""
        self.pipeline.to(device)
        for model in (self.prompt_checker, self.ranker):
            if model is not None:
                model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    # ------------------------------------------------------------------ the optional parts

    @torch.no_grad()
    def check_prompts(self, prompts: list[str]) -> list[bool]:
        """Per prompt, True when the prompt checker refuses it (its label 1 scores above the threshold)."""
        if self.prompt_checker is None:
            return [False] * len(prompts)
        inputs = self.prompt_checker_tokenizer(prompts, return_tensors="pt", padding=True, truncation=True)
        logits = self.prompt_checker(**inputs.to(self.prompt_checker.device)).logits
        unsafe = logits.float().softmax(-1)[:, 1]
        return [bool(score > self.prompt_checker_threshold) for score in unsafe]

    @torch.no_grad()
    def rank(self, prompt: str | list[str], images: list[PIL.Image.Image]) -> torch.Tensor:
        """The ranker's score (CLIP ``logits_per_image``) of each image against ``prompt``: ``[len(images)]``; for a
        list of prompts, ``[len(images), len(prompts)]`` (every image against every prompt, in one batch)."""
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        # A prompt longer than the ranker's text model takes is cut to it (Chinese-CLIP: 512 tokens).
        max_length = getattr(getattr(self.ranker.config, "text_config", None), "max_position_embeddings", None)
        inputs = self.ranker_processor(text=texts, images=images, return_tensors="pt", padding=True,
                                       truncation=max_length is not None, max_length=max_length)
        scores = self.ranker(**inputs.to(self.ranker.device)).logits_per_image.float().cpu()
        return scores[:, 0] if isinstance(prompt, str) else scores

    # ------------------------------------------------------------------ drawing

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        use_ranker: bool | None = None,
        **pipeline_kwargs,
    ) -> VisCPMPaintOutput:
        """Draw ``num_images_per_prompt`` images per prompt: refused prompts get black images, and with the ranker
        each image is the best of its own ``ranker_candidates`` candidates against its prompt.

        Every prompt kept is drawn in one pipeline call (ranker candidates included) and the ranker scores all
        candidates in one batch. ``use_ranker`` defaults to whether there is a ranker; ``output_type="latent"`` does
        not rank. Other arguments (``height``, ``generator``, ``num_inference_steps``, ...) go to the pipeline; a list
        of generators has one per drawn image (kept prompts × images × candidates).
        """
        prompts = prompt_list(prompt)
        if use_ranker and self.ranker is None:
            raise ValueError("`use_ranker=True` needs a ranker: build VisCPMPaint with `ranker` and `ranker_processor`")
        use_ranker = (self.ranker is not None if use_ranker is None else use_ranker) and output_type != "latent"
        candidates = self.ranker_candidates if use_ranker else 1

        refused = self.check_prompts(prompts)
        if any(refused):
            logger.warning(f"The prompt checker refused {sum(refused)} of {len(prompts)} prompts: no image is drawn "
                           "for them.")
        kept = [i for i, flag in enumerate(refused) if not flag]
        images, nsfw = None, []
        if kept:
            negatives = negative_prompt if negative_prompt is None or isinstance(negative_prompt, str) else [
                negative_prompt[i] for i in kept]
            images, nsfw = self.pipeline(
                [prompts[i] for i in kept], negative_prompt=negatives,
                num_images_per_prompt=num_images_per_prompt * candidates,
                output_type="latent" if output_type == "latent" else "np", return_dict=False, **pipeline_kwargs,
            )
            if use_ranker:
                images, nsfw = self._best_candidates([prompts[i] for i in kept], images, nsfw, candidates)
        if any(refused):
            images, nsfw = self._fill_refused(images, nsfw, refused, kept, num_images_per_prompt, output_type,
                                              pipeline_kwargs.get("height"), pipeline_kwargs.get("width"))
        if output_type == "pil":
            images = self.pipeline.numpy_to_pil(images)
        elif output_type == "pt":
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        prompt_refused = [flag for flag in refused for _ in range(num_images_per_prompt)]
        return VisCPMPaintOutput(images=images, nsfw_content_detected=nsfw, prompt_refused=prompt_refused)

    def _best_candidates(self, prompts: list[str], images: np.ndarray, nsfw: list, candidates: int):
        """Keep each group of ``candidates`` consecutive images' best against its prompt (one ranker batch)."""
        scores = self.rank(prompts, self.pipeline.numpy_to_pil(images))
        per_prompt = len(images) // (len(prompts) * candidates)
        chosen = []
        for group in range(len(images) // candidates):
            start = group * candidates
            chosen.append(start + int(torch.argmax(scores[start:start + candidates, group // per_prompt])))
        return images[chosen], [nsfw[i] for i in chosen]

    def _fill_refused(self, images, nsfw, refused, kept, per_prompt, output_type, height, width):
        """The drawn images in prompt order, black images (zero latents) for the refused prompts."""
        pipe = self.pipeline
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        total = len(refused) * per_prompt
        if output_type == "latent":
            shape = (total, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            full = torch.zeros(shape, device=pipe.device, dtype=pipe.unet.dtype)
        else:
            full = np.zeros((total, height, width, 3), dtype=np.float32)
        flags: list[bool | None] = [None] * total
        for p, index in enumerate(kept):
            for k in range(per_prompt):
                full[index * per_prompt + k] = images[p * per_prompt + k]
                flags[index * per_prompt + k] = nsfw[p * per_prompt + k]
        return full, flags

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
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__} (call VisCPMPaint for batches)")
        output = self(prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                      guidance_scale=guidance_scale, height=image_size, width=image_size, generator=generator)
        if output.prompt_refused[0]:
            warnings.warn(REFUSED_MESSAGE, stacklevel=2)
            return None
        return grid_image(output.images)


def _load_part(path_or_repo, name: str, entry, torch_dtype, hub: dict):
    """The part ``name`` of a folder, as its ``model_index.json`` entry ``[library, class]`` says; None if absent."""
    if not entry or entry[0] is None:
        return None
    library, class_name = entry
    if library != "transformers":
        raise ValueError(f"model_index.json lists `{name}` as {entry}: VisCPMPaint loads transformers classes only; "
                         f"set it to [null, null] or save the part with a transformers class")
    part_class = getattr(importlib.import_module(library), class_name)
    options = dict(hub)
    if torch_dtype is not None and hasattr(part_class, "config_class"):
        options["dtype"] = torch_dtype
    return part_class.from_pretrained(path_or_repo, subfolder=name, **options)
