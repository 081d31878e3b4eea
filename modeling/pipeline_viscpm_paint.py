"""VisCPM-Paint as a diffusers pipeline: Stable Diffusion 2.1 conditioned on CPM-Bee (Chinese and English prompts).

It reads like diffusers' `StableDiffusionPipeline` (check_inputs, encode_prompt, prepare_latents, the denoising loop,
decode, the image safety checker) and draws the same images as the original VisCPM-Paint for the same weights,
settings and ``torch.Generator``:

* each prompt is the CPM-Bee dict ``{"caption": prompt, "objects": ""}``, the negative prompt (default ``""``)
  the same dict; the original pads a prompt and its negative to the longer of the two, and the UNet sees those
  padded positions too. A batch is padded to its longest text, and the positions beyond each pair's own length are
  masked (``encoder_attention_mask``), so each image equals the one its prompt gives alone;
* classifier-free guidance runs on the batch ``[uncond, cond]``;
* the initial latents and the scheduler's noise are drawn in the original's order from ``generator``.

The original's prompt checker and best-of-N ranker are not part of the pipeline: `viscpm.VisCPMPaint` (the drop-in
for the original class) wraps the pipeline with them. Folders written before that split list them in
``model_index.json``; the pipeline leaves those entries to `VisCPMPaint` (see [`VisCPMPaintPipeline.extract_init_dict`]).

Speed: each call encodes its prompts and negatives in one text-encoder batch and draws every image in one UNet batch.
The usual diffusers recipes keep the images within float tolerance of the plain path:
``pipe.unet.to(memory_format=torch.channels_last)`` (and the VAE), ``pipe.fuse_qkv_projections()``,
``pipe.unet = torch.compile(pipe.unet)``; attention runs through SDPA (diffusers' default processors).
[`~VisCPMPaintPipeline.enable_prompt_cache`] (opt-in) reuses the text conditioning across calls that repeat a prompt.

Only torch, transformers and diffusers are imported: the file also ships as remote code.
"""

import inspect
import math
import numbers
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .modeling_viscpm_paint import VisCPMPaintTextEncoder
from .tokenization_cpmbee import CpmBeeTokenizer

logger = logging.get_logger(__name__)

LEGACY_ENTRIES = (
    "prompt_checker",
    "prompt_checker_tokenizer",
    "ranker",
    "ranker_processor",
    "prompt_checker_threshold",
    "ranker_candidates",
)
"""``model_index.json`` entries that belong to `viscpm.VisCPMPaint` (its prompt checker and ranker and their
settings): folders converted or saved before the pipeline/user-API split list them, `VisCPMPaint` reads them."""


@dataclass
class VisCPMPaintPipelineOutput(BaseOutput):
    """
    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` `[N, H, W, 3]` or `torch.Tensor` `[N, 3, H, W]`): the images,
            ``num_images_per_prompt`` per prompt, prompt-major (latents for ``output_type="latent"``). Images that
            the safety checker flagged are black.
        nsfw_content_detected (`list[bool | None]`): per image, whether the image safety checker flagged it;
            ``None`` where it did not run (no checker, or ``output_type="latent"``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool | None]


class VisCPMPaintPipeline(DiffusionPipeline, StableDiffusionMixin):
    r"""
    Text-to-image generation with VisCPM-Paint.

    Components:
        text_encoder ([`VisCPMPaintTextEncoder`]): CPM-Bee + the bridge to the UNet's cross-attention width.
        tokenizer ([`CpmBeeTokenizer`]): CPM-Bee's tokenizer.
        unet ([`UNet2DConditionModel`]), vae ([`AutoencoderKL`]): Stable Diffusion 2.1 parts.
        scheduler: the original's `DDPMScheduler`; any compatible diffusers scheduler can be swapped in.
        safety_checker ([`StableDiffusionSafetyChecker`], *optional*) + feature_extractor (its image processor).
        max_prompt_length (`int`, defaults to 3000, as VisCPM-Chat's prompts): the most tokens a prompt or negative
            prompt may have; a longer one is an error before the text encoder runs, whose memory grows with the square
            of the length. `None`: no limit.

    From [`StableDiffusionMixin`]: `fuse_qkv_projections` / `unfuse_qkv_projections` (UNet and VAE) and
    `enable_freeu` / `disable_freeu`.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        text_encoder: VisCPMPaintTextEncoder,
        tokenizer: CpmBeeTokenizer,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker=None,
        feature_extractor=None,
        max_prompt_length: int | None = 3000,
    ):
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("`safety_checker` needs its image processor too: pass `feature_extractor`")
        self.register_modules(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            vae=vae,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        if max_prompt_length is not None:
            _require_int("max_prompt_length", max_prompt_length, 1, "tokens per prompt, e.g. 3000; None: no limit")
        self.register_to_config(max_prompt_length=max_prompt_length)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._prompt_cache = None

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """As diffusers', minus the entries of `LEGACY_ENTRIES`: a folder that lists the prompt checker or the ranker
        (read by `viscpm.VisCPMPaint`) loads as a plain pipeline, without a warning about them."""
        config_dict = {key: value for key, value in config_dict.items() if key not in LEGACY_ENTRIES}
        return super().extract_init_dict(config_dict, **kwargs)

    @property
    def default_sample_size(self) -> int:
        return self.unet.config.sample_size if getattr(self, "unet", None) is not None else 64

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

    @property
    def guidance_rescale(self):
        return self._guidance_rescale

    @property
    def clip_skip(self):
        return self._clip_skip

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------ text

    @staticmethod
    def _prompt_dict(text: str) -> dict:
        # Literal text: a "<" typed by the user is escaped rather than read as a CPM-Bee special token.
        return {"caption": text.replace("<", "<<"), "objects": ""}

    def enable_prompt_cache(self, max_size: int = 32):
        """Keep the text conditioning of the last ``max_size`` prompt batches, so that a call repeating a prompt and
        its negative (same texts, device and dtype) skips the text encoder; the images stay exactly the same.

        Opt-in, because a stale entry would silently draw the wrong images. The cache is emptied whenever the text
        encoder or tokenizer is replaced, a weight or buffer of the encoder is replaced or edited in place, or its peft
        adapters are added, switched, merged, disabled or rescaled; it is bypassed while a module is in training mode.
        Edits through ``tensor.data`` bypass the version counters these checks read: call
        [`clear_prompt_cache`] after them.
        """
        if max_size < 1:
            raise ValueError(f"`max_size` must be at least 1, got {max_size}")
        self._prompt_cache = _PromptCache(max_size)

    def disable_prompt_cache(self):
        """Stop caching text conditioning (and drop what was kept)."""
        self._prompt_cache = None

    def clear_prompt_cache(self):
        """Drop the cached text conditioning (the cache stays on)."""
        if self._prompt_cache is not None:
            self._prompt_cache.entries.clear()

    @torch.no_grad()
    def _encode_texts(self, texts: list[str], labels: list[str], device, min_length: int = 0,
                      clip_skip: int | None = None):
        """UNet conditioning of ``texts``, right-padded together to the longest (at least ``min_length``), and each
        text's length in tokens; a text over ``max_prompt_length`` (``labels`` name them) is an error."""
        cache, key = self._prompt_cache, None
        if cache is not None and cache.validate(self.text_encoder, self.tokenizer):
            key = (tuple(texts), min_length, clip_skip, torch.device(device))
            if (hit := cache.get(key)) is not None:
                return hit
        inputs = self.tokenizer(
            [self._prompt_dict(text) for text in texts],
            return_tensors="pt",
            padding="max_length" if min_length else True,
            max_length=min_length or None,
            padding_side="right",
        )
        limit = self.config.max_prompt_length
        for label, length in zip(labels, inputs["attention_mask"].sum(-1).tolist()):
            if limit is not None and length > limit:
                raise ValueError(
                    f"{label} is {length} tokens, over max_prompt_length={limit}: shorten it (the text encoder's memory "
                    "grows with the square of the length; the limit is the pipeline's `max_prompt_length`)"
                )
        keys = ("input_ids", "attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids",
                "ext_table_sub")
        inputs = {name: inputs[name].to(device) for name in keys}
        if clip_skip:
            # As StableDiffusionPipeline: the states `clip_skip` layers before the last, through the final norm.
            hidden = self.text_encoder(**inputs, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            embeds = self.text_encoder.bridge(self.text_encoder.model.norm(hidden))
        else:
            embeds = self.text_encoder(**inputs).last_hidden_state
        result = (embeds, inputs["attention_mask"].sum(-1))
        if key is not None:
            cache.put(key, result)
        return result

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        clip_skip: int | None = None,
    ):
        """Text conditioning ``(prompt_embeds, negative_prompt_embeds, prompt_attention_mask,
        negative_prompt_attention_mask)``, each repeated ``num_images_per_prompt`` times per prompt; the negative ones
        are None without guidance.

        Prompts and negative prompts are encoded in one batch, padded to the longest. The masks (1: the UNet attends
        to the position; None: to every position) keep each prompt and its negative to the longer of the two, which
        is what the original pads them to and attends to: an image does not depend on the other prompts of its
        batch. ``clip_skip`` takes CPM-Bee's states that many layers before the last. With [`enable_prompt_cache`],
        a batch of texts seen before is not encoded again.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            encode_negatives = do_classifier_free_guidance and negative_prompt_embeds is None
            negatives = self._negatives(negative_prompt, len(prompts)) if encode_negatives else []
            embeds, lengths = self._encode_texts(negatives + prompts, _labels("negative_prompt", negatives)
                                                 + _labels("prompt", prompts), device, clip_skip=clip_skip)
            prompt_embeds, lengths = embeds[len(negatives):], _pair_lengths(lengths, len(negatives))
            prompt_attention_mask = _positions_below(lengths, prompt_embeds.shape[1])
            if encode_negatives:
                negative_prompt_embeds, negative_prompt_attention_mask = embeds[: len(negatives)], prompt_attention_mask
        elif do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt_embeds, lengths = self._encode_negatives_for(prompt_embeds, negative_prompt, device, clip_skip)
            if prompt_attention_mask is not None:  # the pair: the prompt's positions and its negative's
                prompt_attention_mask = prompt_attention_mask.bool() | _positions_below(lengths, prompt_embeds.shape[1])
                negative_prompt_attention_mask = prompt_attention_mask

        dtype = self.unet.dtype if getattr(self, "unet", None) is not None else prompt_embeds.dtype
        prompt_embeds = _repeat(prompt_embeds, num_images_per_prompt, device, dtype)
        prompt_attention_mask = _repeat(prompt_attention_mask, num_images_per_prompt, device)
        if do_classifier_free_guidance:
            negative_prompt_embeds = _repeat(negative_prompt_embeds, num_images_per_prompt, device, dtype)
            negative_prompt_attention_mask = _repeat(negative_prompt_attention_mask, num_images_per_prompt, device)
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"`negative_prompt_embeds` {tuple(negative_prompt_embeds.shape)} and `prompt_embeds` "
                    f"{tuple(prompt_embeds.shape)} must have the same shape (pad both to the same length)"
                )
        else:
            negative_prompt_embeds = negative_prompt_attention_mask = None
        return prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask

    def _encode_negatives_for(self, prompt_embeds: torch.Tensor, negative_prompt, device, clip_skip=None):
        """The negative prompts' conditioning and lengths, padded to the length of the given ``prompt_embeds``."""
        batch, length = prompt_embeds.shape[:2]
        negatives = self._negatives(negative_prompt, batch)
        lengths = [len(ids) for ids in self.tokenizer([self._prompt_dict(t) for t in negatives], padding=False)["input_ids"]]
        if max(lengths) > length:
            raise ValueError(
                f"the negative prompt is {max(lengths)} tokens long but `prompt_embeds` has {length} positions: "
                "pass `negative_prompt_embeds` too (encode both with `encode_prompt`)"
            )
        return self._encode_texts(negatives, _labels("negative_prompt", negatives), device, min_length=length,
                                  clip_skip=clip_skip)

    @staticmethod
    def _negatives(negative_prompt, batch_size: int) -> list[str]:
        if negative_prompt is None:
            return [""] * batch_size
        if isinstance(negative_prompt, str):
            return [negative_prompt] * batch_size
        negatives = list(negative_prompt)
        if len(negatives) != batch_size:
            raise ValueError(f"got {len(negatives)} negative prompts for {batch_size} prompts")
        if not all(isinstance(text, str) for text in negatives):
            raise TypeError("`negative_prompt` must be a str or a list of str")
        return negatives

    # ------------------------------------------------------------------ images

    def run_safety_checker(self, images: np.ndarray, device, dtype) -> tuple[np.ndarray, list[bool | None]]:
        """Black out the images the safety checker flags; ``images`` are ``[N, H, W, 3]`` floats in [0, 1]."""
        if self.safety_checker is None:
            return images, [None] * len(images)
        clip_input = self.feature_extractor(self.numpy_to_pil(images), return_tensors="pt").pixel_values
        images, flagged = self.safety_checker(images=images, clip_input=clip_input.to(device=device, dtype=dtype))
        flagged = [bool(flag) for flag in flagged]
        for index, flag in enumerate(flagged):
            if flag:
                images[index] = np.zeros(images[index].shape)
        if any(flagged):
            logger.warning("Potential NSFW content was detected in one or more images: they are replaced by black images.")
        return images, flagged

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """VAE decode to ``[N, H, W, 3]`` float32 in [0, 1]."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1)
        return images.detach().cpu().permute(0, 2, 3, 1).float().numpy()

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        """The scheduler's `step` arguments beyond the sample: ``eta`` (DDIM's η) and ``generator``, where it takes
        them."""
        parameters = inspect.signature(self.scheduler.step).parameters
        return {name: value for name, value in (("eta", eta), ("generator", generator)) if name in parameters}

    def check_inputs(self, prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                     callback_on_step_end_tensor_inputs):
        """The texts, sizes and conditioning of a call: each mistake a clear error before any work."""
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or value <= 0 or value % 8 != 0:
                raise (TypeError if not _is_int(value) else ValueError)(
                    f"`height` and `width` must be positive multiples of 8 (e.g. 512), got {name}={value!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None:
            prompt_list(prompt)
        if negative_prompt is not None:
            if not isinstance(negative_prompt, (str, list, tuple)) or not all(
                    isinstance(text, str) for text in ([negative_prompt] if isinstance(negative_prompt, str) else negative_prompt)):
                raise TypeError(f"`negative_prompt` must be a str or a list of str (one per prompt), got "
                                f"{type(negative_prompt).__name__}; pass None for the default \"\"")
            if prompt is not None and not isinstance(negative_prompt, str):
                self._negatives(negative_prompt, 1 if isinstance(prompt, str) else len(prompt))
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
                raise ValueError(f"`{name}` must be a tensor [batch, seq, dim] (from `encode_prompt`), got "
                                 f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
            limit = self.config.max_prompt_length
            if limit is not None and embeds.shape[1] > limit:
                raise ValueError(f"`{name}` has {embeds.shape[1]} positions, over max_prompt_length={limit}")
            _require_finite(name, embeds)
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}")

    def _check_options(self, num_inference_steps, timesteps, sigmas, guidance_scale, guidance_rescale, eta,
                       num_images_per_prompt, generator, latents, clip_skip, cross_attention_kwargs, output_type):
        """The numbers and options of a call: types and ranges, NaN and inf refused, each naming the argument."""
        if timesteps is None and sigmas is None:
            _require_int("num_inference_steps", num_inference_steps, 1, "e.g. 50")
        _require_int("num_images_per_prompt", num_images_per_prompt, 1, "e.g. 1")
        _require_number("guidance_scale", guidance_scale, hint="e.g. 7.5; 1 or less turns guidance off")
        _require_number("guidance_rescale", guidance_rescale, 0.0, 1.0, "0 (off) to 1")
        _require_number("eta", eta, 0.0, None, "DDIM's η, 0 to 1")
        if clip_skip is not None:
            layers = self.text_encoder.config.text_config.num_hidden_layers if self.text_encoder is not None else None
            _require_int("clip_skip", clip_skip, 0, f"0 to {layers - 1}" if layers else "e.g. 1")
            if layers is not None and clip_skip >= layers:
                raise ValueError(f"`clip_skip` must be below the text encoder's {layers} layers, got {clip_skip}")
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(f"`generator` must be a torch.Generator or a list of them (one per image), got "
                            f"{type(generator).__name__}: e.g. torch.Generator().manual_seed(0)")
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"`latents` must be a torch.Tensor, got {type(latents).__name__}")
            _require_finite("latents", latents)
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise TypeError(f"`cross_attention_kwargs` must be a dict, got {type(cross_attention_kwargs).__name__}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")

    def _check_timesteps(self, timesteps: torch.Tensor, num_inference_steps: int):
        """The schedule stays within the timesteps the UNet was trained on (the schedulers index their tables by it)."""
        train = getattr(self.scheduler.config, "num_train_timesteps", None)
        if train is not None and len(timesteps) and float(timesteps.max()) > train - 1:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} gives {type(self.scheduler).__name__} timesteps up to "
                f"{float(timesteps.max()):g}, beyond its {train} training timesteps (0 to {train - 1}): use fewer steps"
            )

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got a list of {len(generator)} generators for {batch_size} images (prompts × num_images_per_prompt):"
                " pass one generator, or exactly one per image"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (as diffusers' pipelines)
    ):
        r"""
        Draw images for ``prompt``; the arguments are `StableDiffusionPipeline`'s (no IP-Adapter).

        Args:
            prompt (`str` or `list[str]`): what to draw, in Chinese or English. Or pass `prompt_embeds`.
            height, width (`int`, defaults to the UNet's sample size × the VAE scale factor, 512): multiples of 8.
            num_inference_steps (`int`, defaults to 50), or `timesteps` / `sigmas` for schedulers that take them.
            guidance_scale (`float`, defaults to 7.5; ≤ 1 disables classifier-free guidance), guidance_rescale
                (`float` in [0, 1], defaults to 0): the rescale of "Common Diffusion Noise Schedules ... Are Flawed".
            negative_prompt (`str` or `list[str]`): what not to draw (default `""`, as the original).
            num_images_per_prompt (`int`, defaults to 1); eta (`float`): DDIM's η (other schedulers ignore it).
            generator (`torch.Generator` or a list, one per image): the same generator gives the original's images.
            latents (`torch.Tensor`): initial noise `[images, C, H/f, W/f]` instead of drawing it.
            prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask: text
                conditioning from [`encode_prompt`] (one row per prompt; a mask None attends to every position).
            output_type (`"pil"`, `"np"`, `"pt"` or `"latent"`): `"latent"` skips decoding and the safety checker.
            cross_attention_kwargs (`dict`): passed to the UNet's attention processors (e.g. ``{"scale": 0.5}`` for
                its LoRA layers). clip_skip (`int`): use CPM-Bee's states that many layers before the last.
            callback_on_step_end: called after each step as ``fn(pipe, step, timestep, tensors)``; may return
                replacements for the tensors named in `callback_on_step_end_tensor_inputs` (``prompt_embeds`` is the
                UNet's conditioning batch, ``[negative; prompt]`` under guidance, as in `StableDiffusionPipeline`).

        Returns:
            [`VisCPMPaintPipelineOutput`], or a tuple `(images, nsfw_content_detected)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs)
        self._check_options(num_inference_steps, timesteps, sigmas, guidance_scale, guidance_rescale, eta,
                            num_images_per_prompt, generator, latents, clip_skip, cross_attention_kwargs, output_type)
        self._guidance_scale, self._guidance_rescale = guidance_scale, guidance_rescale
        self._clip_skip, self._cross_attention_kwargs, self._interrupt = clip_skip, cross_attention_kwargs, False
        device = self._execution_device

        # 1. Text conditioning: [negative; prompt] under classifier-free guidance.
        prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask, clip_skip,
        )
        num_images = len(prompt_embeds)
        attention_mask = _unet_attention_mask(prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                                              negative_prompt_attention_mask)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 2. Timesteps and initial noise.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps,
                                                            sigmas)
        self._check_timesteps(timesteps, num_inference_steps)
        latents = self.prepare_latents(num_images, self.unet.config.in_channels, height, width, prompt_embeds.dtype,
                                       device, generator, latents)

        # 3. Denoise.
        latents = self._denoise(latents, timesteps, num_inference_steps, prompt_embeds, negative_prompt_embeds,
                                attention_mask, self.prepare_extra_step_kwargs(generator, eta), callback_on_step_end,
                                callback_on_step_end_tensor_inputs)

        # 4. Decode, check, convert.
        images, nsfw = self._postprocess(latents, output_type, device, prompt_embeds.dtype)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw
        return VisCPMPaintPipelineOutput(images=images, nsfw_content_detected=nsfw)

    def _postprocess(self, latents: torch.Tensor, output_type: str, device, dtype):
        """``(images, nsfw_content_detected)``: decoded, checked by the safety checker, as ``output_type``."""
        self._check_finite("denoised latents", bool(torch.isfinite(latents).all()), latents.dtype)
        if output_type == "latent":
            return latents, [None] * len(latents)
        images = self.decode_latents(latents)
        self._check_finite("decoded images", bool(np.isfinite(images).all()), self.vae.dtype)
        images, nsfw = self.run_safety_checker(images, device, dtype)
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        elif output_type == "pt":
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        return images, nsfw

    def _check_finite(self, what: str, finite: bool, dtype):
        """A NaN or inf result is an error, not a black or noisy image."""
        if not finite:
            raise ValueError(
                f"the {what} contain NaN or inf: guidance_scale={self.guidance_scale:g} (or a callback) drove them out "
                f"of {dtype}'s range; use a guidance_scale of about 1 to 20"
            )

    def _denoise(self, latents, timesteps, num_inference_steps, prompt_embeds, negative_prompt_embeds, attention_mask,
                 extra_step_kwargs, callback, callback_inputs) -> torch.Tensor:
        """The denoising loop: the UNet on ``[uncond, cond]`` latents under guidance, a scheduler step, then
        ``callback`` (which may replace the latents and the conditioning)."""
        self._num_timesteps = len(timesteps)
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(
                    model_input, t, encoder_hidden_states=prompt_embeds,
                    encoder_attention_mask=_rows_for(attention_mask, prompt_embeds),
                    cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                    if self.guidance_rescale > 0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=self.guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                               "negative_prompt_embeds": negative_prompt_embeds}
                    outputs = callback(self, i, t, {name: tensors[name] for name in callback_inputs}) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    if "negative_prompt_embeds" in outputs:  # the uncond half of the conditioning batch
                        negative_prompt_embeds = outputs.pop("negative_prompt_embeds")
                        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds[len(negative_prompt_embeds):]])
                if i == len(timesteps) - 1 or (i + 1 > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        return latents


def _unet_attention_mask(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask):
    """The UNet's ``encoder_attention_mask`` for the conditioning batch (``[negative; prompt]`` under guidance), or
    None when it attends to every position (then the UNet runs exactly as without a mask)."""
    rows = [(prompt_embeds, prompt_attention_mask)]
    if negative_prompt_embeds is not None:
        rows.insert(0, (negative_prompt_embeds, negative_prompt_attention_mask))
    if all(mask is None for _, mask in rows):
        return None
    mask = torch.cat([torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else
                      mask.to(device=embeds.device, dtype=torch.long) for embeds, mask in rows])
    return None if bool(mask.all()) else mask


def _rows_for(attention_mask, prompt_embeds):
    """The mask rows of the conditioning batch ``prompt_embeds``: a callback that turns guidance off mid-way keeps
    its last rows (the prompts'), as diffusers' ``SDCFGCutoffCallback`` does."""
    if attention_mask is None or attention_mask.shape[0] == prompt_embeds.shape[0]:
        return attention_mask
    if attention_mask.shape[0] < prompt_embeds.shape[0] or attention_mask.shape[1] != prompt_embeds.shape[1]:
        raise ValueError(f"the callback returned `prompt_embeds` of shape {tuple(prompt_embeds.shape)}, which the "
                         f"attention mask {tuple(attention_mask.shape)} does not cover; keep rows and positions")
    return attention_mask[-prompt_embeds.shape[0]:]


def prompt_list(prompt) -> list[str]:
    """``prompt`` (a str or a list of str) as a list, refusing what cannot be drawn: another type, an empty list, a
    blank text."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(text, str) for text in prompts):
        raise TypeError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError("`prompt` is an empty list: nothing to draw")
    for index, text in enumerate(prompts):
        if not text.strip():
            raise ValueError(f"prompt {index} is empty: describe the image to draw")
    return list(prompts)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require_int(name: str, value, minimum: int, hint: str):
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an int ({hint}), got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum} ({hint}), got {value}")


def _require_number(name: str, value, low: float | None = None, high: float | None = None, hint: str = ""):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number ({hint}), got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must be a finite number ({hint}), got {value}")


def _require_finite(name: str, tensor: torch.Tensor):
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"`{name}` contains NaN or inf values: pass finite values")


def _labels(name: str, texts: list[str]) -> list[str]:
    """How errors name ``texts``: ``prompt`` alone, or ``prompt[i]`` in a batch."""
    return [f"`{name}`"] if len(texts) == 1 else [f"`{name}[{i}]`" for i in range(len(texts))]


def _pair_lengths(lengths: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """Per prompt, the longer of it and its negative (the first ``num_negatives`` of ``lengths``, if any)."""
    if not num_negatives:
        return lengths
    return torch.maximum(lengths[:num_negatives], lengths[num_negatives:])


def _positions_below(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``[len(lengths), size]``: 1 at the positions before each length."""
    return (torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]).long()


def _repeat(tensor: torch.Tensor | None, times: int, device, dtype=None) -> torch.Tensor | None:
    """Each row ``times`` times in a row (images of one prompt are consecutive), on ``device`` (and ``dtype``)."""
    if tensor is None:
        return None
    return tensor.to(device=device, dtype=dtype).repeat_interleave(times, dim=0)


class _PromptCache:
    """Text conditionings and lengths by (texts, padded length, clip_skip, device), least recently used first out;
    every entry belongs to the text encoder state recorded by the last `validate`."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.entries: OrderedDict = OrderedDict()
        self._refs: list = []
        self._signature = None

    def validate(self, text_encoder, tokenizer) -> bool:
        """Empty the cache if the text encoder changed since the entries were made; False: do not cache now."""
        tensors, adapters = [], []
        for name, module in text_encoder.named_modules(remove_duplicate=False):
            if module.training:  # dropout: the conditioning is not a function of the texts
                return False
            tensors += module._parameters.values()
            tensors += module._buffers.values()
            if isinstance(getattr(module, "disable_adapters", None), bool):  # a peft layer or wrapper
                adapters.append((name, tuple(module.active_adapters), module.disable_adapters,
                                 tuple(getattr(module, "merged_adapters", ())),
                                 repr(sorted(getattr(module, "scaling", {}).items()))))
        tensors = [tensor for tensor in tensors if tensor is not None]
        try:
            versions = tuple((tensor._version, tensor.dtype, tensor.shape) for tensor in tensors)
        except RuntimeError:  # inference tensors keep no version counter: edits could not be seen
            return False
        owners = [text_encoder, tokenizer, *tensors]
        signature = (versions, tuple(adapters))
        if signature != self._signature or len(owners) != len(self._refs) or any(
                ref() is not owner for ref, owner in zip(self._refs, owners)):
            self.entries.clear()
            self._refs = [weakref.ref(owner) for owner in owners]
            self._signature = signature
        return True

    def get(self, key) -> tuple | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key, entry: tuple):
        self.entries[key] = entry
        while len(self.entries) > self.max_size:
            self.entries.popitem(last=False)


__all__ = ["VisCPMPaintPipeline", "VisCPMPaintPipelineOutput"]
