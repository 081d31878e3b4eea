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
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_viscpm_chat import VisCPMChatConfig, VisCPMVisionConfig
from .generation_cpmbee import add_vocab_rule, check_generation_config, check_input_tensors, cpmbee_beam_search
from .modeling_cpmbee import CpmBeeForCausalLM

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
    the query part may be ``None`` (an image encoded without queries).
    """

    def __init__(self, image: nn.Module, query: nn.Module):
        super().__init__()
        self.image = image
        self.query = query

    @classmethod
    def of(cls, make: Callable[[], nn.Module]) -> "VisCPMMultiway":
        """Two independent instances of ``make()``."""
        return cls(make(), make())

    def forward(self, image_states: torch.Tensor, query_states: torch.Tensor | None):
        return self.image(image_states), (None if query_states is None else self.query(query_states))


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

    def forward(self, image_states: torch.Tensor, query_states: torch.Tensor | None):
        query = self._heads(self.q_proj, image_states, query_states)
        key = self._heads(self.k_proj, image_states, query_states)
        value = self._heads(self.v_proj, image_states, query_states)
        implementation = self.config._attn_implementation or "eager"
        attention = eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        output, _ = attention(
            self, query, key, value, None, dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling, is_causal=False,
        )
        output = output.reshape(output.shape[0], output.shape[1], -1)
        split = image_states.shape[1]
        image_out, query_out = output[:, :split], (output[:, split:] if query_states is not None else None)
        return self.o_proj(*self.inner_norm(image_out, query_out))


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

    def forward(self, image_states: torch.Tensor, query_states: torch.Tensor | None = None):
        states = (image_states, query_states)
        states = self._add(states, self.attention(*self.attention_norm(*states)))
        states = self._add(states, self.mlp(*self.mlp_norm(*states)))
        return states


@dataclass
class VisCPMVisionModelOutput(ModelOutput):
    """
    last_hidden_state (`[batch, 1 + num_patches (+ queries), hidden]`): the final states of the class token, the
        patches and (when queries were given) the queries, after the final LayerNorm of each part.
    query_hidden_states (`[batch, queries, hidden]`, *optional*): the query part of `last_hidden_state`.
    hidden_states (`tuple`, *optional*): the joint sequence after the embeddings and after each layer.
    """

    last_hidden_state: torch.FloatTensor | None = None
    query_hidden_states: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


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
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VisCPMVisionModelOutput:
        r"""
        pixel_values (`[batch, channels, image_size, image_size]`): normalised images.
        query_embeds (`[batch, queries, hidden]` or `[queries, hidden]`, *optional*): tokens read behind the
            image with the query expert (VisCPM-Chat's learned queries).
        """
        if query_embeds is not None and query_embeds.dim() == 2:
            query_embeds = query_embeds.expand(pixel_values.shape[0], -1, -1)
        image_states, query_states = self.embeddings(pixel_values, query_embeds)
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (self._join(image_states, query_states),)
            image_states, query_states = layer(image_states, query_states)
        image_states, query_states = self.post_layernorm(image_states, query_states)
        if output_hidden_states:
            all_hidden_states += (self._join(image_states, query_states),)
        return VisCPMVisionModelOutput(
            last_hidden_state=self._join(image_states, query_states),
            query_hidden_states=query_states,
            hidden_states=all_hidden_states,
        )

    @staticmethod
    def _join(image_states, query_states):
        return image_states if query_states is None else torch.cat([image_states, query_states], dim=1)


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
    bos_token_id: int = 6,
    eos_token_id: int = 7,
) -> torch.LongTensor:
    """``[batch, 2]`` (start, end) of the image slots in `CpmBeeTokenizer` output: per row, the first segment
    laid out as ``<s>``, ``query_num`` times ``<unk>``, ``</s>`` (the ``"image"`` leaf of the prompt dict).

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
            if ids[start] == bos_token_id and ids[end] == eos_token_id and all(
                token == unk_token_id for token in ids[start + 1: end]
            ):
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
    """

    vision_hidden_states: torch.FloatTensor | None = None


@dataclass
class VisCPMChatGenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)` under the original beam search: the sequences (prompt +
    answer) and the mapped vision states to pass back in a later turn."""

    sequences: torch.LongTensor | None = None
    vision_hidden_states: torch.FloatTensor | None = None


# The original `VisCPMChat.chat()` settings; `max_new_tokens` plays the original's `max_length`.
# The original applies its temperature inside beam search, which transformers' config does not allow without
# sampling: it is kept as `beam_temperature` (a `temperature=` passed to `generate()` overrides it).
ORIGINAL_CHAT_GENERATION = dict(
    num_beams=3, repetition_penalty=1.1, length_penalty=3.0, max_new_tokens=512, do_sample=False,
    original_beam_search=True, beam_temperature=0.7,
)


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
        text = config.text_config
        self.generation_config = GenerationConfig(
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

    def get_vision_hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The mapped query outputs for a batch of images: ``[batch, query_num, text_hidden]``."""
        weight = self.vision_model.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=_input_device(weight), dtype=weight.dtype)
        query = self.query.to(device=pixel_values.device, dtype=weight.dtype)
        states = self.vision_model(pixel_values, query_embeds=query).query_hidden_states
        # No cast to `mapping`'s weight: quantized, it is int8/uint8 (bitsandbytes casts inputs itself).
        return self.mapping(states)

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
        if bool(((ends - starts) != query_num).any()) or bool((starts < 0).any()) or bool((ends > length).any()):
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
        embeds = self.language_model.model.embed(input_ids, ext_table_ids, ext_table_sub)
        if vision_hidden_states is None and pixel_values is None:
            return embeds, None
        if not torch.compiler.is_compiling():  # a host sync on the prompt step; traced graphs carry no checks
            check_image_inputs(pixel_values=pixel_values, vision_hidden_states=vision_hidden_states)
        if vision_hidden_states is None:
            vision_hidden_states = self.get_vision_hidden_states(pixel_values)
        vision_hidden_states = vision_hidden_states.to(device=embeds.device, dtype=embeds.dtype)
        if image_bound is None:
            if segment_ids is None:
                raise ValueError("pass image_bound (or segment_ids to find the image slots) with the image")
            text = self.config.text_config
            image_bound = find_image_bound(
                input_ids, segment_ids, attention_mask, query_num=self.config.query_num,
                unk_token_id=text.unk_token_id, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
            )
        return self.merge_vision_hidden_states(embeds, vision_hidden_states, image_bound), vision_hidden_states

    # -- forward --------------------------------------------------------------------------------------------

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
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> VisCPMChatCausalLMOutputWithPast:
        r"""
        pixel_values (`[batch, 3, image_size, image_size]`, *optional*): the images of the prompts.
        vision_hidden_states (`[batch, query_num, text_hidden]`, *optional*): mapped query outputs of an earlier
            call (`outputs.vision_hidden_states`); used instead of `pixel_values` when both are given.
        image_bound (`[batch, 2]`, *optional*): (start, end) of the `query_num` image slots in `input_ids`;
            found from `segment_ids` when omitted.

        The image goes in where `input_ids` hold its slots (the prompt step); later steps pass neither. Other
        arguments are those of [`CpmBeeForCausalLM.forward`].
        """
        if pixel_values is not None or vision_hidden_states is not None:
            if inputs_embeds is not None or input_ids is None:
                raise ValueError(
                    "an image goes with the prompt's input_ids (which hold its slots), not with inputs_embeds; "
                    "use `embed_inputs` to build embeddings with the image already in place"
                )
            inputs_embeds, vision_hidden_states = self.embed_inputs(
                input_ids, pixel_values, vision_hidden_states, image_bound, ext_table_ids, ext_table_sub,
                segment_ids=segment_ids, attention_mask=attention_mask,
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
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            output_hidden_states=output_hidden_states,
            num_items_in_batch=num_items_in_batch,
        )
        return VisCPMChatCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            vision_hidden_states=vision_hidden_states,
        )

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

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        # New tokens continue the answer segment: CPM-Bee grows its per-token inputs itself.
        return self.language_model._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )

    def generate(self, inputs=None, generation_config=None, logits_processor=None, ext_table_mask=None,
                 unk_allowed=None, **kwargs):
        """`GenerationMixin.generate` with images (`pixel_values` or `vision_hidden_states`, and `image_bound`),
        plus CPM-Bee's vocabulary rule when the tokenizer's ``ext_table_mask``/``unk_allowed`` are passed (see
        [`CpmBeeForCausalLM.generate`]).

        The default generation config is the original `chat()`'s (beam 3, temperature 0.7 as ``beam_temperature``,
        repetition penalty 1.1, length penalty 3, ``max_new_tokens=512`` as the original's ``max_length``) with
        ``original_beam_search=True``: then search without sampling runs [`original_beam_search`], so `generate()`
        and `pipeline("image-text-to-text")` give the original's answers. Set ``original_beam_search=False`` for
        transformers' own greedy/beam search (and for streaming); sampling always uses transformers' loop.
        ``decode_mode`` (argument or generation-config attribute) picks how the original beam search runs its
        decode steps: ``"dynamic"`` (default), ``"static"``, ``"compile"`` or ``"cuda_graph"`` (see
        [`~generation_cpmbee.CpmBeeStaticDecoder`]). Returns the prompt followed by each answer and its ``</s>``,
        right-padded.

        Arguments are checked before any work: counts must be whole numbers >= 1, temperature and penalties finite,
        image inputs finite and not meta tensors. ``temperature=0`` is an error, not greedy decoding: the original
        beam search divides the logits by the temperature (and is deterministic at any temperature).
        """
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        if "temperature" not in kwargs and getattr(config, "beam_temperature", None) is not None:
            kwargs_temperature = config.beam_temperature
        else:
            kwargs_temperature = kwargs.get("temperature", config.temperature)
        original = kwargs.get("original_beam_search", getattr(config, "original_beam_search", False))
        original = original and not kwargs.get("do_sample", config.do_sample)
        check_generation_config(config, kwargs, original, temperature=kwargs_temperature)
        check_input_tensors({"inputs": inputs, **kwargs})
        model_kwargs = config.update(**kwargs)
        if original:
            unsupported = [name for name in ("streamer", "stopping_criteria", "prefix_allowed_tokens_fn")
                           if model_kwargs.get(name) is not None] + (["logits_processor"] if logits_processor else [])
            if unsupported:
                raise ValueError(
                    f"{', '.join(unsupported)} need transformers' decoding loop: pass original_beam_search=False "
                    "(or do_sample=True)"
                )
            return self._generate_with_original_beam_search(inputs, config, kwargs_temperature, ext_table_mask,
                                                            unk_allowed, model_kwargs)
        if model_kwargs.pop("decode_mode", "dynamic") not in ("dynamic", None):
            raise ValueError("decode_mode applies to the original beam search (original_beam_search=True without "
                             "sampling); transformers' loop takes cache_implementation instead")
        logits_processor = add_vocab_rule(logits_processor, self.config.text_config, ext_table_mask, unk_allowed)
        config.original_beam_search = False
        if config.num_beams == 1:
            config.length_penalty = 1.0  # only beam search reads it
        return super().generate(inputs, generation_config=config, logits_processor=logits_processor,
                                **model_kwargs)

    def _generate_with_original_beam_search(self, inputs, config, temperature, ext_table_mask, unk_allowed,
                                            model_kwargs: dict):
        """`generate()` through [`original_beam_search`]: ``model_kwargs`` may hold only the model inputs it reads
        (`ORIGINAL_BEAM_SEARCH_INPUTS`), ``use_cache`` and ``decode_mode``."""
        model_kwargs = dict(model_kwargs)
        input_ids = model_kwargs.pop("input_ids", inputs)
        if input_ids is None:
            raise ValueError("the original beam search needs `input_ids` (the processor's output)")
        model_kwargs.pop("use_cache", None)  # it always decodes with a cache
        decode_mode = model_kwargs.pop("decode_mode", None) or getattr(config, "decode_mode", None) or "dynamic"
        unknown = sorted(set(model_kwargs) - set(ORIGINAL_BEAM_SEARCH_INPUTS))
        if unknown:
            raise ValueError(
                f"generate() got arguments the original beam search does not use: {unknown}; pass "
                "original_beam_search=False for transformers' decoding loop"
            )
        answers, vision_hidden_states = self.original_beam_search(
            input_ids, **model_kwargs, ext_table_mask=ext_table_mask, unk_allowed=unk_allowed,
            beam_size=config.num_beams, max_length=config.max_new_tokens,
            repetition_penalty=config.repetition_penalty or 1.0, length_penalty=config.length_penalty,
            temperature=1.0 if temperature is None else temperature, decode_mode=decode_mode,
        )
        eos, pad = self.config.text_config.eos_token_id, self.config.text_config.pad_token_id
        rows = [[token for slot in answer for token in (*slot, eos)] for answer in answers]
        width = max(len(row) for row in rows)
        new = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long,
                           device=input_ids.device)
        sequences = torch.cat([input_ids, new], dim=1)
        if config.return_dict_in_generate:
            return VisCPMChatGenerateOutput(sequences=sequences, vision_hidden_states=vision_hidden_states)
        return sequences

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


# The model inputs `original_beam_search` reads (besides `input_ids` and the vocabulary rule's masks).
ORIGINAL_BEAM_SEARCH_INPUTS = (
    "pixel_values", "vision_hidden_states", "image_bound", "attention_mask", "segment_ids", "context_mask",
    "segment_rel", "ext_table_ids", "ext_table_sub", "answer_segments",
)


__all__ = [
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatPreTrainedModel",
    "VisCPMVisionModel",
    "VisCPMVisionPreTrainedModel",
    "find_image_bound",
]
