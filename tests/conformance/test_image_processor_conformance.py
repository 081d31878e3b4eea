"""transformers' own `ImageProcessingTestMixin` (5.24, run from the shared upstream folder) against VisCPMImageProcessor."""

import unittest

import upstream  # noqa: F401  (puts the upstream test folders on sys.path)
from skipping import skipped_tests
from tests.test_image_processing_common import ImageProcessingTester, ImageProcessingTestMixin

from viscpm.modeling import VisCPMImageProcessor


ONE_BACKEND = "one backend (PIL) only: there is no second backend to compare with"
TORCHVISION = ("bit-exact parity with the original needs PIL's bicubic resize (the original runs torchvision's Resize "
               "on PIL images): there is no torchvision-tensor backend, which would resize differently")
SKIPS = {
    "test_new_models_require_torchvision_backend": TORCHVISION,
    "test_fast_image_processor_explicit_none_preserved": TORCHVISION,
    "test_can_compile_torchvision_backend": TORCHVISION + "; it also needs a GPU",
    "test_backends_equivalence": ONE_BACKEND,
    "test_backends_equivalence_batched": ONE_BACKEND,
    "test_save_load_backends": ONE_BACKEND,
    "test_save_load_backends_auto": ONE_BACKEND,
    "test_image_processor_preprocess_arguments": (
        "checks that unknown arguments only warn; ours raise a TypeError naming them (tested in test_chat_processor)"),
    "test_pil_can_run_without_torchvision": (
        "its subprocess loads the class by name through AutoImageProcessor without trust_remote_code, which finds "
        "only classes built into transformers (no torchvision import: tests/test_architecture.py checks modeling/)"),
}


class VisCPMImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": 18, "width": 18})
        kwargs.setdefault("do_resize", True)
        kwargs.setdefault("do_normalize", True)
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        super().__init__(parent, batch_size=4, min_resolution=20, max_resolution=80, **kwargs)

    def _get_image_processing_classes(self):
        # Upstream reads its static IMAGE_PROCESSOR_MAPPING_NAMES by the test folder's name; ours is registered at
        # run time, so name the class directly (PIL backend: the only one, see SKIPS).
        return {"pil": VisCPMImageProcessor}



class VisCPMImageProcessingTest(ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = VisCPMImageProcessingTester

    locals().update(skipped_tests(SKIPS))
