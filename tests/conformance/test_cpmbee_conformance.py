"""CpmBeeModel / CpmBeeForCausalLM under transformers' own common tests (ModelTesterMixin, GenerationTesterMixin,
ConfigTester), run from the upstream folder (see upstream.py), with tiny models: once with the tokenizer's
structured inputs (segments, context flags, segment relations, padding) and once with input_ids only."""

import copy
import unittest

import torch
from cpmbee_inputs import TINY_VOCAB_LINES, left_padded, tiny_tokenizer
from upstream import UpstreamTables  # first: puts the upstream test folders on sys.path
from tests.generation.test_utils import GenerationTesterMixin
from tests.test_configuration_common import ConfigTester
from tests.test_modeling_common import ModelTesterMixin, ids_tensor

from viscpm import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeModel

TABLES = dict(MODEL_MAPPING_NAMES="CpmBeeModel", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES="CpmBeeForCausalLM")
# Structured prompts: several segments (nested keys), context and predicted tokens, an out-of-vocabulary piece
# (`<unk>` with the sub index 0) and left padding. They hold no second out-of-vocabulary piece: that would open the
# batch ext table, whose entries add columns to the logits (vocab_size + ext_size, CPM-Bee's copy mechanism) and
# ids >= vocab_size to the input, which the upstream shape checks (vocab_size columns, `get_input_embeddings()(ids)`)
# do not know. The ext table is tested against the original in tests/modeling/test_modeling.py, and under the same
# contracts (outputs, export, candidates of assisted decoding) in tests/modeling/test_hf_contracts.py.
PROMPTS = [
    {"q": "1+1 𠀀", "<ans>": ""},
    {"c": {"t": "ab"}, "d": "cd", "<ans>": ""},
]


class CpmBeeModelTester:
    def __init__(self, parent, structured: bool, batch_size=2, seq_length=7, is_training=True):
        self.parent = parent
        self.structured = structured
        self.batch_size = batch_size
        self.is_training = is_training
        self.vocab_size = TINY_VOCAB_LINES
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.head_dim = 8
        self.intermediate_size = 37
        if structured:
            import tempfile

            self.tokenizer = tiny_tokenizer(tempfile.gettempdir())
            self.encoded = self.tokenizer(copy.deepcopy(PROMPTS[:batch_size]), return_tensors="pt", padding=True)
            self.seq_length = self.encoded["input_ids"].shape[1]
        else:
            self.seq_length = seq_length

    def get_config(self):
        return CpmBeeConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, position_bias_num_buckets=16,
            position_bias_num_segment_buckets=32, position_bias_max_distance=32, rotary_dtype="float32",
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        if self.structured:
            inputs = {key: value.clone() for key, value in self.encoded.items()
                      if key not in ("ext_table_mask", "unk_allowed")}
        else:
            input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
            attention_mask = torch.ones_like(input_ids)
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return config, inputs


class _CpmBeeConformance(UpstreamTables, ModelTesterMixin, GenerationTesterMixin):
    all_model_classes = (CpmBeeModel, CpmBeeForCausalLM)
    model_type, model_tables = "cpmbee", TABLES
    structured = True

    def setUp(self):
        self.model_tester = CpmBeeModelTester(self, structured=self.structured)
        self.config_tester = ConfigTester(self, config_class=CpmBeeConfig, hidden_size=32)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_left_padding_compatibility(self):
        """Structured inputs carry per-token segment ids and context flags: the test's left padding pads them
        as the tokenizer does (segment 0, not context), through the hook the upstream test provides for this."""
        _, inputs = self.prepare_config_and_inputs_for_generate()
        super().test_left_padding_compatibility(padded_custom_inputs=left_padded(inputs))


class CpmBeeStructuredConformanceTest(_CpmBeeConformance, unittest.TestCase):
    structured = True


class CpmBeeInputIdsConformanceTest(_CpmBeeConformance, unittest.TestCase):
    structured = False
