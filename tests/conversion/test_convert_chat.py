"""The VisCPM-Chat converter: original `VLU_CPMBee` checkpoint -> `VisCPMChatForConditionalGeneration` folder.

The tiny original Chat checkpoint (`chat_files`) and its folder converted by the script (`chat`) come from
tests/conftest.py; the model's answers against the original are in tests/modeling/test_chat_model.py.
"""

import json
import logging

import pytest
import torch
from conftest import CHAT_QUERY_NUM, load_script
from originals import TINY_VISION_CONFIG
from transformers import AutoModelForImageTextToText

import viscpm  # noqa: F401  (registers the Auto classes)
from viscpm.conversion.common import ConversionError
from viscpm.conversion.convert_viscpm_chat import (
    CHAT_DROPPED_KEYS,
    convert_viscpm_chat_checkpoint,
    vision_config_from_original,
)

QUERY_NUM = CHAT_QUERY_NUM


def test_weights_converted_one_to_one(chat, chat_files):
    _, model, _, folder = chat
    original = torch.load(chat_files[2], weights_only=True)  # the original `VLU_CPMBee`'s state dict
    ours = model.state_dict()
    assert len(ours) == len(original) - len(CHAT_DROPPED_KEYS)
    assert torch.equal(ours["query"], original["query"])
    assert torch.equal(ours["mapping.2.weight"], original["mapping.2.weight"])
    assert torch.equal(ours["vision_model.layers.1.attention.o_proj.query.bias"],
                       original["vpm.beit3.encoder.layers.1.self_attn.out_proj.B.bias"])
    assert torch.equal(ours["vision_model.embeddings.position_embedding.image.weight"],
                       original["vpm.beit3.encoder.embed_positions.A.weight"])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "viscpm_chat" and config["query_num"] == QUERY_NUM
    assert config["vision_config"]["hidden_size"] == TINY_VISION_CONFIG["encoder_embed_dim"]
    assert (folder / "vocab.txt").is_file() and not list(folder.glob("*.bin"))


def test_vision_config_from_original():
    large = vision_config_from_original({"encoder_embed_dim": 1024, "img_size": 224, "vocab_size": 64010})
    sizes = (large.hidden_size, large.num_hidden_layers, large.intermediate_size, large.num_patches)
    assert sizes == (1024, 24, 4096, 196)
    with pytest.raises(ValueError, match="multiway"):
        vision_config_from_original({"multiway": False})
    with pytest.raises(ValueError, match="unknown keys"):
        vision_config_from_original({"encoder_embed_dimm": 8})


# -- converter errors ------------------------------------------------------------------------------------------------


def _convert(checkpoint, output, root, **kwargs):
    return convert_viscpm_chat_checkpoint(
        checkpoint, output, llm_config=root / "llm.json", vision_config=root / "vision.json", progress=False, **kwargs
    )


def test_paint_and_cpmbee_checkpoints_are_refused(chat_files, vocab_file, tmp_path, capsys):
    _, root, checkpoint = chat_files
    state = torch.load(checkpoint, weights_only=True)
    paint = {k: v for k, v in state.items() if k.startswith("llm.")}
    paint["trans_block.0.weight"] = torch.zeros(4, 32)
    paint["unet.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    torch.save(paint, tmp_path / "paint.pt")
    with pytest.raises(ConversionError, match="VisCPM-Paint checkpoint"):
        _convert(tmp_path / "paint.pt", tmp_path / "out", root)
    argv = ["--checkpoint", str(tmp_path / "paint.pt"), "--output-dir", str(tmp_path / "out"), "--vocab-file", vocab_file]
    status = load_script("convert_viscpm_chat").main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "VisCPM-Paint" in err[0]
    llm_only = {k: v for k, v in state.items() if k.startswith("llm.")}
    torch.save(llm_only, tmp_path / "bee.pt")
    with pytest.raises(ConversionError, match="convert_cpmbee.py"):
        _convert(tmp_path / "bee.pt", tmp_path / "out", root)
    assert not (tmp_path / "out").exists()


def test_mismatched_sizes_are_named(chat_files, tmp_path):
    _, root, checkpoint = chat_files
    with pytest.raises(ConversionError, match=r"query_num=64 not 8.*--query-num"):
        _convert(checkpoint, tmp_path / "out", root, query_num=8)
    with pytest.raises(ConversionError, match=r"vision hidden_size=24 not 1024"):
        convert_viscpm_chat_checkpoint(checkpoint, tmp_path / "out", llm_config=root / "llm.json", progress=False)
    state = torch.load(checkpoint, weights_only=True)
    del state["vpm.beit3.encoder.layers.1.ffn.B.fc2.bias"]
    state["mapping.4.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ConversionError) as error:
        _convert(tmp_path / "broken.pt", tmp_path / "out", root)
    message = str(error.value)
    assert "missing (vpm.beit3.encoder.layers.1.ffn.B.fc2.bias)" in message and "mapping.4.weight" in message
    assert not (tmp_path / "out").exists()


def test_dropped_keys_are_logged_and_dtype_option(chat_files, tmp_path, caplog):
    _, root, checkpoint = chat_files
    with caplog.at_level(logging.INFO, logger="viscpm.conversion.convert_viscpm_chat"):
        _convert(checkpoint, tmp_path / "out", root, dtype="bfloat16")
    logged = caplog.text
    assert all(key in logged for key in CHAT_DROPPED_KEYS)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
