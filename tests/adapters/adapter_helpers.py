"""What the adapter tests share: the example scripts as modules, images, a small data file."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    """An example training script as a module (``main(argv)`` is its command line)."""
    module_name = f"example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def png_bytes(seed: int, size=(40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_chat_rows(folder: Path) -> tuple[Path, Path]:
    """A JSONL file of two LLaVA rows whose images are in ``folder / "images"``: (data file, image folder)."""
    images = folder / "images"
    images.mkdir()
    turn = [{"from": "human", "value": "Was siehst du?"}, {"from": "gpt", "value": "Einen Hund."}]
    rows = []
    for i in range(2):
        (images / f"{i}.png").write_bytes(png_bytes(i))
        rows.append({"image": f"{i}.png", "conversations": turn})
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return data, images
