"""Paint language adapters: the model `Trainer` trains, adding the adapters, saving and loading them; and the
text-feature cache of the stages that keep CPM-Bee frozen.

LoRA goes on the text encoder's CPM-Bee projections (and optionally on the UNet's cross-attention); the VAE and every
base weight stay frozen. A Paint adapter folder holds ``text_encoder/`` (and ``unet/``) peft folders plus a model card,
and is put into a `VisCPMPaintPipeline` in place.

The text-feature cache (:func:`text_feature_cache`: :func:`load_text_features` or :func:`cache_text_features`): ``paint-align`` trains the bridge
(``trans_block``: ``projection`` + ``layer_norm``) and the UNet's cross-attention with CPM-Bee frozen, so CPM-Bee's
output for each caption (``text_hidden_state``, before the bridge) is computed once, stored on disk next to the
examples, and training applies the bridge to it instead of running CPM-Bee.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .chat import LORA_TARGET_MODULES, adapter_folder_writer, language_adapter_config, write_card, write_peft_folder
from .data import TEXT_KEYS, AdapterError, PaintAdapterCollator, cache_key, collate_text_features

UNET_CROSS_ATTENTION_TARGETS = r".*attn2\.(?:to_q|to_k|to_v|to_out\.0)"
"""peft target regex for the UNet's cross-attention (the layers that read the text)."""

logger = logging.getLogger(__name__)

AdapterKeys = namedtuple("AdapterKeys", ["missing_keys", "unexpected_keys"])


class PaintAdapterModel(nn.Module):
    """What `Trainer` trains for a Paint adapter: the original's objective (``SDWrapper.forward``): VAE latents
    (a sample of the posterior, times the scaling factor), Gaussian noise, a uniform random timestep per image, the
    UNet's prediction from the noisy latents and the text encoder's conditioning, MSE against the noise (against
    the velocity for a ``v_prediction`` scheduler). Random draws in the original's order: latents, noise, steps.

    Its state (``state_dict`` / ``load_state_dict``) is the adapters' weights only: the frozen base belongs to the
    pipeline, so `Trainer` checkpoints and resumes the adapters without copying the 10B base into every checkpoint.

    Batches of a text-feature cache carry ``text_states`` (CPM-Bee's cached output): then CPM-Bee is not run, only
    the bridge (see :meth:`text_conditioning`).
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module, noise_scheduler):
        super().__init__()
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.noise_scheduler = noise_scheduler
        self.vae.requires_grad_(False)

    def forward(self, pixel_values, input_ids=None, attention_mask=None, segment_ids=None, context_mask=None,
                segment_rel=None, ext_table_ids=None, ext_table_sub=None, text_states=None, **unused):
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(vae_dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        conditioning = self.text_conditioning(
            text_states, input_ids=input_ids, attention_mask=attention_mask, segment_ids=segment_ids,
            context_mask=context_mask, segment_rel=segment_rel, ext_table_ids=ext_table_ids,
            ext_table_sub=ext_table_sub)
        unet_dtype = next(self.unet.parameters()).dtype
        prediction = self.unet(noisy.to(unet_dtype), timesteps, conditioning.to(unet_dtype)).sample
        kind = getattr(self.noise_scheduler.config, "prediction_type", "epsilon")
        target = noise if kind == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return {"loss": F.mse_loss(prediction.float(), target.float(), reduction="mean")}

    def text_conditioning(self, text_states: torch.Tensor | None = None, **text_inputs) -> torch.Tensor:
        """The UNet's conditioning: the text encoder's output for ``text_inputs``, or, given CPM-Bee's cached states
        ``text_states`` (``[batch, seq, hidden]``), the bridge applied to them, CPM-Bee not run. The cache stands
        for CPM-Bee only while CPM-Bee is frozen: a text encoder that trains more than its bridge is refused."""
        if text_states is None:
            return self.text_encoder(**text_inputs).last_hidden_state
        bridge = _bridge_parameter_ids(self.text_encoder)
        trained = [name for name, p in self.text_encoder.named_parameters() if p.requires_grad and id(p) not in bridge]
        if trained:
            raise AdapterError(f"cached text features stand for a frozen CPM-Bee, and this run trains it (e.g. "
                               f"{trained[0]}): train without the cache, or keep CPM-Bee frozen (paint-align)")
        weight = self.text_encoder.projection.weight
        return self.text_encoder.bridge(text_states.to(weight.device, weight.dtype))

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


# ---------------------------------------------------------------------------------------------------------------------
# The text-feature cache
# ---------------------------------------------------------------------------------------------------------------------

TEXT_CACHE_RECORD = "text_features.json"
"""The cache folder's record: what the cache was built from (its key), written last."""
TEXT_CACHE_DATA = "text_features.arrow"
TEXT_CACHE_PAD = "pad_state.safetensors"
_TEXT_CACHE_FORMAT = 1


def _bridge_parameter_ids(text_encoder) -> set[int]:
    """The parameters of the text encoder's bridge (``projection`` + ``layer_norm``, the original's ``trans_block``):
    what a Paint stage may train while the cache stands for the rest."""
    return {id(p) for module in (text_encoder.projection, text_encoder.layer_norm) for p in module.parameters()}


def text_encoder_fingerprint(text_encoder) -> str:
    """A cheap identity of what the cache stands for: the text encoder without its bridge (its config, minus paths
    and versions; every CPM-Bee tensor's name, shape, dtype and a strided sample of up to 1024 of its values; the
    modeling code). Any other checkpoint, dtype or fine-tune of CPM-Bee gives another one; hashing all 10B weights
    would take minutes."""
    from datasets.fingerprint import Hasher

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items())
                    if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
        return value

    bridge = _bridge_parameter_ids(text_encoder)
    tensors = []
    for name, param in text_encoder.named_parameters():
        if id(param) in bridge:
            continue
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu().numpy()
        tensors.append((name, tuple(param.shape), str(param.dtype), hashlib.sha256(sample.tobytes()).hexdigest()))
    base = text_encoder.get_base_model() if hasattr(text_encoder, "get_base_model") else text_encoder
    sources = sorted({Path(inspect.getsourcefile(cls)).read_text(encoding="utf-8")
                      for cls in (type(base), type(base.model))})
    return Hasher.hash([clean(json.loads(base.config.to_json_string(use_diff=False))), tensors, sources])


def examples_digest(examples) -> str:
    """The identity of the examples a cache was built from: a hash of every example, in order (all columns)."""
    from datasets.fingerprint import Hasher

    digest = hashlib.sha256()
    for batch in examples.iter(batch_size=256):
        for values in zip(*batch.values()):
            digest.update(Hasher.hash(dict(zip(batch, values))).encode())
    return digest.hexdigest()


@dataclass
class TextFeatureCache:
    """A loaded text-feature cache: ``dataset`` (the examples, each with its ``text_states``: train on it in place
    of the examples), ``pad_state`` (CPM-Bee's state at a padded position) and the ``folder`` it lives in."""

    folder: Path
    dataset: object
    pad_state: torch.Tensor

    def collator(self, tokenizer, resolution: int = 512, random_flip: bool = False) -> PaintAdapterCollator:
        """The Paint collator for the cached examples (it pads their states with :attr:`pad_state`)."""
        return PaintAdapterCollator(tokenizer, resolution, random_flip, text_pad_state=self.pad_state)


def _encode_states(text_encoder, tokenizer, rows: list[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """CPM-Bee's states (``text_hidden_state``, before the bridge) of each row, unpadded, and those of the batch's
    padded positions: the batch is padded one position past its longest row, so that every batch has some."""
    batch = collate_text_features(rows, tokenizer.ext_offset, tokenizer.pad_token_id, keys=TEXT_KEYS[:-1])
    for key, fill in (("input_ids", tokenizer.pad_token_id), ("segment_ids", 0), ("context_mask", 0),
                      ("attention_mask", 0)):
        batch[key] = F.pad(batch[key], (0, 1), value=fill)
    device = next(text_encoder.parameters()).device
    states = text_encoder(**{key: value.to(device) for key, value in batch.items()}).text_hidden_state
    lengths = [len(row["input_ids"]) for row in rows]
    pads = torch.cat([states[i, n:] for i, n in enumerate(lengths)])
    return [states[i, :n] for i, n in enumerate(lengths)], pads


def cache_text_features(examples, text_encoder, tokenizer, folder: str | os.PathLike, batch_size: int = 16,
                        overwrite: bool = False) -> TextFeatureCache:
    """Run the frozen CPM-Bee of ``text_encoder`` once over ``examples`` (:func:`prepare_paint_dataset`'s, map-style
    or streamed) and write them with their states to ``folder``: an Arrow file (memory-mapped when read, so a corpus
    larger than memory is fine), the padding's state, and a record keyed like ``data.cache_key`` (the tokenizer,
    :func:`text_encoder_fingerprint`, :func:`examples_digest`), written last. CPM-Bee runs in eval mode, without
    gradients; the states are stored in float32 (float16 for a float16 model): exact.

    ``folder`` must be new or empty, or hold a text-feature cache and ``overwrite`` be given (it is replaced all at
    once). Returns the loaded cache."""
    from datasets import Array2D, Features
    from datasets.arrow_writer import ArrowWriter
    from datasets.fingerprint import Hasher
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    entries = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
    if entries and not (overwrite and (folder / TEXT_CACHE_RECORD).is_file()):
        raise AdapterError(f"{folder} is not empty (it holds {', '.join(entries[:3])}): give a new folder"
                           + (", or overwrite=True to replace the text-feature cache there" if
                              (folder / TEXT_CACHE_RECORD).is_file() else " for the text-feature cache"))
    if examples.features is None or "input_ids" not in examples.features or "labels" in examples.features:
        raise AdapterError("cache_text_features takes Paint examples (prepare_paint_dataset's or "
                           "prepare_stage_dataset('paint-align', ...)'s)")
    dtype = next(text_encoder.parameters()).dtype
    stored = "float16" if dtype == torch.float16 else "float32"
    hidden = text_encoder.projection.in_features
    features = Features({**examples.features, "text_states": Array2D(shape=(None, hidden), dtype=stored)})
    was_training, pad_state, digest, count = text_encoder.training, None, hashlib.sha256(), 0
    text_encoder.eval()
    try:
        with adapter_folder_writer(folder) as staging, torch.no_grad():
            with ArrowWriter(features=features, path=str(staging / TEXT_CACHE_DATA)) as writer:
                for batch in examples.iter(batch_size=batch_size):
                    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
                    states, pads = _encode_states(text_encoder, tokenizer, rows)
                    pad_state = pads[0] if pad_state is None else pad_state
                    if not torch.allclose(pads, pad_state.expand_as(pads), rtol=1e-4, atol=1e-5):
                        raise AdapterError("CPM-Bee's states at padded positions differ between positions, so one "
                                           "cached padding state cannot stand for them: train without the cache")
                    for row, state in zip(rows, states):
                        digest.update(Hasher.hash(row).encode())
                        writer.write({**row, "text_states": state.to(getattr(torch, stored)).cpu().numpy()})
                    count += len(rows)
                writer.finalize()
            if pad_state is None:
                raise AdapterError("no examples to cache: prepare the Paint examples first")
            save_file({"pad_state": pad_state.float().cpu().contiguous()}, str(staging / TEXT_CACHE_PAD))
            record = {"format": _TEXT_CACHE_FORMAT, "tokenizer": cache_key(tokenizer),
                      "text_encoder": text_encoder_fingerprint(text_encoder), "examples": digest.hexdigest(),
                      "num_examples": count, "hidden_size": hidden, "dtype": stored}
            (staging / TEXT_CACHE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    finally:
        text_encoder.train(was_training)
    return load_text_features(folder, text_encoder, tokenizer)


def load_text_features(folder: str | os.PathLike, text_encoder, tokenizer, examples=None) -> TextFeatureCache:
    """The text-feature cache in ``folder``, after checking that it stands for this ``text_encoder`` (CPM-Bee's
    weights, config, dtype, code) and ``tokenizer``, and, when ``examples`` are given, that it was built from exactly
    them (a cache of other rows, or of rows prepared otherwise, is stale). Each mismatch is an `AdapterError` that
    says to rebuild it with :func:`cache_text_features`."""
    import datasets
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    path = folder / TEXT_CACHE_RECORD
    rebuild = "rebuild it with cache_text_features(examples, text_encoder, tokenizer, folder, overwrite=True)"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{folder} is not a Paint text-feature cache (no {TEXT_CACHE_RECORD}): build one with "
                           "cache_text_features()") from None
    except (OSError, ValueError) as error:
        raise AdapterError(f"{path} is corrupt ({error}): {rebuild}") from None
    if not isinstance(record, dict) or record.get("format") != _TEXT_CACHE_FORMAT:
        raise AdapterError(f"{folder} holds a text-feature cache of another format: {rebuild}")
    if record.get("tokenizer") != cache_key(tokenizer):
        raise AdapterError(f"the text-feature cache in {folder} was built with another tokenizer (or another version "
                           f"of the tokenization code): {rebuild}")
    if record.get("text_encoder") != text_encoder_fingerprint(text_encoder):
        raise AdapterError(f"the text-feature cache in {folder} was built for another text encoder (CPM-Bee's "
                           f"weights, config, dtype or code differ): its features are not this model's; {rebuild}")
    if examples is not None and record.get("examples") != examples_digest(examples):
        raise AdapterError(f"the text-feature cache in {folder} is stale: it was built from other training examples "
                           f"(the rows or their preparation changed since); {rebuild}")
    try:
        dataset = datasets.Dataset.from_file(str(folder / TEXT_CACHE_DATA))
        pad_state = load_file(str(folder / TEXT_CACHE_PAD))["pad_state"]
    except (OSError, ValueError, KeyError) as error:
        raise AdapterError(f"the text-feature cache in {folder} is incomplete or corrupt ({error}): "
                           f"{rebuild}") from None
    if len(dataset) != record.get("num_examples"):
        raise AdapterError(f"the text-feature cache in {folder} holds {len(dataset)} examples, its record "
                           f"{record.get('num_examples')}: {rebuild}")
    dataset = dataset.with_format("numpy", columns=["text_states"], output_all_columns=True)
    return TextFeatureCache(folder, dataset, pad_state)


def text_feature_cache(examples, text_encoder, tokenizer, folder: str | os.PathLike,
                       batch_size: int = 16) -> TextFeatureCache:
    """The text-feature cache of ``examples`` in ``folder``, as ``--text-feature-cache`` uses it: loaded when it
    stands for these examples, this text encoder and tokenizer (:func:`load_text_features`), built when the folder is
    new or empty, rebuilt (a warning says why) when the cache there is of other examples or another model. A folder
    that holds anything but a cache is refused, untouched."""
    folder = Path(folder).expanduser()
    if (folder / TEXT_CACHE_RECORD).is_file():
        try:
            return load_text_features(folder, text_encoder, tokenizer, examples=examples)
        except AdapterError as error:
            logger.warning("rebuilding the text-feature cache: %s", str(error).split(": rebuild it")[0])
        return cache_text_features(examples, text_encoder, tokenizer, folder, batch_size, overwrite=True)
    return cache_text_features(examples, text_encoder, tokenizer, folder, batch_size)
