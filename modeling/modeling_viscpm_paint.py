"""The text encoder of VisCPM-Paint: CPM-Bee followed by a small bridge into the UNet's cross-attention space.

VisCPM-Paint conditions a Stable Diffusion 2.1 UNet on CPM-Bee instead of CLIP. The prompt is encoded as the
CPM-Bee dict ``{"caption": prompt, "objects": ""}`` (all tokens context), CPM-Bee's last hidden states (after
its final norm) go through ``Linear(hidden_size, projection_dim, bias=False)`` and ``LayerNorm(projection_dim)``,
and the result is the UNet's ``encoder_hidden_states``. No attention mask reaches the UNet, so the states at
padded positions are part of the conditioning: they are computed as the original computes them (see
[`VisCPMPaintTextEncoder.forward`]).

Only torch, transformers and sibling files are imported: the file also ships as remote code.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_viscpm_paint import VisCPMPaintTextEncoderConfig
from .modeling_cpmbee import CpmBeeModel, output_flags


@dataclass
class VisCPMPaintTextEncoderOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`[batch, seq, projection_dim]`): the UNet conditioning (after the bridge).
        text_hidden_state (`[batch, seq, hidden_size]`): CPM-Bee's last hidden states (after its final norm).
        hidden_states (`tuple[torch.FloatTensor]`, with `output_hidden_states`): CPM-Bee's hidden states, the input
            of each layer and the output after the final norm (`num_hidden_layers + 1` of `[batch, seq, hidden_size]`).
        attentions (`tuple[torch.FloatTensor]`, with `output_attentions`): CPM-Bee's attention probabilities per
            layer, as CPM-Bee returns them.
    """

    last_hidden_state: torch.FloatTensor | None = None
    text_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class VisCPMPaintTextEncoder(PreTrainedModel):
    """CPM-Bee + ``projection`` (Linear, no bias) + ``layer_norm``: prompt tokens → UNet conditioning.

    The original checkpoint's ``llm.*`` keys are ``model.*`` here, ``trans_block.w_out_res`` is
    ``projection`` and ``trans_block.layernorm`` is ``layer_norm``.
    """

    config_class = VisCPMPaintTextEncoderConfig
    config: VisCPMPaintTextEncoderConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CpmBeeDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: VisCPMPaintTextEncoderConfig):
        super().__init__(config)
        text_config = config.text_config
        self.model = CpmBeeModel(text_config)
        self.projection = nn.Linear(text_config.hidden_size, config.projection_dim, bias=False)
        self.layer_norm = nn.LayerNorm(config.projection_dim, eps=config.layer_norm_eps)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif module is getattr(self, "projection", None):
            nn.init.normal_(module.weight, std=self.config.text_config.hidden_size**-0.5)
        else:
            self.model._init_weights(module)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def bridge(self, text_hidden_state: torch.Tensor) -> torch.Tensor:
        """CPM-Bee states (after its final norm) into the UNet's cross-attention space."""
        return self.layer_norm(self.projection(text_hidden_state))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        context_mask: torch.Tensor | None = None,
        segment_rel: torch.LongTensor | None = None,
        ext_table_ids: torch.LongTensor | None = None,
        ext_table_sub: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VisCPMPaintTextEncoderOutput | tuple:
        r"""
        Inputs are what [`CpmBeeTokenizer`] returns for ``{"caption": prompt, "objects": ""}`` (right padding).

        Padded positions (``attention_mask == 0``) are not dropped: the UNet attends to them, as in the
        original; CPM-Bee gives them the original's states (the padding token attending to nothing).
        ``output_attentions``, ``output_hidden_states`` and ``return_dict`` default to the config's.
        """
        kwargs.pop("use_cache", None)
        kwargs.pop("token_type_ids", None)
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            context_mask=context_mask,
            segment_rel=segment_rel,
            ext_table_ids=ext_table_ids,
            ext_table_sub=ext_table_sub,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        output = VisCPMPaintTextEncoderOutput(
            last_hidden_state=self.bridge(outputs.last_hidden_state),
            text_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["VisCPMPaintTextEncoder", "VisCPMPaintTextEncoderOutput"]
