"""Paint language adapters: the model `Trainer` trains, adding the adapters, saving and loading them.

LoRA goes on the text encoder's CPM-Bee projections (and optionally on the UNet's cross-attention); the VAE and every
base weight stay frozen. A Paint adapter folder holds ``text_encoder/`` (and ``unet/``) peft folders plus a model card,
and is put into a `VisCPMPaintPipeline` in place.
"""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .chat import LORA_TARGET_MODULES, adapter_folder_writer, language_adapter_config, write_card, write_peft_folder

UNET_CROSS_ATTENTION_TARGETS = r".*attn2\.(?:to_q|to_k|to_v|to_out\.0)"
"""peft target regex for the UNet's cross-attention (the layers that read the text)."""

AdapterKeys = namedtuple("AdapterKeys", ["missing_keys", "unexpected_keys"])


class PaintAdapterModel(nn.Module):
    """What `Trainer` trains for a Paint adapter: the original's objective (``SDWrapper.forward``): VAE latents
    (a sample of the posterior, times the scaling factor), Gaussian noise, a uniform random timestep per image, the
    UNet's prediction from the noisy latents and the text encoder's conditioning, MSE against the noise (against
    the velocity for a ``v_prediction`` scheduler). Random draws in the original's order: latents, noise, steps.

    Its state (``state_dict`` / ``load_state_dict``) is the adapters' weights only: the frozen base belongs to the
    pipeline, so `Trainer` checkpoints and resumes the adapters without copying the 10B base into every checkpoint.
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module, noise_scheduler):
        super().__init__()
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.noise_scheduler = noise_scheduler
        self.vae.requires_grad_(False)

    def forward(self, pixel_values, input_ids, attention_mask=None, segment_ids=None, context_mask=None,
                segment_rel=None, ext_table_ids=None, ext_table_sub=None, **unused):
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(vae_dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        conditioning = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, segment_ids=segment_ids, context_mask=context_mask,
            segment_rel=segment_rel, ext_table_ids=ext_table_ids, ext_table_sub=ext_table_sub,
        ).last_hidden_state
        unet_dtype = next(self.unet.parameters()).dtype
        prediction = self.unet(noisy.to(unet_dtype), timesteps, conditioning.to(unet_dtype)).sample
        kind = getattr(self.noise_scheduler.config, "prediction_type", "epsilon")
        target = noise if kind == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return {"loss": F.mse_loss(prediction.float(), target.float(), reduction="mean")}

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """What `Trainer` calls for ``activation_checkpointing=True``: checkpoint CPM-Bee's layers and the UNet's."""
        self.text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                          **kwargs)
        if hasattr(self.unet, "enable_gradient_checkpointing"):
            self.unet.enable_gradient_checkpointing()

    def enable_input_require_grads(self):
        """Frozen embeddings give no grad to checkpointed blocks' inputs; make the text encoder's require it."""
        self.text_encoder.enable_input_require_grads()

    def peft_models(self) -> dict:
        """The parts holding adapters: ``{"text_encoder": PeftModel[, "unet": PeftModel]}``."""
        from peft import PeftModel

        return {name: part for name, part in (("text_encoder", self.text_encoder), ("unet", self.unet))
                if isinstance(part, PeftModel)}

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """The LoRA weights of the parts, under their names in this module."""
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [key for key in state if key.startswith(prefix) and ".lora_" not in key[len(prefix):]]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load what :meth:`state_dict` gives; missing and unexpected keys are counted against the adapters only."""
        expected = set(self.state_dict())
        keys = AdapterKeys(sorted(expected - set(state_dict)), sorted(set(state_dict) - expected))
        if strict and (keys.missing_keys or keys.unexpected_keys):
            raise RuntimeError(f"the adapter weights do not fit this Paint adapter: missing {keys.missing_keys[:3]}, "
                               f"unexpected {keys.unexpected_keys[:3]}")
        super().load_state_dict(state_dict, strict=False, assign=assign)
        return keys


def add_paint_adapter(pipeline, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                      target_modules: Sequence[str] = LORA_TARGET_MODULES, train_unet_cross_attention: bool = False,
                      unet_r: int | None = None) -> PaintAdapterModel:
    """A trainable :class:`PaintAdapterModel` over a `VisCPMPaintPipeline`'s parts: LoRA on the text encoder's
    CPM-Bee projections, and optionally on the UNet's cross-attention (``train_unet_cross_attention``)."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig, get_peft_model

    text_encoder = get_peft_model(pipeline.text_encoder, language_adapter_config(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules))
    unet = pipeline.unet
    unet.requires_grad_(False)
    if train_unet_cross_attention:
        unet = get_peft_model(unet, LoraConfig(r=unet_r or r, lora_alpha=lora_alpha if unet_r is None else unet_r * 2,
                                               lora_dropout=lora_dropout, target_modules=UNET_CROSS_ATTENTION_TARGETS))
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)  # the original trains with DDPM's noising
    return PaintAdapterModel(text_encoder, unet, pipeline.vae, noise_scheduler)


def write_paint_adapter(model: PaintAdapterModel, folder: str | os.PathLike, language: str | None = None,
                        base_model: str | None = None) -> Path:
    """Write the Paint adapter folder layout into ``folder`` (not atomic: see :func:`save_paint_adapter`)."""
    folder = Path(folder)
    for name, part in model.peft_models().items():
        write_peft_folder(part, folder / name, language=language, base_model=base_model, what=f"VisCPM-Paint {name}")
    write_card(folder, base_model, language, "VisCPM-Paint")
    return folder


def save_paint_adapter(model: PaintAdapterModel, output_dir: str | os.PathLike, language: str | None = None,
                       base_model: str | None = None) -> Path:
    """A Paint adapter folder: ``text_encoder/`` (and ``unet/``) peft folders plus a top-level model card, replacing
    the adapter ``output_dir`` held all at once (see `adapter_folder_writer`)."""
    with adapter_folder_writer(output_dir) as staging:
        write_paint_adapter(model, staging, language=language, base_model=base_model)
    return Path(output_dir)


def load_paint_adapter(pipeline, path: str | os.PathLike, adapter_name: str = "default"):
    """Put the adapter of a Paint adapter folder into a pipeline's text encoder (and UNet), in place: the pipeline
    keeps its components (now with LoRA layers, active) and runs the adapted model. Returns the `PeftModel`s."""
    from peft import PeftModel

    path = Path(path).expanduser()
    parts = {name: path / name for name in ("text_encoder", "unet") if (path / name / "adapter_config.json").is_file()}
    if "text_encoder" not in parts:
        if path.exists():
            raise FileNotFoundError(f"{path} is not a Paint adapter folder (no text_encoder/adapter_config.json)")
        from huggingface_hub import snapshot_download

        return load_paint_adapter(pipeline, snapshot_download(str(path)), adapter_name)
    loaded = {}
    for name, folder in parts.items():
        loaded[name] = PeftModel.from_pretrained(getattr(pipeline, name), str(folder), adapter_name=adapter_name)
    return loaded
