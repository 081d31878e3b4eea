"""transformers' own `ProcessorTesterMixin` (5.24, run from the shared upstream folder) against VisCPMChatProcessor.

The parts are the real tokenizer (the original's vocabulary, from the oracle package; a stand-in of the same format
without it, tests/originals.py) and the image processor; the processor is saved and loaded the standard way
(`from_pretrained`, `AutoTokenizer` / `AutoImageProcessor` for the parts) with 8 image slots, so that upstream's
padding lengths hold whole prompts.
"""

import unittest

import upstream  # noqa: F401  (puts the upstream test folders on sys.path)
from originals import vocab_file
from skipping import skipped_tests
from tests.test_processing_common import ProcessorTesterMixin

import viscpm  # noqa: F401  (registers the Auto classes)
from viscpm.modeling import CpmBeeTokenizer, VisCPMChatProcessor, VisCPMImageProcessor


QUERY_NUM = 8

NO_TEMPLATE = ("VisCPM-Chat has no Jinja chat template: chats are laid out in code as the original's prompt dict "
               "(tested in test_chat_processor), and upstream's template tests open with a system message, which "
               "VisCPM-Chat has no place for")
SKIPS = {
    "test_processor_text_has_no_visual": (
        "VisCPM-Chat's prompt always holds the image slots, which the model fills in every row: a batch cannot mix "
        "items with and without an image (a clear error says so)"),
    "test_get_num_multimodal_tokens_matches_processor_call": (
        "its second half gives two images per text; VisCPM-Chat takes one image per item (a clear error says so); "
        "the helper itself is tested against mm_token_type_ids in test_chat_processor"),
    "test_replacement_offsets": "VisCPM-Chat expands no placeholder text: the image slots are laid out in the "
                                "prompt dict, and image_bound says where they are",
    **{name: NO_TEMPLATE for name in dir(ProcessorTesterMixin) if name.startswith((
        "test_apply_chat_template_image", "test_apply_chat_template_assistant_mask",
        "test_apply_chat_template_tool_calls_no_content", "test_chat_template_jinja_kwargs",
        "test_chat_template_message_objects"))},
    # Modalities VisCPM-Chat does not have (upstream skips these itself, for want of a video/audio processor).
    **{name: "VisCPM-Chat takes images and text only: no video or audio processor" for name in dir(ProcessorTesterMixin)
       if name.startswith("test_") and ("video" in name or "audio" in name)},
}



class VisCPMChatProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = VisCPMChatProcessor

    @classmethod
    def _setup_image_processor(cls):
        return VisCPMImageProcessor()

    @classmethod
    def _setup_tokenizer(cls):
        return CpmBeeTokenizer(vocab_file())

    @staticmethod
    def prepare_processor_dict():
        return {"query_num": QUERY_NUM, "max_prompt_length": 500}

    def _prepare_modality_input(self, modality, batch_size=None):
        # The processor reads `text` as a question and lays it out in the chat prompt; the tokenizer alone lays out
        # the same prompt only when given the prompt dict, which the processor accepts too.
        if modality == "text":
            processor = self.get_processor()
            return processor.build_prompt(self.prepare_text_inputs())
        return super()._prepare_modality_input(modality, batch_size=batch_size)

    locals().update(skipped_tests(SKIPS))
