"""The runnable examples (examples/chat.py, paint.py, pipelines.py) on tiny converted models: they run, and what
they print or save is what the library gives for the same call."""

import importlib.util
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_chat_example(tiny_models, photo, capsys):
    from viscpm import VisCPMChat

    chat_dir, _ = tiny_models
    context = _example("chat").main(["--model", str(chat_dir), "--image", str(photo), "--max-new-tokens", "6",
                                     "什么？"])
    printed = capsys.readouterr().out
    chat = VisCPMChat.from_pretrained(chat_dir, device="cpu")
    image = PIL.Image.open(photo)
    first, history, vision = chat.chat(image, "什么？", max_new_tokens=6)
    second, history, _ = chat.chat(image, "What colours do you see?", context=history, vision_hidden_states=vision,
                                   max_new_tokens=6)
    assert context == history
    assert f"Q: 什么？\nA: {first}\n" in printed and f"A: {second}\n" in printed
    assert "A (greedy, streamed): " in printed


def test_paint_example(tiny_models, tmp_path, monkeypatch):
    from viscpm import VisCPMPaint

    _, paint_dir = tiny_models
    monkeypatch.chdir(tmp_path)
    grid, image = _example("paint").main(["--model", str(paint_dir), "a cat", "--steps", "3", "--size", "32",
                                          "--seed", "1", "--output", "cat"])
    painter = VisCPMPaint.from_pretrained(paint_dir, image_safety_checker=None, prompt_safety_checker=None,
                                          add_ranker=None, device="cpu")
    expected = painter.generate("a cat", negative_prompt="模糊, low quality", image_size=32,
                                generator=torch.Generator().manual_seed(1))
    assert np.array_equal(np.asarray(grid), np.asarray(expected))
    assert PIL.Image.open(tmp_path / "cat.png").size == (32, 32) == image.size
    assert (tmp_path / "cat-dpm.png").is_file()


def test_pipelines_example(tiny_models, photo, tmp_path, monkeypatch):
    from viscpm import VisCPMChat

    chat_dir, paint_dir = tiny_models
    monkeypatch.chdir(tmp_path)
    answer, follow_up, picture = _example("pipelines").main([
        "--chat-model", str(chat_dir), "--paint-model", str(paint_dir), "--image", str(photo), "--question", "什么？",
        "--steps", "2", "--size", "32",
    ])
    chat = VisCPMChat.from_pretrained(chat_dir, device="cpu")
    image = PIL.Image.open(photo)
    expected, history, vision = chat.chat(image, "什么？")
    assert answer == expected
    again, _, _ = chat.chat(image, "What colours do you see?", context=history, vision_hidden_states=vision)
    assert follow_up == again
    assert picture.size == (32, 32) and (tmp_path / "pipeline-painting.png").is_file()
