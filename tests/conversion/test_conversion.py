"""The checkpoint converter: original CPM-Bee state dict -> Hugging Face folder.

A tiny original model with random weights is saved in the original format (``torch.save`` of its
state dict; a stand-in of the same format without the original, tests/originals.py), converted with the library and with the script, reloaded with ``from_pretrained`` and
compared weight by weight. Then every kind of bad input must give one clear line, and a crash while
writing must leave nothing that looks like a model folder. Logit parity lives in test_modeling.py.
"""

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import originals
import torch
from originals import TINY_ORIGINAL_CONFIG
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import viscpm
import viscpm.conversion.common as common
import viscpm.conversion.convert_cpmbee as convert
from viscpm import CpmBeeForCausalLM, CpmBeeTokenizer
from viscpm.conversion.common import ConversionError
from viscpm.conversion.convert_cpmbee import convert_cpmbee_checkpoint, map_cpmbee_key

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "conversion" / "convert_cpmbee.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_cpmbee_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


@pytest.fixture(scope="module")
def original():
    """The original state dict (fp32, random weights)."""
    return originals.cpmbee_checkpoint(seed=1)[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, original):
    """An original checkpoint and its original config JSON on disk."""
    root = tmp_path_factory.mktemp("original")
    checkpoint = root / "cpm-bee.pt"
    torch.save(original, checkpoint)
    config = root / "cpm-bee.json"
    config.write_text(json.dumps(TINY_ORIGINAL_CONFIG))
    return checkpoint, config


def _assert_same_weights(folder, original, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, CpmBeeForCausalLM)
    ours = model.state_dict()
    mapped = {map_cpmbee_key(key): tensor for key, tensor in original.items()}
    assert None not in mapped
    assert set(mapped) == {name for name, _ in model.named_parameters()}
    for key, tensor in mapped.items():
        assert ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key].to(dtype), tensor.to(dtype)), key


def _stored_dtypes(folder):
    dtypes = set()
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            dtypes |= {handle.get_slice(name).get_dtype() for name in handle.keys()}
    return dtypes


def _assert_folder(folder, sharded=False):
    names = sorted(os.listdir(folder))
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth"))], names
    assert any(name.endswith(".safetensors") for name in names), names
    assert ("model.safetensors.index.json" in names) == sharded, names
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["model_type"] == "cpmbee"
    assert config["architectures"] == ["CpmBeeForCausalLM"]
    assert config["hidden_size"] == TINY_ORIGINAL_CONFIG["dim_model"]
    assert config["rotary_dtype"] == "float32"  # the original config says half=False
    assert "generation_config.json" in names
    assert "tokenizer_config.json" in names and "vocab.txt" in names, names
    assert not [name for name in os.listdir(Path(folder).parent) if ".partial-" in name or ".old-" in name]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, CpmBeeTokenizer)
    assert tokenizer.vocab_size == TINY_ORIGINAL_CONFIG["vocab_size"]


# ------------------------------------------------------------------------------------------ (a) round trip


def test_key_map_both_ways():
    assert map_cpmbee_key("encoder.layers.11.ffn.ffn.w_in.w_1.weight") == "model.layers.11.mlp.up_proj.weight"
    assert map_cpmbee_key("llm.input_embedding.weight", prefix="llm.") == "model.embed_tokens.weight"
    assert map_cpmbee_key("input_embedding.weight", hf_prefix="") == "embed_tokens.weight"
    assert map_cpmbee_key("vpm.beit3.text_embed.weight", prefix="llm.") is None
    assert map_cpmbee_key("encoder.layers.1.self_att.self_attention.project_z.weight") is None
    assert convert.CPMBEE_KEYS.to_original("layers.3.self_attn.o_proj.weight") == (
        "encoder.layers.3.self_att.self_attention.attention_out.weight"
    )
    assert convert.detect_prefix(["llm.input_embedding.weight", "vpm.query"]) == "llm."


def test_library_conversion_is_exact(tmp_path, files, original, vocab_file):
    checkpoint, config = files
    out = convert_cpmbee_checkpoint(checkpoint, tmp_path / "hf", config=config, vocab_file=vocab_file, progress=False)
    assert out == tmp_path / "hf"
    _assert_folder(out)
    assert _stored_dtypes(out) == {"F32"}
    _assert_same_weights(out, original)


def test_llm_prefixed_sharded_bfloat16(tmp_path, original, vocab_file):
    """A VisCPM-style checkpoint (keys under `llm.`, wrapped in {"state_dict": ...}), cast and sharded."""
    checkpoint = tmp_path / "chat-llm.pt"
    torch.save({"state_dict": {"llm." + key: tensor for key, tensor in original.items()}, "step": 7}, checkpoint)
    out = convert_cpmbee_checkpoint(
        checkpoint,
        tmp_path / "hf",
        config=dict(TINY_ORIGINAL_CONFIG),
        vocab_file=vocab_file,
        dtype="bfloat16",
        max_shard_size="4MB",
        progress=False,
    )
    _assert_folder(out, sharded=True)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert _stored_dtypes(out) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_same_weights(out, original, dtype=torch.bfloat16)


@pytest.mark.oracle
def test_script_with_default_vocabulary(tmp_path, files, original):
    """The script in a subprocess, taking the vocabulary from the installed original package."""
    checkpoint, config = files
    out = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), "--output-dir", str(out),
         "--config", str(config), "--dtype", "float16", "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert str(out) in result.stdout
    _assert_folder(out)
    assert _stored_dtypes(out) == {"F16"}
    _assert_same_weights(out, original, dtype=torch.float16)


def test_overwrite_replaces_only_when_asked(tmp_path, files, vocab_file):
    checkpoint, config = files
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_cpmbee_checkpoint(checkpoint, out, config=config, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert_cpmbee_checkpoint(checkpoint, out, config=config, vocab_file=vocab_file, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists()
    _assert_folder(out)


def test_unwraps_nested_state_dict(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {"state_dict": {"a": torch.ones(2)}}, "epoch": 3}, path)
    assert list(common.load_original_checkpoint(path)) == ["a"]


# ------------------------------------------------------------------------------------------ (b) errors


def _variant(original, drop=(), add=None, replace=None):
    state = {key: tensor for key, tensor in original.items() if key not in drop}
    state.update(add or {})
    state.update(replace or {})
    return state


def _make_bad_input(kind, tmp_path, files, original):
    """Write a bad input; return (checkpoint, extra script args, words the error must contain)."""
    checkpoint, config = files
    path = tmp_path / "bad.pt"
    if kind == "missing-path":
        return tmp_path / "nope.pt", ["--config", str(config)], ["not found", "nope.pt"]
    if kind == "directory":
        return tmp_path, ["--config", str(config)], ["is a directory"]
    if kind == "truncated":
        data = checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, ["--config", str(config)], ["truncated or corrupt", "bad.pt"]
    if kind == "random-bytes":
        path.write_bytes(b"\x00\x13" + random.Random(0).randbytes(4096))
        return path, ["--config", str(config)], ["not a PyTorch checkpoint", "bad.pt"]
    if kind == "pickle-like-garbage":
        path.write_bytes(b"\x80\x02" + random.Random(1).randbytes(4096))
        return path, ["--config", str(config)], ["corrupt", "bad.pt"]
    if kind == "empty":
        path.write_bytes(b"")
        return path, ["--config", str(config)], ["empty"]
    if kind == "json":
        path.write_text(json.dumps(TINY_ORIGINAL_CONFIG))
        return path, ["--config", str(config)], ["JSON", "--config"]
    if kind == "pickled-object":
        torch.save({"input_embedding.weight": torch.zeros(2), "args": argparse.Namespace(lr=1)}, path)
        return path, ["--config", str(config)], ["argparse.Namespace", "weights_only"]
    if kind == "non-tensor-entry":
        torch.save({**original, "step": 3}, path)
        return path, ["--config", str(config)], ["not tensors", "'step'"]
    if kind == "missing-key":
        torch.save(_variant(original, drop=["encoder.layers.1.ffn.ffn.w_out.weight"]), path)
        return path, ["--config", str(config)], ["1 missing", "encoder.layers.1.ffn.ffn.w_out.weight"]
    if kind == "extra-key":
        torch.save(_variant(original, add={"encoder.layers.0.self_att.gate.weight": torch.zeros(3)}), path)
        return path, ["--config", str(config)], ["1 unexpected", "encoder.layers.0.self_att.gate.weight"]
    if kind == "extra-layer":
        layer = {k.replace("layers.1.", "layers.2."): v for k, v in original.items() if "layers.1." in k}
        torch.save(_variant(original, add=layer), path)
        return path, ["--config", str(config)], ["9 unexpected", "num_hidden_layers=3 not 2"]
    if kind == "vision-keys-too":
        state = {"llm." + key: tensor for key, tensor in original.items()}
        torch.save({**state, "vpm.query": torch.zeros(64, 8)}, path)
        return path, ["--config", str(config)], ["1 unexpected (vpm.query)"]
    if kind == "mis-shaped-key":
        bias = "position_bias.relative_attention_bias"
        torch.save(_variant(original, replace={bias: torch.zeros(64, 5)}), path)
        return path, ["--config", str(config)], ["1 with other shapes", bias, "[64, 5]", "[64, 4]"]
    if kind == "wrong-config":
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps({**TINY_ORIGINAL_CONFIG, "dim_model": 64}))
        return checkpoint, ["--config", str(wrong)], [
            "does not match the model config", "input_embedding.weight is [86583, 32], config needs [86583, 64]",
            "the checkpoint has hidden_size=32 not 64",
        ]
    if kind == "default-10b-config":
        return checkpoint, [], ["does not match", "missing", "--config"]
    if kind == "unknown-config-key":
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps({**TINY_ORIGINAL_CONFIG, "dim_modle": 64}))
        return checkpoint, ["--config", str(wrong)], ["wrong.json", "dim_modle"]
    if kind == "invalid-config-json":
        wrong = tmp_path / "wrong.json"
        wrong.write_text("{dim_model: 32")
        return checkpoint, ["--config", str(wrong)], ["wrong.json", "not valid JSON"]
    if kind == "missing-vocab":
        vocab = ["--vocab-file", str(tmp_path / "bee.txt")]
        return checkpoint, ["--config", str(config), *vocab], ["bee.txt", "not found"]
    raise AssertionError(kind)


BAD_INPUTS = [
    "missing-path", "directory", "truncated", "random-bytes", "pickle-like-garbage", "empty", "json",
    "pickled-object", "non-tensor-entry", "missing-key", "extra-key", "extra-layer", "vision-keys-too",
    "mis-shaped-key",
    "wrong-config", "default-10b-config", "unknown-config-key", "invalid-config-json", "missing-vocab",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_clear_line(kind, tmp_path, files, original, vocab_file, capsys):
    checkpoint, extra, words = _make_bad_input(kind, tmp_path, files, original)
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--output-dir", str(out), "--no-progress"]
    if "--vocab-file" not in extra:
        args += ["--vocab-file", vocab_file]
    assert script.main(args + extra) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and "Traceback" not in captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()
    assert not [name for name in os.listdir(tmp_path) if ".partial-" in name]


def test_script_error_in_subprocess(tmp_path, files, original, vocab_file):
    """A real process: exit status 1, one line on stderr, no traceback."""
    checkpoint, extra, words = _make_bad_input("truncated", tmp_path, files, original)
    assert "--vocab-file" not in extra
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out"), *extra,
         "--vocab-file", vocab_file],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: ") and "truncated or corrupt" in result.stderr


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--output-dir", "x"])
    assert exit_info.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ (c) atomicity


def _boom(*args, **kwargs):
    raise RuntimeError("simulated crash while writing")


def _write_then_crash(state_dict, folder, **kwargs):
    (Path(folder) / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    raise KeyboardInterrupt


@pytest.mark.parametrize("crash", ["weights", "weights-interrupt", "config"])
@pytest.mark.parametrize("existing", [False, True])
def test_crash_leaves_nothing_behind(crash, existing, tmp_path, files, vocab_file, monkeypatch):
    checkpoint, config = files
    out = tmp_path / "hf"
    if existing:
        out.mkdir()
        (out / "config.json").write_text('{"model_type": "mine"}')
    if crash == "weights":
        monkeypatch.setattr(common, "write_safetensors", _boom)
    elif crash == "weights-interrupt":
        monkeypatch.setattr(common, "write_safetensors", _write_then_crash)
    else:  # everything but config.json written, then the crash
        monkeypatch.setattr(viscpm.CpmBeeConfig, "save_pretrained", _boom)
    error = KeyboardInterrupt if crash == "weights-interrupt" else RuntimeError
    with pytest.raises(error):
        convert_cpmbee_checkpoint(
            checkpoint, out, config=config, vocab_file=vocab_file, overwrite=existing, progress=False
        )
    if existing:
        assert os.listdir(out) == ["config.json"]
        assert (out / "config.json").read_text() == '{"model_type": "mine"}'
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == (["hf"] if existing else [])
