"""transformers' own `TokenizerTesterMixin` (5.24, run from the shared upstream folder) against CpmBeeTokenizer.

The tokenizer is the real one (the original's 86,583-piece vocabulary, taken from the installed oracle package; a
stand-in of the same format without it, tests/originals.py) and is loaded the standard way, through `AutoTokenizer`
from a saved folder. `test_integration` (an oracle test) compares its pieces, ids and decoded text with the original
VisCPM tokenizer's on upstream's test string (pieces outside the vocabulary are
`<unk>` in plain-text ids, as for any transformers tokenizer; CPM-Bee dicts keep them apart in the ext table).
"""

import shutil
import tempfile
import unittest

import pytest
import upstream  # noqa: F401  (puts the upstream test folders on sys.path)
from originals import vocab_file
from skipping import skipped_tests
from tests.test_tokenization_common import TokenizerTesterMixin

import viscpm  # noqa: F401  (registers the Auto classes)
from viscpm.modeling import CpmBeeConfig, CpmBeeTokenizer


PAIRS = "text pairs / targets: CPM-Bee reads one input (one structured dict), pairs are refused with a clear error"

# Upstream tests that cannot apply here, each with its reason.
SKIPS = {
    "test_call": PAIRS,
    "test_mask_output": PAIRS,
    "test_maximum_encoding_length_pair_input": PAIRS,
    "test_number_of_added_tokens": PAIRS,
    "test_prepare_seq2seq_batch": PAIRS,
    "test_special_tokens_mask_input_pairs": PAIRS,
    "test_pretokenized_inputs": PAIRS + " (its single and batched word inputs are tested in test_tokenizer.py)",
    "test_sequence_ids": PAIRS + "; sequence_ids() exists only for tokenizers-library (fast) encodings",
    "test_integration_from_extractor": "needs a tokenizers-library tokenizer.json to extract from; CPM-Bee's "
                                       "tokenizer is a Python longest-match over vocab.txt",
    "test_chat_template_return_assistant_tokens_mask": "assistant masks need character offsets, which only "
                                                       "tokenizers-library (fast) tokenizers return",
    "test_chat_template_return_assistant_tokens_mask_truncated": "assistant masks need character offsets, which "
                                                                 "only tokenizers-library (fast) tokenizers return",
    "test_chat_template_save_loading": "reads reloaded.tokenizer.chat_template, an attribute no transformers "
                                       "tokenizer has; saving and reloading a template is covered by "
                                       "test_chat_template",
}



class CpmBeeTokenizationTest(TokenizerTesterMixin, unittest.TestCase):
    tokenizer_class = CpmBeeTokenizer
    test_tokenizer_from_extractor = False

    @classmethod
    def setUpClass(cls):
        # A saved tokenizer folder that AutoTokenizer resolves (config.json of model type "cpmbee").
        cls.source_dir = tempfile.mkdtemp()
        CpmBeeTokenizer(vocab_file()).save_pretrained(cls.source_dir)
        CpmBeeConfig().save_pretrained(cls.source_dir)
        cls.from_pretrained_id = [cls.source_dir]
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.source_dir, ignore_errors=True)

    @pytest.mark.oracle
    def test_integration(self):
        """Upstream's check, expecting the original tokenizer's pieces and decoding of upstream's test string."""
        from oracle import OriginalTokenizer

        original = OriginalTokenizer()
        text = self.integration_test_input_string
        ids, _ = original.encode(text)
        unk = original.encoder[original.unk_token]
        self.integration_expected_tokens = [piece.token for piece in original.tokenize(text)]
        self.integration_expected_token_ids = [index if index < original.vocab_size else unk for index in ids]
        self.integration_expected_decoded_text = original.decode(self.integration_expected_token_ids)
        super().test_integration()

    # Upstream marks it slow for large vocabularies; for this one it takes about a second: run it.
    def test_conversion_reversible(self):
        TokenizerTesterMixin.test_conversion_reversible.__wrapped__(self)

    locals().update(skipped_tests(SKIPS))


def test_missing_upstream_folder_is_an_error(tmp_path):
    """Conformance tests never skip silently: without the upstream folder, importing `upstream` fails and says where
    it looked."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import upstream"], cwd=os.path.dirname(upstream.__file__),
                            env={**os.environ, "VISCPM_HF_UPSTREAM_TESTS": str(tmp_path / "nowhere")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "were not found; looked in: " + str(tmp_path / "nowhere") in result.stderr
