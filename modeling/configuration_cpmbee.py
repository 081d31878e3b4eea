"""Configuration of CPM-Bee, the bilingual language model under VisCPM."""

from transformers import PretrainedConfig


class CpmBeeConfig(PretrainedConfig):
    r"""
    Configuration of a [`CpmBeeModel`]. The defaults are the 10B model that VisCPM-Chat and
    VisCPM-Paint are built on.

    Args:
        vocab_size (`int`, defaults to 86583): size of the base vocabulary (`vocab.txt`). Token ids at or
            above it refer to the per-batch *ext table* (out-of-vocabulary pieces and numbered specials).
        hidden_size (`int`, defaults to 4096): width of the residual stream (`dim_model` in the original).
        num_hidden_layers (`int`, defaults to 48)
        num_attention_heads (`int`, defaults to 32)
        head_dim (`int`, defaults to 128): width of one head (`dim_head`).
        intermediate_size (`int`, defaults to 10240): width of the gated GELU feed-forward (`dim_ff`).
        position_bias_num_buckets (`int`, defaults to 256): buckets of the in-segment relative position.
        position_bias_num_segment_buckets (`int`, defaults to 256): buckets of segment-to-segment relations.
        position_bias_max_distance (`int`, defaults to 2048): distance where the log buckets saturate.
        rms_norm_eps (`float`, defaults to 1e-6)
        residual_scale (`float`, defaults to 1.05): every residual sum is divided by this.
        rotary_distance_scale (`int`, defaults to 16) and rotary_base (`float`, defaults to 10000): rotation
            of the input embedding by the token's `sub` index (how ext-table tokens stay distinct).
        rotary_dtype (`str`, defaults to `"float16"`): dtype in which that rotation is computed. The released
            checkpoints were trained with it in float16; a model converted from a float32 original uses
            `"float32"`. Matching it is what makes the ext-table embeddings equal the original's.
        dropout (`float`, defaults to 0.0): dropout on attention probabilities and block outputs (training).
    """

    model_type = "cpmbee"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"dim_model": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}

    def __init__(
        self,
        vocab_size: int = 86583,
        hidden_size: int = 4096,
        num_hidden_layers: int = 48,
        num_attention_heads: int = 32,
        head_dim: int = 128,
        intermediate_size: int = 10240,
        position_bias_num_buckets: int = 256,
        position_bias_num_segment_buckets: int = 256,
        position_bias_max_distance: int = 2048,
        rms_norm_eps: float = 1e-6,
        residual_scale: float = 1.05,
        rotary_distance_scale: int = 16,
        rotary_base: float = 10000.0,
        rotary_dtype: str = "float16",
        dropout: float = 0.0,
        use_cache: bool = True,
        pad_token_id: int = 0,
        unk_token_id: int = 1,
        bos_token_id: int = 6,
        eos_token_id: int = 7,
        **kwargs,
    ):
        if rotary_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"rotary_dtype must be 'float16', 'bfloat16' or 'float32', got {rotary_dtype!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.position_bias_num_buckets = position_bias_num_buckets
        self.position_bias_num_segment_buckets = position_bias_num_segment_buckets
        self.position_bias_max_distance = position_bias_max_distance
        self.rms_norm_eps = rms_norm_eps
        self.residual_scale = residual_scale
        self.rotary_distance_scale = rotary_distance_scale
        self.rotary_base = rotary_base
        self.rotary_dtype = rotary_dtype
        self.dropout = dropout
        self.use_cache = use_cache
        self.unk_token_id = unk_token_id
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs
        )


__all__ = ["CpmBeeConfig"]
