"""The apps paint with a folder's optional parts (prompt checker, ranker, image safety checker) and fetch none.

`viscpm paint` / the web app / the demo load a folder through `load_paint`, which is `VisCPMPaint.from_pretrained`
with every optional part set to "the folder's, if it has one": a folder with a prompt checker refuses prompts in the
apps as `VisCPMPaint` does, and a folder without parts loads offline (nothing is fetched from the Hub).
"""

import numpy as np
import pytest
import torch
from paint_testing import EN

from viscpm import VisCPMPaint
from viscpm.apps.common import AppError, load_paint, paint_images

PARTS = ("prompt_checker", "prompt_checker_tokenizer", "ranker", "ranker_processor")


@pytest.fixture(scope="module")
def folders(paint, paint_extras, tmp_path_factory):
    """(a folder with every optional part and a prompt checker that refuses everything, a folder without)."""
    root = tmp_path_factory.mktemp("paint-parts")
    pipe = paint["pipe"]
    parts = {name: paint_extras[name] for name in PARTS}
    VisCPMPaint(pipe, **parts, prompt_checker_threshold=0.0).save_pretrained(root / "strict")
    VisCPMPaint(pipe).save_pretrained(root / "plain")
    return root / "strict", root / "plain"


def test_a_folder_with_a_prompt_checker_refuses_in_the_apps(folders):
    strict, _ = folders
    painter = load_paint(str(strict), device="cpu", progress=False)
    assert painter.prompt_checker is not None and painter.ranker is not None
    with pytest.raises(AppError, match="the prompt checker refused this prompt; rephrase it"):
        paint_images(painter, EN, steps=2, seed=0, size=16)


def test_a_folder_without_parts_loads_offline_and_paints_as_the_pipeline(folders, paint, monkeypatch):
    _, plain = folders
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    painter = load_paint(str(plain), device="cpu", progress=False)
    assert painter.prompt_checker is None and painter.ranker is None and painter.pipeline.safety_checker is None
    images, flagged = paint_images(painter, EN, steps=2, seed=5, size=16)
    expected = paint["pipe"](EN, num_inference_steps=2, height=16, width=16, output_type="pil",
                             generator=torch.Generator().manual_seed(5)).images
    assert flagged == [False] and np.array_equal(np.asarray(images[0]), np.asarray(expected[0]))
