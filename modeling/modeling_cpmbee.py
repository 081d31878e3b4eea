"""CPM-Bee, the bilingual (Chinese/English) language model under VisCPM, as a transformers model.

The mathematics follow the original implementation exactly (see REFERENCE.md):

* linear layers have no bias and are rescaled by ``1/sqrt(fan_in)`` (after the matmul, except for the FFN
  output, where the input is scaled first); they are plain ``nn.Linear`` so peft can wrap them;
* pre-norm blocks with a weight-only RMSNorm, and every residual sum divided by ``residual_scale`` (1.05);
* the input embedding is ``E[id] / sqrt(dim)`` rotated by the token's *sub* index, which keeps several
  out-of-vocabulary pieces (or numbered special tokens) apart although they share one base id;
* logits are ``h / sqrt(dim) @ E^T`` followed by ``h @ ext^T``, where ``ext`` holds the rotated embeddings
  of the batch's ext table, so the model can copy an out-of-vocabulary piece;
* one relative position bias shared by all layers: a bidirectional log bucket of the distance inside a
  segment, and a segment-relation bucket between segments;
* context tokens see every context token; tokens to predict see the context plus earlier predicted tokens.

Token ids at or above ``vocab_size`` index the batch ext table (``ext_table_ids``/``ext_table_sub``,
produced by `CpmBeeTokenizer`), which is how generated out-of-vocabulary pieces flow back in as input.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_cpmbee import CpmBeeConfig
from .generation_cpmbee import add_vocab_rule, check_generation_config, check_input_tensors


class CpmBeeRMSNorm(nn.Module):
    """Weight-only RMSNorm; the variance is computed in float32 and the result cast back before the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        hidden_states = (hidden_states * torch.rsqrt(variance + self.eps)).to(dtype)
        return hidden_states * self.weight


class CpmBeeEmbedding(nn.Embedding):
    """Token embedding scaled by ``1/sqrt(dim)`` and rotated by the token's sub index.

    The rotation angle is ``sub * distance_scale * inv_freq`` (half-split rotation). It is computed in
    ``config.rotary_dtype``: the released checkpoints were trained with it in float16, and ext-table
    embeddings only match the original when the angles are rounded the same way.
    """

    def __init__(self, config: CpmBeeConfig):
        super().__init__(config.vocab_size, config.hidden_size)
        self.distance_scale = config.rotary_distance_scale
        self.base = config.rotary_base
        self.rotary_dtype = getattr(torch, config.rotary_dtype)

    def rotate(self, embeds: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
        dim = embeds.shape[-1]
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, device=embeds.device, dtype=torch.float32) / dim))
        angles = (sub * self.distance_scale)[..., None].to(self.rotary_dtype) * inv_freq.to(self.rotary_dtype)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(embeds.dtype), angles.sin().to(embeds.dtype)
        half = dim // 2
        rotated = torch.cat((-embeds[..., half:], embeds[..., :half]), dim=-1)
        return embeds * cos + rotated * sin

    def forward(self, input_ids: torch.Tensor | None = None, sub: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of ``input_ids`` (rotated by ``sub``), or, given ``hidden_states``, the tied output head
        ``h / sqrt(dim) @ E^T``: a call of this module either way, so offloading hooks load the weight."""
        if hidden_states is not None:
            return F.linear(hidden_states / math.sqrt(self.embedding_dim), self.weight)
        embeds = F.embedding(input_ids, self.weight) / math.sqrt(self.embedding_dim)
        if sub is None:
            return embeds
        return self.rotate(embeds, sub)


class CpmBeePositionBias(nn.Module):
    """Relative position bias shared by all layers, returned as ``[batch, heads, q_len, k_len]``.

    Pairs inside one segment (relation bucket 0) use a bidirectional log bucket of ``key_pos - query_pos``;
    pairs across segments use bucket ``num_buckets + relation - 1``, the relation coming from the
    segment-relation table of the structured input.
    """

    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.num_buckets = config.position_bias_num_buckets
        self.max_distance = config.position_bias_max_distance
        self.weight = nn.Parameter(
            torch.empty(config.position_bias_num_buckets + config.position_bias_num_segment_buckets,
                        config.num_attention_heads)
        )

    def position_bucket(self, relative_position: torch.Tensor) -> torch.Tensor:
        half = self.num_buckets // 2
        buckets = (relative_position > 0).to(torch.int32) * half
        distance = relative_position.abs()
        max_exact = half // 2
        # The order of the float operations is the original's: a different rounding moves boundary buckets.
        large = max_exact + (
            torch.log(distance.float() / max_exact) / math.log(self.max_distance / max_exact) * (half - max_exact)
        ).to(torch.int32)
        large = torch.clamp(large, max=half - 1)
        return buckets + torch.where(distance < max_exact, distance.to(torch.int32), large)

    def forward(self, query_pos: torch.Tensor, key_pos: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        inner = self.position_bucket(key_pos[None, :] - query_pos[:, None])  # [q, k]
        buckets = torch.where(relation == 0, inner[None], relation - 1 + self.num_buckets)
        return F.embedding(buckets, self.weight).permute(0, 3, 1, 2)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    visible: torch.Tensor | None = None,
    **kwargs,
):
    """The original's attention: scores + bias, masked with -inf, softmax, then masked to 0 (so a fully
    masked row yields zeros, not NaN)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1]) + position_bias
    hidden = ~visible[:, None]
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(hidden, 0.0)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


class CpmBeeAttention(nn.Module):
    def __init__(self, config: CpmBeeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = 1
        self.is_causal = False
        self.scaling = self.head_dim**-0.5
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.in_scale = math.sqrt(config.hidden_size)
        self.out_scale = math.sqrt(inner)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor,
        visible: torch.Tensor,
        additive_mask: torch.Tensor | None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output and, with ``output_attentions``, the probabilities ``[batch, heads, q, k]``. Without
        ``additive_mask`` the eager path runs; with it, ``config._attn_implementation``'s kernel."""
        batch, q_len, _ = hidden_states.shape
        shape = (batch, q_len, self.num_heads, self.head_dim)
        query = (self.q_proj(hidden_states) / self.in_scale).view(shape).transpose(1, 2)
        key = (self.k_proj(hidden_states) / self.in_scale).view(shape).transpose(1, 2)
        value = (self.v_proj(hidden_states) / self.in_scale).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            if key.shape[-2] > position_bias.shape[-1]:
                # A static cache returns all its slots: the unfilled ones get no bias and are hidden.
                extra = key.shape[-2] - position_bias.shape[-1]
                position_bias = F.pad(position_bias, (0, extra))
                visible = F.pad(visible, (0, extra), value=False)
                if additive_mask is not None:
                    additive_mask = F.pad(additive_mask, (0, extra), value=torch.finfo(additive_mask.dtype).min)

        dropout = self.config.dropout if self.training else 0.0
        # Without `additive_mask` the eager path runs (`CpmBeeModel.run_layers` builds the mask for fused kernels
        # only); the kernels take the bias and the visibility folded into that mask.
        if additive_mask is None:
            output, weights = eager_attention_forward(
                self, query, key, value, None, self.scaling, dropout, position_bias=position_bias, visible=visible
            )
        else:
            attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            output, weights = attention(
                self, query, key, value, additive_mask, dropout=dropout, scaling=self.scaling, is_causal=False
            )
            # A row that sees no key is zero in the original; the kernels would average all values instead.
            output = output * visible.any(dim=-1)[..., None, None].to(output.dtype)
        output = self.o_proj(output.reshape(batch, q_len, -1)) / self.out_scale
        return output, (weights if output_attentions else None)


class CpmBeeMLP(nn.Module):
    """Gated GELU feed-forward: ``down(gelu(gate(x)) * up(x))`` with the original's fan-in scaling."""

    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)
        self.in_scale = math.sqrt(config.hidden_size)
        self.out_scale = math.sqrt(config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = self.act(self.gate_proj(hidden_states) / self.in_scale)
        hidden_states = self.dropout(gate * (self.up_proj(hidden_states) / self.in_scale))
        return self.down_proj(hidden_states / self.out_scale)


class CpmBeeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: CpmBeeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = CpmBeeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = CpmBeeAttention(config, layer_idx)
        self.post_attention_layernorm = CpmBeeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = CpmBeeMLP(config)
        self.dropout = nn.Dropout(config.dropout)
        self.residual_scale = config.residual_scale

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor,
        visible: torch.Tensor,
        additive_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden_states, attention probabilities or None)``; ``use_cache`` is read by gradient checkpointing,
        which turns the cache off."""
        attended, weights = self.self_attn(
            self.input_layernorm(hidden_states), position_bias, visible, additive_mask, cache=cache,
            output_attentions=output_attentions,
        )
        hidden_states = (hidden_states + self.dropout(attended)) / self.residual_scale
        fed = self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states + self.dropout(fed)) / self.residual_scale, weights


class CpmBeePreTrainedModel(PreTrainedModel):
    config_class = CpmBeeConfig
    config: CpmBeeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CpmBeeDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        # Every projection rescales by 1/sqrt(fan_in), so unit-variance weights keep activations at unit scale.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, CpmBeePositionBias):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, CpmBeeRMSNorm):
            nn.init.ones_(module.weight)


class CpmBeeModel(CpmBeePreTrainedModel):
    """The CPM-Bee transformer: embeddings, position bias, layers and the final norm."""

    def __init__(self, config: CpmBeeConfig):
        super().__init__(config)
        self.embed_tokens = CpmBeeEmbedding(config)
        self.position_bias = CpmBeePositionBias(config)
        self.layers = nn.ModuleList(CpmBeeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = CpmBeeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def resolve_ext_ids(
        self, input_ids: torch.Tensor, ext_table_ids: torch.Tensor | None, ext_table_sub: torch.Tensor | None,
        validate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map raw ids (ids >= vocab_size index the ext table) to (base id, sub index) pairs.

        ``validate`` checks the ids against the table (a host sync); decode steps skip it, since a generated id
        is a column of the logits and so always in the table, and so do traced graphs (`torch.export`,
        `torch.compile`), which carry no value checks."""
        vocab_size = self.config.vocab_size
        is_ext = input_ids >= vocab_size
        validate = validate and not torch.compiler.is_compiling()
        if ext_table_ids is None or ext_table_ids.shape[-1] == 0:
            if validate and bool(is_ext.any()):
                raise ValueError(
                    f"input_ids contain ids >= vocab_size ({vocab_size}) but no ext table was given: pass the "
                    "`ext_table_ids` and `ext_table_sub` that CpmBeeTokenizer returned with these ids"
                )
            return input_ids, torch.zeros_like(input_ids)
        index = (input_ids - vocab_size).clamp(min=0, max=ext_table_ids.shape[-1] - 1)
        if validate and bool((input_ids - vocab_size >= ext_table_ids.shape[-1]).any()):
            raise ValueError(
                f"input_ids refer to ext-table entries beyond its size {ext_table_ids.shape[-1]}: the ids and the "
                "ext table come from different tokenizer calls"
            )
        ext_ids = ext_table_ids.expand(input_ids.shape[0], -1)
        ext_sub = ext_table_sub.expand(input_ids.shape[0], -1)
        base = torch.where(is_ext, torch.gather(ext_ids, 1, index), input_ids)
        sub = torch.where(is_ext, torch.gather(ext_sub, 1, index), torch.zeros_like(input_ids))
        return base, sub

    def embed(self, input_ids, ext_table_ids=None, ext_table_sub=None, validate: bool = True) -> torch.Tensor:
        base, sub = self.resolve_ext_ids(input_ids, ext_table_ids, ext_table_sub, validate)
        return self.embed_tokens(base, sub)

    def ext_embeddings(self, ext_table_ids: torch.Tensor, ext_table_sub: torch.Tensor) -> torch.Tensor:
        """Rotated embeddings of the ext table, ``[batch, ext_size, dim]``: the extra output columns."""
        return self.embed_tokens(ext_table_ids, ext_table_sub)

    def _attention_inputs(self, batch, q_len, past_len, segment_ids, context_mask, attention_mask, segment_rel,
                          device, dtype):
        """Position bias ``[B, H, q, k]`` and visibility ``[B, q, k]`` for the current queries.

        Missing per-token inputs take the values of plain text: one segment, every token predicted (not context),
        which makes attention causal, and no padding."""
        k_len = past_len + q_len

        def full_length(tensor, name, default):
            if tensor is None:
                return torch.full((batch, k_len), default, dtype=torch.long, device=device)
            if tensor.shape[-1] == k_len:
                return tensor.to(device)
            raise ValueError(
                f"`{name}` has length {tensor.shape[-1]} but the cache holds {past_len} tokens and {q_len} are "
                f"new: pass a 2D `{name}` covering all {k_len} tokens (cached + new)"
            )

        segment_ids = full_length(segment_ids, "segment_ids", 0)
        context_mask = full_length(context_mask, "context_mask", 0).bool()
        attention_mask = full_length(attention_mask, "attention_mask", 1).bool()

        if segment_rel is None:
            relation = torch.zeros((batch, q_len, k_len), dtype=torch.long, device=device)
        else:
            segment_rel = segment_rel.to(device)
            num_segments = segment_rel.shape[-1]
            # Checked on the prompt (a host sync; not in traced graphs); later tokens continue a prompt segment.
            if past_len == 0 and not torch.compiler.is_compiling() and int(segment_ids.max()) >= num_segments:
                raise ValueError(
                    f"segment_ids go up to {int(segment_ids.max())} but segment_rel covers {num_segments} segments"
                )
            flat = segment_ids[:, past_len:, None] * num_segments + segment_ids[:, None, :]
            relation = torch.gather(segment_rel.reshape(batch, -1), 1, flat.reshape(batch, -1)).view(batch, q_len, k_len)

        positions = torch.arange(k_len, device=device)
        query_pos = positions[past_len:]
        position_bias = self.position_bias(query_pos, positions, relation).to(dtype)

        query_context = context_mask[:, past_len:, None]
        causal = positions[None, :] <= query_pos[:, None]
        visible = context_mask[:, None, :] | (~query_context & causal[None])
        # Padding sees nothing and is seen by nothing (its rows come out as zeros, as in the original).
        visible = visible & attention_mask[:, None, :] & attention_mask[:, past_len:, None]
        return position_bias, visible

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        context_mask: torch.Tensor | None = None,
        segment_rel: torch.LongTensor | None = None,
        ext_table_ids: torch.LongTensor | None = None,
        ext_table_sub: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        ext_table_mask: torch.Tensor | None = None,
        unk_allowed: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        segment_ids (`[batch, seq]`): segment of each token in the structured input (default: all 0, one segment).
        context_mask (`[batch, seq]`): 1 for context tokens, which see all context tokens (a bidirectional prompt),
            0 for tokens being predicted, which see the context and earlier predicted tokens (default: all 0, a
            causal language model over plain text).
        segment_rel (`[batch, n_seg, n_seg]`): relation bucket of each segment pair (0 = same segment).
        ext_table_ids / ext_table_sub (`[batch, ext]`): the batch ext table; ids >= vocab_size index it.

        ext_table_mask / unk_allowed: the tokenizer's decoding rule (which ext entries and whether `<unk>` a row may
            generate); `generate()` reads them, the forward pass does not (accepted so that
            ``model(**tokenizer(...))`` works).

        With a cache, ``attention_mask``, ``segment_ids`` and ``context_mask`` cover the cached tokens too.
        `CpmBeeTokenizer` returns all of them for a structured prompt.
        """
        config = self.config
        output_attentions, output_hidden_states, return_dict = output_flags(
            config, output_attentions, output_hidden_states, return_dict
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=config)

        past_len = cache.get_seq_length() if cache is not None else 0
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, ext_table_ids, ext_table_sub, validate=past_len == 0)
        batch, q_len = inputs_embeds.shape[:2]

        position_bias, visible = self._attention_inputs(
            batch, q_len, past_len, segment_ids, context_mask, attention_mask, segment_rel,
            inputs_embeds.device, inputs_embeds.dtype,
        )
        all_hidden_states = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        hidden_states = self.run_layers(inputs_embeds, position_bias, visible, cache, use_cache, all_hidden_states,
                                        all_attentions)
        outputs = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return outputs if return_dict else outputs.to_tuple()

    def run_layers(self, hidden_states, position_bias, visible, cache=None, use_cache=False,
                   all_hidden_states: list | None = None, all_attentions: list | None = None) -> torch.Tensor:
        """The decoder layers and the final norm, given the attention inputs of the queries (``[B, H, q, k]`` bias
        and ``[B, q, k]`` visibility); the static decode step calls it too. Collects each layer's input and the
        output into ``all_hidden_states``, and each layer's attention probabilities into ``all_attentions``, when
        given (the probabilities come from the eager path)."""
        additive_mask = None
        if (self.config._attn_implementation or "eager") != "eager" and all_attentions is None:
            additive_mask = position_bias.masked_fill(~visible[:, None], torch.finfo(position_bias.dtype).min)
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states, position_bias, visible, additive_mask, cache=cache, use_cache=use_cache,
                output_attentions=all_attentions is not None,
            )
            if all_attentions is not None:
                all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return hidden_states


def output_flags(config, output_attentions=None, output_hidden_states=None, return_dict=None) -> tuple:
    """``(output_attentions, output_hidden_states, return_dict)``: each argument, or the config's value when None."""
    return (config.output_attentions if output_attentions is None else output_attentions,
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.return_dict if return_dict is None else return_dict)


def extend_per_token(tensor: torch.Tensor | None, length: int, repeat_last: bool) -> torch.Tensor | None:
    """``[batch, seq]`` per-token input grown to ``length`` columns: new columns repeat the last one, or are 0."""
    if tensor is None or tensor.shape[-1] >= length:
        return tensor
    extra = length - tensor.shape[-1]
    fill = tensor[:, -1:].expand(-1, extra) if repeat_last else tensor.new_zeros((tensor.shape[0], extra))
    return torch.cat([tensor, fill], dim=-1)


class CpmBeeForCausalLM(CpmBeePreTrainedModel, GenerationMixin):
    """CPM-Bee with its output head: the tied embedding for the base vocabulary plus the ext-table columns.

    ``logits`` have ``vocab_size + ext_size`` columns; column ``vocab_size + k`` is ext-table entry ``k``.
    ``labels`` are aligned with the positions (``labels[:, p]`` is the token to predict *at* position p, as
    the original training targets are: the next token inside a predicted segment, ``</s>`` closing it);
    `CpmBeeTokenizer(..., return_labels=True)` builds them. They are not shifted again here.
    """

    def __init__(self, config: CpmBeeConfig):
        super().__init__(config)
        self.model = CpmBeeModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return None

    def compute_logits(self, hidden_states, ext_table_ids=None, ext_table_sub=None) -> torch.Tensor:
        logits = self.model.embed_tokens(hidden_states=hidden_states)
        if ext_table_ids is not None and ext_table_ids.shape[-1] > 0:
            ext = self.model.ext_embeddings(
                ext_table_ids.expand(hidden_states.shape[0], -1), ext_table_sub.expand(hidden_states.shape[0], -1)
            )
            ext_logits = torch.matmul(hidden_states.to(ext.device), ext.transpose(1, 2))
            logits = torch.cat([logits, ext_logits.to(logits.device)], dim=-1)
        return logits

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
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
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        labels (`[batch, seq]`, *optional*): the target *at* each position (-100 where none), as
            `CpmBeeTokenizer(..., return_labels=True)` builds them; not shifted again.
        shift_labels (`[batch, seq]`, *optional*): targets already aligned with the positions, as sequence- and
            context-parallel trainers pass them; for CPM-Bee they are the same kind of targets as ``labels`` and
            take their place when both are given.
        num_items_in_batch (*optional*): the number of targets over the whole (accumulated) batch; the loss is then
            their sum divided by it.

        Other arguments are those of [`CpmBeeModel.forward`].
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            context_mask=context_mask,
            segment_rel=segment_rel,
            ext_table_ids=ext_table_ids,
            ext_table_sub=ext_table_sub,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.compute_logits(hidden_states, ext_table_ids, ext_table_sub)
        targets = shift_labels if shift_labels is not None else labels
        loss = None if targets is None else self.aligned_loss(logits, targets, num_items_in_batch)
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict else result.to_tuple()

    @staticmethod
    def aligned_loss(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Cross-entropy (in float32) of ``logits`` against position-aligned ``targets`` (-100: no target); the
        mean, or the sum divided by ``num_items_in_batch``."""
        targets = targets.to(logits.device)
        if not torch.compiler.is_compiling() and bool((targets >= logits.shape[-1]).any()):
            raise ValueError(
                f"labels contain ids >= {logits.shape[-1]} (vocab + ext table): build labels and ext table "
                "in the same tokenizer call"
            )
        flat_logits, flat_targets = logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
        return fixed_cross_entropy(flat_logits, flat_targets, num_items_in_batch, ignore_index=-100)

    # -- generation -------------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, segment_ids=None,
                                      context_mask=None, segment_rel=None, ext_table_ids=None, ext_table_sub=None,
                                      **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs,
        )
        # The per-token inputs (and the 2D padding mask, never a prebuilt 4D one) cover cached + new tokens; the
        # model slices the queries' part itself. Tokens past the prompt (generated, or candidates of assisted
        # decoding and prompt lookup) continue its last segment and are not context.
        new = model_inputs["inputs_embeds" if model_inputs.get("input_ids") is None else "input_ids"].shape[1]
        total = (cache.get_seq_length() if cache is not None else 0) + new
        model_inputs.update(
            attention_mask=attention_mask,
            segment_ids=extend_per_token(segment_ids, total, repeat_last=True),
            context_mask=extend_per_token(context_mask, total, repeat_last=False),
            segment_rel=segment_rel, ext_table_ids=ext_table_ids, ext_table_sub=ext_table_sub,
        )
        return model_inputs

    def generate(self, inputs=None, generation_config=None, logits_processor=None, ext_table_mask=None,
                 unk_allowed=None, **kwargs):
        """`GenerationMixin.generate`, plus the original's vocabulary rule when the tokenizer's
        ``ext_table_mask``/``unk_allowed`` are passed: a row may only produce its own ext-table entries,
        and ``<unk>`` only when its input had an out-of-vocabulary piece."""
        check_generation_config(
            generation_config if generation_config is not None else self.generation_config, kwargs, original=False
        )
        check_input_tensors({"inputs": inputs, **kwargs})
        logits_processor = add_vocab_rule(logits_processor, self.config, ext_table_mask, unk_allowed)
        return super().generate(
            inputs, generation_config=generation_config, logits_processor=logits_processor, **kwargs
        )


__all__ = ["CpmBeeForCausalLM", "CpmBeeModel", "CpmBeePreTrainedModel"]
