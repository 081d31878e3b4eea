"""VisCPM-Paint against the ecosystem's own contracts: diffusers' `PipelineTesterMixin` family on the pipeline and
transformers' `ModelTesterMixin` on its text encoder, run from the upstream copies (see upstream.py), with tiny
components in the style of diffusers' `StableDiffusionPipelineFastTests`.

Every upstream test runs; the ones that cannot run here are skipped by upstream itself for hardware this machine
lacks (a CUDA/XPU accelerator, xformers), and the few skipped below say why in one line.
"""

import gc
import unittest
from functools import lru_cache

import torch
import upstream  # noqa: F401  (puts the upstream tests on sys.path)
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from hf_diffusers_tests.pipelines.pipeline_params import (
    TEXT_TO_IMAGE_BATCH_PARAMS,
    TEXT_TO_IMAGE_CALLBACK_CFG_PARAMS,
    TEXT_TO_IMAGE_IMAGE_PARAMS,
    TEXT_TO_IMAGE_PARAMS,
)
from hf_diffusers_tests.pipelines.test_pipelines_common import (
    PipelineKarrasSchedulerTesterMixin,
    PipelineLatentTesterMixin,
    PipelineTesterMixin,
    SDFunctionTesterMixin,
)
from tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from viscpm.modeling import (
    CpmBeeConfig,
    CpmBeeTokenizer,
    VisCPMPaintPipeline,
    VisCPMPaintTextEncoder,
    VisCPMPaintTextEncoderConfig,
)

TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=8, intermediate_size=37,
                 position_bias_num_buckets=32, position_bias_num_segment_buckets=32, position_bias_max_distance=64)


@lru_cache(maxsize=1)
def _tokenizer() -> CpmBeeTokenizer:
    from originals import vocab_file  # the installed original package's bee.txt, or a stand-in of its format

    return CpmBeeTokenizer(vocab_file())


def _register_pipeline_for_upstream():
    """diffusers' `test_encode_prompt_works_in_isolation` reads `encode_prompt`'s source through
    `getattr(diffusers.pipelines, cls.__name__)`, where only diffusers' own pipelines are: add ours there."""
    import diffusers.pipelines

    setattr(diffusers.pipelines, VisCPMPaintPipeline.__name__, VisCPMPaintPipeline)


_register_pipeline_for_upstream()


class _FrozenGarbageCollector:
    """Upstream's setUp and tearDown call `gc.collect()`, which scans the ~600,000 objects that importing transformers,
    diffusers and their tests creates (1.5 s each time here): freeze what exists when the class starts."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        gc.collect()
        gc.freeze()

    @classmethod
    def tearDownClass(cls):
        gc.unfreeze()
        super().tearDownClass()


class VisCPMPaintPipelineFastTests(
    _FrozenGarbageCollector,
    SDFunctionTesterMixin,
    PipelineLatentTesterMixin,
    PipelineKarrasSchedulerTesterMixin,
    PipelineTesterMixin,
    unittest.TestCase,
):
    pipeline_class = VisCPMPaintPipeline
    params = TEXT_TO_IMAGE_PARAMS
    batch_params = TEXT_TO_IMAGE_BATCH_PARAMS
    image_params = TEXT_TO_IMAGE_IMAGE_PARAMS
    image_latents_params = TEXT_TO_IMAGE_IMAGE_PARAMS
    callback_cfg_params = TEXT_TO_IMAGE_CALLBACK_CFG_PARAMS
    test_layerwise_casting = True

    def get_dummy_components(self):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, norm_num_groups=2,
        )
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False)
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        )
        torch.manual_seed(0)
        text_encoder = VisCPMPaintTextEncoder(
            VisCPMPaintTextEncoderConfig(text_config=CpmBeeConfig(**TINY_TEXT), projection_dim=32))
        return {
            "unet": unet, "scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": _tokenizer(),
            "safety_checker": None, "feature_extractor": None,
        }

    def get_dummy_inputs(self, device, seed=0):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return {
            "prompt": "A painting of a squirrel eating a burger",
            "generator": generator,
            "num_inference_steps": 2,
            "guidance_scale": 6.0,
            "output_type": "np",
        }


class VisCPMPaintTextEncoderTester:
    def __init__(self, parent, batch_size=2, seq_length=7, vocab_size=99, projection_dim=16):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.projection_dim = projection_dim
        self.hidden_size = TINY_TEXT["hidden_size"]
        self.num_hidden_layers = TINY_TEXT["num_hidden_layers"]
        self.num_attention_heads = TINY_TEXT["num_attention_heads"]
        self.is_training = True

    def get_config(self):
        text_config = CpmBeeConfig(vocab_size=self.vocab_size, **TINY_TEXT)
        return VisCPMPaintTextEncoderConfig(text_config=text_config, projection_dim=self.projection_dim)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class VisCPMPaintTextEncoderModelTest(_FrozenGarbageCollector, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (VisCPMPaintTextEncoder,)
    test_can_init_all_missing_weights_before_2023 = True  # a new model: its _init_weights covers every weight

    @classmethod
    def setUpClass(cls):
        """Upstream reads class roles from transformers' static tables, which `AutoModel.register` does not fill:
        the text encoder is a base model (no head, no loss), registered for `AutoModel`."""
        super().setUpClass()
        MODEL_MAPPING_NAMES[VisCPMPaintTextEncoderConfig.model_type] = VisCPMPaintTextEncoder.__name__

    @classmethod
    def tearDownClass(cls):
        MODEL_MAPPING_NAMES.pop(VisCPMPaintTextEncoderConfig.model_type, None)
        super().tearDownClass()

    def setUp(self):
        self.model_tester = VisCPMPaintTextEncoderTester(self)
