"""Configurations of VisCPM-Chat: the BEiT-3 vision encoder and the composite multimodal model."""

from transformers import PretrainedConfig

from .configuration_cpmbee import CpmBeeConfig


class VisCPMVisionConfig(PretrainedConfig):
    r"""
    Configuration of [`VisCPMVisionModel`], the BEiT-3 multiway encoder of VisCPM-Chat. The defaults are BEiT-3
    large at 224 px with 16 px patches, the encoder of the released checkpoints.

    The encoder reads the image patches (after a class token) and, appended behind them, the learned query tokens
    of the chat model. Every layer has two experts of each weight: one for the image part and one for the query
    part (BEiT-3's "A" and "B"); attention is joint over both parts.

    Args:
        hidden_size (`int`, defaults to 1024): width of the encoder (`encoder_embed_dim`).
        num_hidden_layers (`int`, defaults to 24): number of layers (`encoder_layers`).
        num_attention_heads (`int`, defaults to 16): attention heads (`encoder_attention_heads`).
        intermediate_size (`int`, defaults to 4096): FFN width (`encoder_ffn_embed_dim`).
        image_size (`int`, defaults to 224): side of the square input image (`img_size`).
        patch_size (`int`, defaults to 16): side of one patch (`patch_size`).
        num_channels (`int`, defaults to 3): image channels (`in_chans`).
        max_query_positions (`int`, defaults to 1024): rows of the query part's position table
            (`max_source_positions`); query positions are numbered from 2, as the original does.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm (`layernorm_eps`).
        hidden_act (`str`, defaults to `"gelu"`): FFN activation, a key of `transformers.activations.ACT2FN`
            (`"gelu"` is the exact, erf-based GELU of the released model).
        initializer_range (`float`, defaults to 0.02): std of the random init of a fresh model.
    """

    model_type = "viscpm_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        max_query_positions: int = 1024,
        layer_norm_eps: float = 1e-5,
        hidden_act: str = "gelu",
        initializer_range: float = 0.02,
        attention_dropout: float = 0.0,
        **kwargs,
    ):
        for name, value in (("hidden_size", hidden_size), ("num_attention_heads", num_attention_heads),
                            ("image_size", image_size), ("patch_size", patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # before they divide below
                raise ValueError(f"{name}={value!r} (must be a positive whole number)")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        from transformers.activations import ACT2FN  # here, not at import: it loads transformers' model loading

        if hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act {hidden_act!r} is not an activation of transformers (ACT2FN): use e.g. 'gelu'")
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.max_query_positions = max_query_positions
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        super().__init__(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisCPMChatConfig(PretrainedConfig):
    r"""
    Configuration of [`VisCPMChatForConditionalGeneration`]: a BEiT-3 vision encoder, `query_num` learned query
    tokens it reads together with the image, a `Linear -> GELU -> Linear` mapping into the language model's width,
    and CPM-Bee. The defaults are the released VisCPM-Chat (BEiT-3 large 224/16, 64 queries, CPM-Bee 10B).

    Args:
        vision_config (`VisCPMVisionConfig` or `dict`, *optional*): the vision encoder.
        text_config (`CpmBeeConfig` or `dict`, *optional*): the language model.
        query_num (`int`, defaults to 64): number of query tokens, and of `<unk>` image slots in the prompt.
    """

    model_type = "viscpm_chat"
    sub_configs_defaults = {"vision_config": VisCPMVisionConfig, "text_config": CpmBeeConfig}

    def __init__(self, vision_config=None, text_config=None, query_num: int = 64, **kwargs):
        if vision_config is None:
            vision_config = VisCPMVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = VisCPMVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        if text_config is None:
            text_config = CpmBeeConfig()
        elif isinstance(text_config, dict):
            text_config = CpmBeeConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        if query_num < 1:
            raise ValueError(f"query_num must be positive, got {query_num}")
        if query_num + 2 > vision_config.max_query_positions:
            raise ValueError(
                f"query_num ({query_num}) needs {query_num + 2} query positions but the vision encoder has "
                f"max_query_positions={vision_config.max_query_positions}"
            )
        self.vision_config = vision_config
        self.text_config = text_config
        self.query_num = query_num
        kwargs.setdefault("tie_word_embeddings", False)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            kwargs.setdefault(key, getattr(text_config, key))
        super().__init__(**kwargs)


__all__ = ["VisCPMChatConfig", "VisCPMVisionConfig"]
