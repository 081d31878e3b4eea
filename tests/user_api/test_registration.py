"""`import viscpm` registers every class with the transformers Auto classes and the Paint pipeline with diffusers,
without loading the model code (viscpm/auto.py): each test runs in a fresh interpreter, as a user's program does."""

import json
import subprocess
import sys

import numpy as np
import torch
from paint_testing import EN, SIZE


def _run(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LOADED = """
import sys
heavy = sorted(m for m in sys.modules if m.startswith(("diffusers", "torchvision", "viscpm.modeling.modeling_",
                                                       "viscpm.modeling.pipeline_", "viscpm.modeling.tokenization_",
                                                       "viscpm.modeling.processing_", "viscpm.modeling.image_")))
"""


def test_import_registers_without_loading_the_model_code(chat):
    folder = chat[3]
    out = _run(f"""
import json, viscpm
{LOADED}
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer)
names = [type(AutoConfig.from_pretrained({str(folder)!r})).__name__,
         type(AutoModelForImageTextToText.from_pretrained({str(folder)!r})).__name__,
         type(AutoModel.from_pretrained({str(folder)!r})).__name__,
         type(AutoTokenizer.from_pretrained({str(folder)!r})).__name__,
         type(AutoProcessor.from_pretrained({str(folder)!r})).__name__,
         type(AutoImageProcessor.from_pretrained({str(folder)!r})).__name__]
print(json.dumps({{"heavy": heavy, "names": names}}))
""")
    assert out["heavy"] == []
    assert out["names"] == ["VisCPMChatConfig", "VisCPMChatForConditionalGeneration",
                            "VisCPMChatForConditionalGeneration", "CpmBeeTokenizer", "VisCPMChatProcessor",
                            "VisCPMImageProcessor"]


def test_auto_classes_work_whatever_was_imported_first(chat):
    """transformers' processor classes and diffusers loaded before viscpm: registration sees them at once."""
    folder = chat[3]
    out = _run(f"""
import json
from transformers import AutoProcessor, AutoImageProcessor
from diffusers import DiffusionPipeline
import viscpm
print(json.dumps([type(AutoProcessor.from_pretrained({str(folder)!r})).__name__,
                  type(AutoImageProcessor.from_pretrained({str(folder)!r})).__name__,
                  viscpm.VisCPMPaintPipeline.__name__]))
""")
    assert out == ["VisCPMChatProcessor", "VisCPMImageProcessor", "VisCPMPaintPipeline"]


def test_diffusion_pipeline_loads_a_converted_paint_folder(paint):
    """`DiffusionPipeline.from_pretrained(folder)` gives our pipeline and its images (both import orders)."""
    folder = paint["root"] / "hf"
    expected = paint["pipe"](EN, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
                             generator=torch.Generator().manual_seed(4)).images
    for first, second in (("import viscpm", "from diffusers import DiffusionPipeline"),
                          ("from diffusers import DiffusionPipeline", "import viscpm")):
        out = _run(f"""
import json, torch
{first}
{second}
pipe = DiffusionPipeline.from_pretrained({str(folder)!r})
pipe.set_progress_bar_config(disable=True)
images = pipe({EN!r}, num_inference_steps=2, height={SIZE}, width={SIZE}, output_type="np",
              generator=torch.Generator().manual_seed(4)).images
print(json.dumps({{"class": type(pipe).__name__, "images": images.tolist()}}))
""")
        assert out["class"] == "VisCPMPaintPipeline"
        assert np.abs(np.asarray(out["images"]) - expected).max() <= 1e-5  # another process: float32 rounding
