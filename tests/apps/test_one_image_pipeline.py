"""One image pipeline (issue 16): `viscpm chat --image`, the web app and `VisCPMChat.chat(path)` read a file through
the image processor's own loading, so 16-bit, float, int32 and transparent files give the same pixels everywhere
(plain `PIL.Image.convert("RGB")`, which the apps used before, clips 16-bit images to white and drops transparency
differently). The web app's upload component hands over the uploaded file itself (no conversion by gradio)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.apps.common import AppError, load_image
from viscpm.modeling import VisCPMImageProcessor


def _files(folder):
    """Image files whose naive RGB conversion differs from the image processor's."""
    ramp = (np.arange(40 * 30).reshape(30, 40) * 54).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "ramp16.png")  # mode I;16
    Image.fromarray((np.arange(40 * 30).reshape(30, 40) / 1200).astype(np.float32)).save(folder / "float.tiff")
    Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.int32)).save(folder / "int32.tiff")
    rgba = np.random.default_rng(0).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    rgba[:, :20, 3] = 0  # half transparent: white behind it, not the hidden colour
    Image.fromarray(rgba, mode="RGBA").save(folder / "transparent.png")
    palette = Image.new("P", (30, 20), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.save(folder / "palette.png", transparency=0)
    return ["ramp16.png", "float.tiff", "int32.tiff", "transparent.png", "palette.png"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    return path, _files(path)


def test_cli_loading_is_the_image_processors(folder):
    """`load_image` (viscpm chat --image, /image, the web app) hands chat() the file, checked by the image processor's
    loading; the pixels are those of `chat(path)`, and differ from the naive conversion the apps used before."""
    root, names = folder
    ip = VisCPMImageProcessor()
    for name in names:
        path = root / name
        loaded = load_image(path)
        assert loaded == str(path)
        expected = ip(str(path))["pixel_values"]
        assert torch.equal(ip(loaded)["pixel_values"], expected)
        with Image.open(path) as image:
            naive = ip(image.convert("RGB"))["pixel_values"]
        assert not torch.equal(naive, expected), name  # the old conversion would have answered differently


@pytest.mark.parametrize("make, words", [
    (lambda root: root / "missing.png", ["image", "missing.png not found"]),
    (lambda root: root, ["is a folder", "pass an image file"]),
    (lambda root: (root / "notes.png").write_bytes(b"hello") and root / "notes.png",
     ["cannot read image", "not an image file PIL can read", "pass a PNG, JPEG"]),
])
def test_cli_loading_errors(folder, make, words):
    with pytest.raises(AppError) as caught:
        load_image(make(folder[0]))
    for word in words:
        assert word in str(caught.value)


def test_web_upload_is_the_file_itself(folder):
    """The chat tab's image component gives the app the uploaded file unchanged (type filepath, no image mode), which
    the app reads with `load_image` and the chat's image processor."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from types import SimpleNamespace

    from viscpm.apps.web import build_app

    stub = SimpleNamespace(processor=SimpleNamespace(image_processor=VisCPMImageProcessor()))
    app = build_app(stub, stub)
    component = next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == "chat-image")
    root, names = folder
    for name in names:
        received = component.preprocess(component.data_model(path=str(root / name), orig_name=name))
        assert received == str(root / name)
        assert load_image(received, stub.processor.image_processor) == str(root / name)
