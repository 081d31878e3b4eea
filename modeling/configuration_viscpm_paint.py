"""Configuration of VisCPM-Paint's text encoder: CPM-Bee and the bridge into the UNet's cross-attention width."""

from transformers import PretrainedConfig

from .configuration_cpmbee import CpmBeeConfig


class VisCPMPaintTextEncoderConfig(PretrainedConfig):
    r"""
    Configuration of a [`VisCPMPaintTextEncoder`].

    Args:
        text_config (`CpmBeeConfig` or `dict`, *optional*): the CPM-Bee language model (default: the 10B model).
        projection_dim (`int`, defaults to 1024): output width, the UNet's `cross_attention_dim`.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of the bridge's LayerNorm.
    """

    model_type = "viscpm_paint_text_encoder"
    sub_configs = {"text_config": CpmBeeConfig}

    def __init__(self, text_config=None, projection_dim: int = 1024, layer_norm_eps: float = 1e-6, **kwargs):
        if text_config is None:
            text_config = CpmBeeConfig()
        elif isinstance(text_config, dict):
            text_config = CpmBeeConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        self.text_config = text_config
        self.projection_dim = projection_dim
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A CPM-Bee config (e.g. of a checkpoint of the language model alone) is the text config, not the 10B
        default with the checkpoint's fields beside it."""
        if config_dict.get("model_type") == CpmBeeConfig.model_type:
            config_dict = {"text_config": config_dict}
        return super().from_dict(config_dict, **kwargs)


__all__ = ["VisCPMPaintTextEncoderConfig"]
