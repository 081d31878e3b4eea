"""VisCPMChatForConditionalGeneration (as shipped: the class, its configs and its default generation config) under
transformers' own common tests (ModelTesterMixin, GenerationTesterMixin, ConfigTester), run from the upstream
folder (see upstream.py), with a tiny model and the tokenizer's structured prompt holding the image slots."""

import copy
import tempfile
import unittest

from cpmbee_inputs import left_padded, tiny_tokenizer
from skipping import skipped_tests
from upstream import UpstreamTables  # first: puts the upstream test folders on sys.path
from tests.generation.test_utils import GenerationTesterMixin
from tests.test_configuration_common import ConfigTester
from tests.test_modeling_common import ModelTesterMixin, floats_tensor

from viscpm import VisCPMChatConfig, VisCPMChatForConditionalGeneration

TABLES = dict(
    MODEL_MAPPING_NAMES="VisCPMChatForConditionalGeneration",
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES="VisCPMChatForConditionalGeneration",
)
QUERY_NUM = 4
IMAGE_SIZE = 16
PROMPTS = [
    {"image": "<unk>" * QUERY_NUM, "context": "", "question": "1+1 𠀀", "<ans>": ""},
    {"image": "<unk>" * QUERY_NUM, "context": "ab", "question": "cd", "<ans>": ""},
]
IMAGE_WITH_EMBEDS = ("an image together with inputs_embeds is refused on purpose (clear error): the image goes into "
                     "the slots of the prompt's input_ids")
SKIPS = {
    "test_model_base_model_prefix": "Chat has no separate base model: vision encoder, queries, mapping and CPM-Bee "
                                    "are its parts",
    **{name: IMAGE_WITH_EMBEDS for name in ("test_inputs_embeds", "test_inputs_embeds_matches_input_ids",
                                            "test_generate_from_inputs_embeds_0_greedy",
                                            "test_generate_from_inputs_embeds_1_beam_search")},
}


class VisCPMChatModelTester:
    def __init__(self, parent, batch_size=2, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        self.tokenizer = tiny_tokenizer(tempfile.gettempdir())
        self.encoded = self.tokenizer(copy.deepcopy(PROMPTS[:batch_size]), return_tensors="pt", padding=True)
        self.seq_length = self.encoded["input_ids"].shape[1]
        self.vocab_size = len(self.tokenizer)
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.image_size = IMAGE_SIZE

    def get_config(self):
        return VisCPMChatConfig(
            vision_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                               image_size=IMAGE_SIZE, patch_size=8, max_query_positions=8),
            text_config=dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                             num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                             head_dim=8, intermediate_size=37, position_bias_num_buckets=16,
                             position_bias_num_segment_buckets=32, position_bias_max_distance=32,
                             rotary_dtype="float32"),
            query_num=QUERY_NUM,
        )

    def prepare_config_and_inputs_for_common(self):
        inputs = {key: value.clone() for key, value in self.encoded.items()
                  if key not in ("ext_table_mask", "unk_allowed")}
        inputs["pixel_values"] = floats_tensor([self.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE])
        return self.get_config(), inputs


class VisCPMChatConformanceTest(UpstreamTables, ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (VisCPMChatForConditionalGeneration,)
    model_type, model_tables = "viscpm_chat", TABLES
    _is_composite = True

    def setUp(self):
        self.model_tester = VisCPMChatModelTester(self)
        self.config_tester = ConfigTester(self, config_class=VisCPMChatConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_left_padding_compatibility(self):
        """The prompt's per-token segment ids and context flags are padded as the tokenizer pads them (segment 0,
        not context), through the hook the upstream test provides for model-specific inputs."""
        _, inputs = self.prepare_config_and_inputs_for_generate()
        super().test_left_padding_compatibility(padded_custom_inputs=left_padded(inputs))

    locals().update(skipped_tests(SKIPS))
