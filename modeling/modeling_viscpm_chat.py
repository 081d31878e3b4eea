"""VisCPM-Chat: a BEiT-3 vision encoder feeding 64 learned query outputs into CPM-Bee, as a transformers model.

How image and text meet (the original's order of operations, see REFERENCE.md):

* the image is cut into patches, a class token is put in front, and the `query_num` learned query tokens are
  appended behind; BEiT-3 runs over the joint sequence with two experts per weight (one for the image part,
  one for the query part: the *multiway* layout), sub-LN blocks, and per-part position tables counted from 2;
* the outputs at the query positions go through ``Linear -> GELU -> Linear`` into CPM-Bee's width;
* the prompt holds ``query_num`` ``<unk>`` slots (the ``"image"`` entry of the CPM-Bee dict); their input
  embeddings are replaced by the mapped query outputs, and CPM-Bee runs on the result.

The vision states are computed once per prompt (the prefill step) and can be handed back in later turns as
``vision_hidden_states`` so the image is not encoded again.
"""

from collections.abc import Callable
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_viscpm_chat import VisCPMChatConfig, VisCPMVisionConfig
from .generation_cpmbee import (
    PROMPT_KEYS,
    OriginalSearch,
    add_vocab_rule,
    check_generation_config,
    check_input_tensors,
    cpmbee_beam_search,
    default_answer_segments,
    prompt_inputs,
    run_beam_search,
)
from .modeling_cpmbee import CpmBeeForCausalLM, output_flags

# BEiT-3 numbers positions from 2 (a fairseq convention); rows 0 and 1 of both position tables are never used.
POSITION_OFFSET = 2


def _input_device(weight: torch.Tensor) -> torch.device | None:
    """The device to move a module's inputs to: its weight's, or None when accelerate offloaded the weight (a meta
    placeholder until the module runs), since the module's hook then moves the inputs itself."""
    return None if weight.device.type == "meta" else weight.device


# --------------------------------------------------------------------------------------------------------------
# Vision encoder (BEiT-3, multiway)
# --------------------------------------------------------------------------------------------------------------


class VisCPMMultiway(nn.Module):
    """Two copies of a token-wise module: ``image`` for the image tokens, ``query`` for the query tokens.

    The two parts of the sequence are kept as separate tensors, so each expert sees only its own tokens;
    either part may be ``None`` (an image encoded without queries; image outputs nobody reads).
    """

    def __init__(self, image: nn.Module, query: nn.Module):
        super().__init__()
        self.image = image
        self.query = query

    @classmethod
    def of(cls, make: Callable[[], nn.Module]) -> "VisCPMMultiway":
        """Two independent instances of ``make()``."""
        return cls(make(), make())

    def forward(self, image_states: torch.Tensor | None, query_states: torch.Tensor | None):
        return (None if image_states is None else self.image(image_states),
                None if query_states is None else self.query(query_states))


class VisCPMVisionEmbeddings(nn.Module):
    """Patch embedding with a class token in front, plus the position embedding of each part."""

    def __init__(self, config: VisCPMVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.num_image_tokens = config.num_patches + 1
        self.position_embedding = VisCPMMultiway(
            nn.Embedding(self.num_image_tokens + POSITION_OFFSET, config.hidden_size),
            nn.Embedding(config.max_query_positions, config.hidden_size),
        )

    def forward(
        self, pixel_values: torch.Tensor, query_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = self.config.image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [batch, {self.config.num_channels}, {size}, {size}], got "
                f"{list(pixel_values.shape)}"
            )
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but the vision encoder takes "
                f"{size}x{size} images (use the model's image processor)"
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(device=_input_device(weight), dtype=weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        image_states = torch.cat([cls, patches], dim=1)
        # Position rows are looked up through the modules (not sliced from `.weight`), so offloaded tables load.
        positions = torch.arange(POSITION_OFFSET, POSITION_OFFSET + image_states.shape[1], device=image_states.device)
        image_states = image_states + self.position_embedding.image(positions)
        if query_embeds is None:
            return image_states, None
        count = query_embeds.shape[1]
        if count + POSITION_OFFSET > self.position_embedding.query.num_embeddings:
            raise ValueError(
                f"{count} query tokens do not fit the {self.position_embedding.query.num_embeddings} query positions"
            )
        positions = torch.arange(POSITION_OFFSET, POSITION_OFFSET + count, device=image_states.device)
        query_states = query_embeds.to(image_states.dtype) + self.position_embedding.query(positions)
        return image_states, query_states


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """Full (unmasked) attention; the query is scaled before the product and the softmax runs in float32."""
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


class VisCPMVisionAttention(nn.Module):
    """Joint self-attention over both parts, with per-part projections and a LayerNorm before the output
    projection (BEiT-3's sub-LN)."""

    def __init__(self, config: VisCPMVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        dim = config.hidden_size

        def linear():
            return nn.Linear(dim, dim, bias=True)

        self.q_proj = VisCPMMultiway.of(linear)
        self.k_proj = VisCPMMultiway.of(linear)
        self.v_proj = VisCPMMultiway.of(linear)
        self.inner_norm = VisCPMMultiway.of(lambda: nn.LayerNorm(dim, eps=config.layer_norm_eps))
        self.o_proj = VisCPMMultiway.of(linear)

    def _heads(self, projection: VisCPMMultiway, image_states, query_states) -> torch.Tensor:
        parts = [part for part in projection(image_states, query_states) if part is not None]
        states = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return states.view(states.shape[0], states.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, image_states: torch.Tensor, query_states: torch.Tensor | None, image_outputs: bool = True,
                output_attentions: bool = False):
        """Both parts attend to both parts. ``image_outputs=False`` computes the query part's outputs only (the
        image part is ``None``): the image tokens then serve as keys and values only."""
        query = self._heads(self.q_proj, image_states if image_outputs else None, query_states)
        key = self._heads(self.k_proj, image_states, query_states)
        value = self._heads(self.v_proj, image_states, query_states)
        # The fused kernels do not return the probabilities: asked for, they come from the eager path.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention(
            self, query, key, value, None, dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling, is_causal=False,
        )
        output = output.reshape(output.shape[0], output.shape[1], -1)
        split = image_states.shape[1] if image_outputs else 0
        image_out = output[:, :split] if image_outputs else None
        query_out = output[:, split:] if query_states is not None else None
        return self.o_proj(*self.inner_norm(image_out, query_out)), weights


class VisCPMVisionMLP(nn.Module):
    """``fc2(norm(act(fc1(x))))``: BEiT-3's sub-LN feed-forward; the activation (``config.hidden_act``, GELU in
    the released model) is computed in float32."""

    def __init__(self, config: VisCPMVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.inner_norm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        hidden_states = self.act(hidden_states.float()).to(hidden_states.dtype)
        return self.fc2(self.inner_norm(hidden_states))


class VisCPMVisionLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, every module per part."""

    def __init__(self, config: VisCPMVisionConfig):
        super().__init__()
        self.attention_norm = VisCPMMultiway.of(lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.attention = VisCPMVisionAttention(config)
        self.mlp_norm = VisCPMMultiway.of(lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.mlp = VisCPMMultiway.of(lambda: VisCPMVisionMLP(config))

    @staticmethod
    def _add(residual, update):
        return tuple(None if r is None else r + u for r, u in zip(residual, update))

    def forward(self, image_states: torch.Tensor, query_states: torch.Tensor | None = None, image_outputs: bool = True,
                output_attentions: bool = False):
        """``(image_states, query_states, attention probabilities or None)``; with ``image_outputs=False`` the image
        part only provides keys and values, and comes out as ``None``."""
        attended, weights = self.attention(*self.attention_norm(image_states, query_states), image_outputs=image_outputs,
                                           output_attentions=output_attentions)
        states = self._add((image_states if image_outputs else None, query_states), attended)
        states = self._add(states, self.mlp(*self.mlp_norm(*states)))
        return (*states, weights)


@dataclass
class VisCPMVisionModelOutput(ModelOutput):
    """
    last_hidden_state (`[batch, 1 + num_patches (+ queries), hidden]`): the final states of the class token, the
        patches and (when queries were given) the queries, after the final LayerNorm of each part.
    query_hidden_states (`[batch, queries, hidden]`, *optional*): the query part of `last_hidden_state`.
    hidden_states (`tuple`, *optional*): the joint sequence after the embeddings and after each layer.
    attentions (`tuple`, *optional*): each layer's attention probabilities ``[batch, heads, q, k]``.
    """

    last_hidden_state: torch.FloatTensor | None = None
    query_hidden_states: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class VisCPMVisionPreTrainedModel(PreTrainedModel):
    config_class = VisCPMVisionConfig
    config: VisCPMVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisCPMVisionEmbeddings", "VisCPMVisionLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, VisCPMVisionEmbeddings):
            nn.init.normal_(module.cls_token, mean=0.0, std=std)


class VisCPMVisionModel(VisCPMVisionPreTrainedModel):
    """The BEiT-3 multiway encoder of VisCPM-Chat: image patches (expert ``image``) and optional query tokens
    appended behind them (expert ``query``), read jointly."""

    def __init__(self, config: VisCPMVisionConfig):
        super().__init__(config)
        self.embeddings = VisCPMVisionEmbeddings(config)
        self.layers = nn.ModuleList(VisCPMVisionLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = VisCPMMultiway.of(lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        query_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        image_outputs: bool = True,
    ) -> VisCPMVisionModelOutput | tuple:
        r"""
        pixel_values (`[batch, channels, image_size, image_size]`): normalised images.
        query_embeds (`[batch, queries, hidden]` or `[queries, hidden]`, *optional*): tokens read behind the
            image with the query expert (VisCPM-Chat's learned queries).
        image_outputs (`bool`, defaults to `True`): with ``False`` (and queries), the last layer computes the
            query outputs only, and `last_hidden_state` holds the queries: what VisCPM-Chat reads. The last layer's
            image-output weights and the image post-norm are then not used.
        """
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        if query_embeds is not None and query_embeds.dim() == 2:
            query_embeds = query_embeds.expand(pixel_values.shape[0], -1, -1)
        image_outputs = image_outputs or query_embeds is None
        image_states, query_states = self.embeddings(pixel_values, query_embeds)
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (self._join(image_states, query_states),)
            last = index == len(self.layers) - 1
            image_states, query_states, weights = layer(
                image_states, query_states, image_outputs=image_outputs or not last,
                output_attentions=output_attentions,
            )
            if output_attentions:
                all_attentions += (weights,)
        image_states, query_states = self.post_layernorm(image_states, query_states)
        if output_hidden_states:
            all_hidden_states += (self._join(image_states, query_states),)
        outputs = VisCPMVisionModelOutput(
            last_hidden_state=self._join(image_states, query_states),
            query_hidden_states=query_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return outputs if return_dict else outputs.to_tuple()

    def unused_without_image_outputs(self) -> list[nn.Parameter]:
        """The weights ``image_outputs=False`` leaves unused: the last layer's image-token outputs (its image query
        projection, output projection, FFN and norms) and the image post-norm."""
        last = self.layers[-1]
        modules = (last.attention.q_proj.image, last.attention.inner_norm.image, last.attention.o_proj.image,
                   last.mlp_norm.image, last.mlp.image, self.post_layernorm.image)
        return [param for module in modules for param in module.parameters()]

    @staticmethod
    def _join(image_states, query_states):
        parts = [part for part in (image_states, query_states) if part is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# --------------------------------------------------------------------------------------------------------------
# The chat model
# --------------------------------------------------------------------------------------------------------------


def find_image_bound(
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    query_num: int,
    unk_token_id: int = 1,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> torch.LongTensor:
    """``[batch, 2]`` (start, end) of the image slots in `CpmBeeTokenizer` output: per row, the first segment
    laid out as an opening token, ``query_num`` times ``<unk>`` and a closing token (the ``"image"`` leaf of the
    prompt dict: ``<s>`` and ``</s>`` around the slots, also checked when ``bos_token_id``/``eos_token_id`` are
    given).

    Raises `ValueError` for a row without such a segment."""
    bounds = []
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for row, (ids, segments, real) in enumerate(zip(input_ids.tolist(), segment_ids.tolist(), mask.tolist())):
        found = None
        spans: dict[int, list[int]] = {}
        for position, (segment, keep) in enumerate(zip(segments, real)):
            if keep:
                spans.setdefault(segment, []).append(position)
        for positions in spans.values():
            if len(positions) != query_num + 2 or positions[-1] - positions[0] != query_num + 1:
                continue
            start, end = positions[0], positions[-1]
            opens = bos_token_id is None or ids[start] == bos_token_id
            closes = eos_token_id is None or ids[end] == eos_token_id
            if opens and closes and all(token == unk_token_id for token in ids[start + 1: end]):
                found = (start + 1, end)
                break
        if found is None:
            raise ValueError(
                f"row {row} has no image slots (a segment of {query_num} <unk> tokens, the prompt's \"image\" "
                "entry): build the prompt with the VisCPM-Chat processor, or pass image_bound"
            )
        bounds.append(found)
    return torch.tensor(bounds, dtype=torch.long, device=input_ids.device)


def check_image_inputs(**tensors) -> None:
    """Image inputs must hold finite values: NaN or infinite pixels or vision states would decode into nothing."""
    fixes = {
        "pixel_values": "check the image, and prepare it with the model's image processor",
        "vision_hidden_states": "pass the states an earlier call returned (`vision_hidden_states` of its output)",
    }
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.is_meta:
            raise ValueError(f"{name} is a meta tensor (a shape without values): {fixes[name]}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contain NaN or infinite values: {fixes[name]}")


@dataclass
class VisCPMChatCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    vision_hidden_states (`[batch, query_num, text_hidden]`, *optional*): the mapped query outputs that filled the
        image slots (in the language model's dtype). Pass them back as `vision_hidden_states` in a later turn
        about the same image to skip the vision encoder.
    image_outputs (`BaseModelOutputWithPooling`, *optional*): the vision encoder's output when this call encoded
        `pixel_values` (see [`~VisCPMChatForConditionalGeneration.get_image_features`]).
    """

    vision_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


# The original `VisCPMChat.chat()` decoding: beam 3, temperature 0.7 (applied inside beam search, which a
# transformers config only allows with sampling: kept as `beam_temperature`), repetition penalty 1.1, length penalty
# 3 and `max_length=512` (`original_max_length`). Its beams close two steps after that limit, so an answer has at
# most 514 tokens: `max_new_tokens=514` never cuts one.
ORIGINAL_CHAT_GENERATION = dict(
    num_beams=3, repetition_penalty=1.1, length_penalty=3.0, do_sample=False, original_beam_search=True,
    beam_temperature=0.7, original_max_length=512, max_new_tokens=514,
)
# Settings the original beam search implements (besides the token ids); any other setting must be left unset.
ORIGINAL_BEAM_SEARCH_SETTINGS = frozenset({
    "num_beams", "temperature", "beam_temperature", "repetition_penalty", "length_penalty", "max_new_tokens",
    "max_length", "original_max_length", "decode_mode", "original_beam_search", "do_sample", "num_return_sequences",
    "output_scores", "output_logits", "return_dict_in_generate", "use_cache", "bos_token_id", "eos_token_id",
    "pad_token_id", "transformers_version",
})
# The model inputs the original beam search reads (besides `input_ids` and the vocabulary rule's masks).
ORIGINAL_BEAM_SEARCH_INPUTS = frozenset({
    "pixel_values", "vision_hidden_states", "image_bound", "attention_mask", "segment_ids", "context_mask",
    "segment_rel", "ext_table_ids", "ext_table_sub", "answer_segments",
})


class VisCPMChatPreTrainedModel(PreTrainedModel):
    config_class = VisCPMChatConfig
    config: VisCPMChatConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisCPMVisionEmbeddings", "VisCPMVisionLayer", "CpmBeeDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        # The vision encoder and CPM-Bee initialise themselves (they are PreTrainedModels); this covers the rest.
        std = self.config.vision_config.initializer_range
        if isinstance(module, VisCPMChatForConditionalGeneration):
            nn.init.trunc_normal_(module.query, mean=0.0, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class VisCPMChatForConditionalGeneration(VisCPMChatPreTrainedModel, GenerationMixin):
    r"""
    VisCPM-Chat: [`VisCPMVisionModel`] reads the image together with `query_num` learned queries (`query`); the
    query outputs, mapped by `mapping` (`Linear -> GELU -> Linear`) to CPM-Bee's width, replace the prompt's
    `<unk>` image slots (`image_bound`) in the input embeddings of `language_model` ([`CpmBeeForCausalLM`]).

    Inputs are those of `CpmBeeForCausalLM` (the tokenizer's `segment_ids`, `context_mask`, `segment_rel` and ext
    table) plus `pixel_values`, or the `vision_hidden_states` of an earlier turn, and `image_bound`.
    `generate()` supports greedy search, sampling and beam search; [`original_beam_search`] runs the original
    VisCPM beam search, which is what gives the original's answers.
    """

    def __init__(self, config: VisCPMChatConfig):
        super().__init__(config)
        vision_dim = config.vision_config.hidden_size
        text_dim = config.text_config.hidden_size
        self.vision_model = VisCPMVisionModel(config.vision_config)
        self.query = nn.Parameter(torch.zeros(config.query_num, vision_dim))
        self.mapping = nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
        self.language_model = CpmBeeForCausalLM(config.text_config)
        self.post_init()
        # Only the query outputs of the vision encoder are read: its last layer's image-token outputs are neither
        # computed nor trained (they stay in the state dict, as in the original checkpoints).
        for param in self.vision_model.unused_without_image_outputs():
            param.requires_grad_(False)

    @staticmethod
    def original_generation_config(config: VisCPMChatConfig) -> GenerationConfig:
        """The original `VisCPMChat.chat()` decoding as a generation config: the original beam search with its
        settings (beam 3, temperature 0.7, repetition penalty 1.1, length penalty 3, `original_max_length=512`).
        Converted checkpoints save it as their `generation_config.json`, so `generate(**inputs)` and
        `pipeline("image-text-to-text")` answer as the original does."""
        text = config.text_config
        return GenerationConfig(
            **ORIGINAL_CHAT_GENERATION,
            bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
        )

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return None

    # -- image features -------------------------------------------------------------------------------------

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """The vision encoder over ``pixel_values`` with the learned queries: ``last_hidden_state`` holds the query
        outputs ``[batch, query_num, vision_hidden]``, ``pooler_output`` the features that fill the image slots
        (mapped to CPM-Bee's width, ``[batch, query_num, text_hidden]``); ``hidden_states`` and ``attentions``
        are the encoder's, when asked for."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        weight = self.vision_model.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=_input_device(weight), dtype=weight.dtype)
        query = self.query.to(device=pixel_values.device, dtype=weight.dtype)
        vision = self.vision_model(
            pixel_values, query_embeds=query, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, image_outputs=False,
        )
        # No cast to `mapping`'s weight: quantized, it is int8/uint8 (bitsandbytes casts inputs itself).
        outputs = BaseModelOutputWithPooling(
            last_hidden_state=vision.query_hidden_states, pooler_output=self.mapping(vision.query_hidden_states),
            hidden_states=vision.hidden_states, attentions=vision.attentions,
        )
        return outputs if return_dict else outputs.to_tuple()

    def _image_states(self, pixel_values, vision_hidden_states, output_attentions=None, output_hidden_states=None):
        """``(vision_hidden_states, image_outputs)`` for the image slots: the given states, or those encoded from
        ``pixel_values`` with the encoder's output; both None without an image. Inputs are checked on the way in
        (a host sync on the prompt step; traced graphs carry no checks)."""
        checking = not torch.compiler.is_compiling()
        if vision_hidden_states is not None:
            if checking:
                check_image_inputs(vision_hidden_states=vision_hidden_states)
            return vision_hidden_states, None
        if pixel_values is None:
            return None, None
        if checking:
            check_image_inputs(pixel_values=pixel_values)
        outputs = self.get_image_features(pixel_values, output_attentions=output_attentions,
                                          output_hidden_states=output_hidden_states, return_dict=True)
        return outputs.pooler_output, outputs

    def get_vision_hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The mapped query outputs for a batch of images: ``[batch, query_num, text_hidden]`` (what a later turn
        about the same image passes back as ``vision_hidden_states``)."""
        return self.get_image_features(pixel_values, return_dict=True).pooler_output

    def merge_vision_hidden_states(
        self, inputs_embeds: torch.Tensor, vision_hidden_states: torch.Tensor, image_bound: torch.Tensor
    ) -> torch.Tensor:
        """Put ``vision_hidden_states`` ``[batch, query_num, dim]`` over the slots ``image_bound`` ``[batch, 2]``
        (start, end) of ``inputs_embeds``; returns a new tensor (the states are moved to its device and dtype)."""
        batch, length, dim = inputs_embeds.shape
        query_num = self.config.query_num
        if vision_hidden_states.dim() != 3 or tuple(vision_hidden_states.shape[1:]) != (query_num, dim):
            raise ValueError(
                f"vision_hidden_states must be [batch, {query_num}, {dim}], got {list(vision_hidden_states.shape)}"
            )
        if vision_hidden_states.shape[0] != batch:
            raise ValueError(f"vision_hidden_states hold {vision_hidden_states.shape[0]} images for {batch} prompts")
        image_bound = torch.as_tensor(image_bound, device=inputs_embeds.device).long().reshape(batch, -1)
        if image_bound.shape[1] != 2:
            raise ValueError(f"image_bound must be [batch, 2] (start, end), got {list(image_bound.shape)}")
        starts, ends = image_bound[:, 0], image_bound[:, 1]
        valid = ((ends - starts) == query_num) & (starts >= 0) & (ends <= length)
        if not torch.compiler.is_compiling() and not bool(valid.all()):  # a host sync; traced graphs carry no checks
            raise ValueError(
                f"image_bound {image_bound.tolist()} must mark {query_num} slots inside the {length} input tokens"
            )
        index = (starts[:, None] + torch.arange(query_num, device=inputs_embeds.device))[..., None].expand(-1, -1, dim)
        states = vision_hidden_states.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.scatter(1, index, states)

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        image_bound: torch.Tensor | None = None,
        ext_table_ids: torch.LongTensor | None = None,
        ext_table_sub: torch.LongTensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input embeddings of a prompt with its image slots filled: ``(inputs_embeds, vision_hidden_states)``.

        ``vision_hidden_states`` (from an earlier turn) take precedence over ``pixel_values``; with neither, the
        prompt is embedded as text only. Without ``image_bound`` the slots are found from ``segment_ids``
        (see [`find_image_bound`])."""
        vision_hidden_states, _ = self._image_states(pixel_values, vision_hidden_states)
        return self._fill_image_slots(input_ids, vision_hidden_states, image_bound, ext_table_ids, ext_table_sub,
                                      segment_ids, attention_mask)

    def _fill_image_slots(self, input_ids, vision_hidden_states, image_bound, ext_table_ids, ext_table_sub,
                          segment_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = self.language_model.model.embed(input_ids, ext_table_ids, ext_table_sub)
        if vision_hidden_states is None:
            return embeds, None
        vision_hidden_states = vision_hidden_states.to(device=embeds.device, dtype=embeds.dtype)
        if image_bound is None:
            if segment_ids is None:
                raise ValueError("pass image_bound (or segment_ids to find the image slots) with the image")
            image_bound = find_image_bound(
                input_ids, segment_ids, attention_mask, query_num=self.config.query_num,
                unk_token_id=self.config.text_config.unk_token_id,
            )
        return self.merge_vision_hidden_states(embeds, vision_hidden_states, image_bound), vision_hidden_states

    # -- forward --------------------------------------------------------------------------------------------

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        image_bound: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        context_mask: torch.Tensor | None = None,
        segment_rel: torch.LongTensor | None = None,
        ext_table_ids: torch.LongTensor | None = None,
        ext_table_sub: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        ext_table_mask: torch.Tensor | None = None,
        unk_allowed: torch.Tensor | None = None,
    ) -> VisCPMChatCausalLMOutputWithPast | tuple:
        r"""
        pixel_values (`[batch, 3, image_size, image_size]`, *optional*): the images of the prompts.
        vision_hidden_states (`[batch, query_num, text_hidden]`, *optional*): mapped query outputs of an earlier
            call (`outputs.vision_hidden_states`); used instead of `pixel_values` when both are given.
        image_bound (`[batch, 2]`, *optional*): (start, end) of the `query_num` image slots in `input_ids`;
            found from `segment_ids` when omitted.

        The image goes into the slots of `input_ids` (on the prompt step). Other arguments are those of
        [`CpmBeeForCausalLM.forward`]; `hidden_states` and `attentions` are the language model's.
        """
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        image_outputs = None
        if pixel_values is not None or vision_hidden_states is not None:
            if inputs_embeds is not None or input_ids is None:
                raise ValueError(
                    "an image goes with the prompt's input_ids (which hold its slots), not with inputs_embeds; "
                    "use `embed_inputs` to build embeddings with the image already in place"
                )
            vision_hidden_states, image_outputs = self._image_states(
                pixel_values, vision_hidden_states, output_attentions, output_hidden_states
            )
            inputs_embeds, vision_hidden_states = self._fill_image_slots(
                input_ids, vision_hidden_states, image_bound, ext_table_ids, ext_table_sub, segment_ids, attention_mask
            )
            input_ids = None
        outputs = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            context_mask=context_mask,
            segment_rel=segment_rel,
            ext_table_ids=ext_table_ids,
            ext_table_sub=ext_table_sub,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            shift_labels=shift_labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            num_items_in_batch=num_items_in_batch,
        )
        result = VisCPMChatCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            vision_hidden_states=vision_hidden_states,
            image_outputs=image_outputs,
        )
        return result if return_dict else result.to_tuple()

    # -- generation -----------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, pixel_values=None,
                                      vision_hidden_states=None, image_bound=None, segment_ids=None,
                                      context_mask=None, segment_rel=None, ext_table_ids=None, ext_table_sub=None,
                                      **kwargs):
        # CPM-Bee's own rules for its per-token inputs; the image goes in on the prompt step only (every step
        # when there is no cache, since each step then re-reads the whole sequence).
        model_inputs = self.language_model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, segment_ids=segment_ids,
            context_mask=context_mask, segment_rel=segment_rel, ext_table_ids=ext_table_ids,
            ext_table_sub=ext_table_sub, **kwargs,
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update(
                pixel_values=pixel_values, vision_hidden_states=vision_hidden_states, image_bound=image_bound
            )
        else:
            for key in ("pixel_values", "vision_hidden_states", "image_bound"):
                model_inputs.pop(key, None)
        return model_inputs

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 prefix_allowed_tokens_fn=None, streamer=None, ext_table_mask=None, unk_allowed=None,
                 original_beam_search=None, decode_mode=None, original_max_length=None, **kwargs):
        """`GenerationMixin.generate` with images (`pixel_values` or `vision_hidden_states`, and `image_bound`), plus
        CPM-Bee's vocabulary rule when the tokenizer's ``ext_table_mask``/``unk_allowed`` are passed (see
        [`CpmBeeForCausalLM.generate`]), and the original VisCPM-Chat beam search as a decoding mode.

        **Selecting the original decoding.** ``original_beam_search=True`` (an argument, or an attribute of the
        generation config) without sampling runs the original beam search ([`original_beam_search`]); everything
        else is transformers' own decoding (greedy, sampling, beam search, assisted decoding, ...). Converted
        checkpoints save [`original_generation_config`] (the original `chat()`: beam 3, temperature 0.7 as
        ``beam_temperature``, repetition penalty 1.1, length penalty 3, ``original_max_length=512``), so plain
        ``generate(**inputs)`` and `pipeline("image-text-to-text")` answer as the original does; a model built from
        a config has transformers' default generation config.

        **Arguments under the original decoding** keep their meaning: ``num_beams`` beams (1 included),
        ``temperature`` applied inside the search (default: ``beam_temperature``), ``repetition_penalty`` over
        the answer only and ``length_penalty`` on finished answers (the original's rules), ``max_new_tokens`` (or
        ``max_length``, prompt included) the most new tokens any sequence gets, ``original_max_length`` the
        original's own ``max_length`` (its answers run up to two tokens past it), ``eos_token_id`` (an id, a list,
        or None: never stop early), ``num_return_sequences`` (at most ``num_beams``), ``output_scores``,
        ``output_logits``, ``return_dict_in_generate`` (a `GenerateBeamDecoderOnlyOutput` with ``sequences``,
        ``sequences_scores``, ``scores``, ``logits``, ``beam_indices`` and ``cache``) and ``decode_mode``
        (``"dynamic"``, ``"static"``, ``"compile"``, ``"cuda_graph"``: see
        [`~generation_cpmbee.CpmBeeStaticDecoder`]). Any other setting, hook or input is refused with an error that
        names it (pass ``original_beam_search=False`` for transformers' loop). New tokens are each answer slot's
        tokens and its ``</s>``, right-padded with ``pad_token_id``.

        Arguments are checked before any work: counts must be whole numbers >= 1, temperature and penalties
        finite, image inputs finite and not meta tensors. ``temperature=0`` is an error, not greedy decoding: the
        original beam search divides the logits by the temperature (and is deterministic at any temperature).
        """
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        for name, value in (("original_beam_search", original_beam_search), ("decode_mode", decode_mode),
                            ("original_max_length", original_max_length)):
            if value is not None:
                setattr(config, name, value)
        original = bool(getattr(config, "original_beam_search", False)) and not kwargs.get("do_sample", config.do_sample)
        beam_temperature = getattr(config, "beam_temperature", None)
        temperature = kwargs.get("temperature", config.temperature if beam_temperature is None else beam_temperature)
        check_generation_config(config, kwargs, original, temperature)
        check_input_tensors({"inputs": inputs, **kwargs})
        hooks = dict(logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                     prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, streamer=streamer)
        if original:
            return self._generate_with_original_beam_search(inputs, config, kwargs, temperature, ext_table_mask,
                                                            unk_allowed, hooks)
        if decode_mode not in (None, "dynamic"):
            raise ValueError("decode_mode applies to the original beam search (original_beam_search=True without "
                             "sampling); transformers' loop takes cache_implementation instead")
        if original_max_length is not None:
            raise ValueError("original_max_length applies to the original beam search (original_beam_search=True "
                             "without sampling); transformers' loop takes max_new_tokens instead")
        hooks["logits_processor"] = add_vocab_rule(logits_processor, self.config.text_config, ext_table_mask,
                                                   unk_allowed)
        for name in ("original_beam_search", "beam_temperature", "original_max_length", "decode_mode"):
            if hasattr(config, name):
                delattr(config, name)  # settings of the original beam search: transformers' loop has no use for them
        # The settings go into the config copy (transformers warns when a config comes with settings beside it);
        # what is left are the model's inputs.
        model_kwargs = config.update(**kwargs)
        return super().generate(inputs, generation_config=config, **hooks, **model_kwargs)

    def _generate_with_original_beam_search(self, inputs, config, kwargs, temperature, ext_table_mask, unk_allowed,
                                            hooks):
        """`generate()` through the original beam search (see [`generate`] for what it honours)."""
        hooks = sorted(name for name, value in hooks.items() if value)
        if hooks:
            raise ValueError(f"{', '.join(hooks)} need transformers' decoding loop: pass original_beam_search=False "
                             "(or do_sample=True)")
        model_kwargs = config.update(**kwargs)
        unsupported = sorted(name for name, value in config.to_diff_dict().items()
                             if name not in ORIGINAL_BEAM_SEARCH_SETTINGS and not name.startswith("_")
                             and value not in (None, False))
        input_ids = model_kwargs.pop("input_ids", inputs)
        unknown = sorted(set(model_kwargs) - ORIGINAL_BEAM_SEARCH_INPUTS)
        if unsupported or unknown or config.use_cache is False:
            names = unsupported + unknown + (["use_cache=False"] if config.use_cache is False else [])
            raise ValueError(f"generate() got arguments the original beam search does not use: {names}; pass "
                             "original_beam_search=False for transformers' decoding loop")
        if input_ids is None:
            raise ValueError("the original beam search needs `input_ids` (the processor's output)")
        inputs_embeds, _ = self.embed_inputs(
            input_ids, model_kwargs.get("pixel_values"), model_kwargs.get("vision_hidden_states"),
            model_kwargs.get("image_bound"), model_kwargs.get("ext_table_ids"), model_kwargs.get("ext_table_sub"),
            segment_ids=model_kwargs.get("segment_ids"), attention_mask=model_kwargs.get("attention_mask"),
        )
        device = inputs_embeds.device
        tensors = {key: model_kwargs.get(key) for key in PROMPT_KEYS}
        tensors = {key: None if value is None else value.to(device) for key, value in tensors.items()}
        prompt = prompt_inputs(input_ids.to(device), **tensors, inputs_embeds=inputs_embeds)
        search = OriginalSearch.from_config(config, self.config.text_config, input_ids.shape[1], temperature)
        answer_segments = model_kwargs.get("answer_segments") or default_answer_segments(
            prompt["segment_ids"], input_ids.shape[0])
        found = run_beam_search(
            self.language_model, prompt, answer_segments, **search.arguments(),
            ext_table_mask=None if ext_table_mask is None else ext_table_mask.to(device),
            unk_allowed=None if unk_allowed is None else unk_allowed.to(device),
            output_scores=bool(config.output_scores), output_logits=bool(config.output_logits),
        )
        return search.outputs(input_ids.to(device), found, config)

    @torch.no_grad()
    def original_beam_search(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        image_bound: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        context_mask: torch.Tensor | None = None,
        segment_rel: torch.LongTensor | None = None,
        ext_table_ids: torch.LongTensor | None = None,
        ext_table_sub: torch.LongTensor | None = None,
        ext_table_mask: torch.Tensor | None = None,
        unk_allowed: torch.Tensor | None = None,
        answer_segments: list[list[int]] | None = None,
        beam_size: int = 3,
        max_length: int = 100,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        temperature: float = 1.0,
        decode_mode: str = "dynamic",
    ) -> tuple[list[list[list[int]]], torch.Tensor | None]:
        """The original VisCPM-Chat decoding: its beam search (see [`~generation_cpmbee.cpmbee_beam_search`]) over
        a prompt with an image, the image slots filled once before CPM-Bee decodes from those embeddings.

        Returns ``(answers, vision_hidden_states)``: per sample, the raw token ids of each answer slot (decode them
        with the tokenizer), and the mapped vision states to pass back in a later turn."""
        inputs_embeds, vision_hidden_states = self.embed_inputs(
            input_ids, pixel_values, vision_hidden_states, image_bound, ext_table_ids, ext_table_sub,
            segment_ids=segment_ids, attention_mask=attention_mask,
        )
        device = inputs_embeds.device

        def moved(tensor):
            return None if tensor is None else tensor.to(device)

        answers = cpmbee_beam_search(
            self.language_model,
            input_ids.to(device),
            attention_mask=moved(attention_mask),
            segment_ids=moved(segment_ids),
            context_mask=moved(context_mask),
            segment_rel=moved(segment_rel),
            ext_table_ids=moved(ext_table_ids),
            ext_table_sub=moved(ext_table_sub),
            ext_table_mask=moved(ext_table_mask),
            unk_allowed=moved(unk_allowed),
            inputs_embeds=inputs_embeds,
            answer_segments=answer_segments,
            beam_size=beam_size,
            max_length=max_length,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            temperature=temperature,
            decode_mode=decode_mode,
        )
        return answers, vision_hidden_states


__all__ = [
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatPreTrainedModel",
    "VisCPMVisionModel",
    "VisCPMVisionPreTrainedModel",
    "find_image_bound",
]
