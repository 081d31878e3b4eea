"""Inputs for the conformance tests of the CPM-Bee-based models: a tokenizer over a tiny vocabulary (so tiny models
keep tiny embeddings) and the left padding of the per-token structured inputs."""

import functools
from pathlib import Path

import torch

from viscpm import CpmBeeTokenizer

TINY_VOCAB_LINES = 120  # the special tokens, ASCII punctuation, digits and letters of bee.txt


@functools.cache
def tiny_tokenizer(tmp_root: str) -> CpmBeeTokenizer:
    """The first `TINY_VOCAB_LINES` lines of bee.txt (taken from the installed original package, or of its stand-in:
    tests/originals.py) as a vocabulary."""
    from originals import vocab_file

    lines = Path(vocab_file()).read_text(encoding="utf-8").splitlines()[:TINY_VOCAB_LINES]
    path = Path(tmp_root) / "tiny_vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return CpmBeeTokenizer(str(path))


def left_padded(inputs: dict, keys=("segment_ids", "context_mask"), size: int = 32) -> dict:
    """The per-token structured inputs padded on the left as the tokenizer pads them (segment 0, not context), for
    the upstream left-padding test's hook for model-specific inputs."""
    padded = {}
    for key in keys:
        if key in inputs:
            padding = torch.zeros((inputs[key].shape[0], size), dtype=inputs[key].dtype, device=inputs[key].device)
            padded[key] = torch.cat([padding, inputs[key]], dim=1)
    return padded
