"""The VisCPM-Paint converter: the folder it writes, its refusals and errors, its dtype option (the tiny Paint of
tests/paint_testing.py)."""

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from originals import vocab_file as _vocab_file
from paint_testing import convert_main

from conftest import tiny_unet, tiny_vae, write_sd_base

from viscpm import VisCPMPaintPipeline
from viscpm.conversion.common import ConversionError
from viscpm.conversion.convert_viscpm_paint import convert_viscpm_paint_checkpoint


def test_converted_folder(paint):
    folder = paint["root"] / "hf"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "VisCPMPaintPipeline"
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    pipe = paint["pipe"]
    assert isinstance(pipe.scheduler, DDPMScheduler)  # the original's sampler, from SD's PNDM config
    checkpoint = torch.load(paint["checkpoint"], weights_only=True)  # the original Paint's UNet under "unet."
    unet = {name[len("unet."):]: tensor for name, tensor in checkpoint.items() if name.startswith("unet.")}
    assert set(unet) == set(pipe.unet.state_dict())
    for name, tensor in unet.items():
        assert torch.equal(pipe.unet.state_dict()[name], tensor), name


def _convert_main(paint, tmp_path, checkpoint=None, **options):
    options.setdefault("vocab_file", _vocab_file())
    argv = ["--checkpoint", str(checkpoint or paint["checkpoint"]), "--output-dir", str(tmp_path / "out"),
            "--llm-config", str(paint["root"] / "llm.json"), "--sd-base", str(paint["sd_base"]), "--no-progress"]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return convert_main(argv)


def test_chat_checkpoint_is_refused(paint, tmp_path, capsys):
    state = torch.load(paint["checkpoint"], weights_only=True)
    state = {k: v for k, v in state.items() if k.startswith("llm.")}
    state.update({"vpm.beit3.text_embed.weight": torch.zeros(2, 2), "query": torch.zeros(64, 4),
                  "mapping.0.weight": torch.zeros(4, 4)})
    torch.save(state, tmp_path / "viscpm_chat_balance_checkpoint.pt")
    assert _convert_main(paint, tmp_path, checkpoint=tmp_path / "viscpm_chat_balance_checkpoint.pt") == 1
    err = capsys.readouterr().err
    assert "is a VisCPM-Chat checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_converter_errors(paint, vocab_file, tmp_path, capsys):
    # Without --llm-config the 10B config is assumed: the shapes say which sizes differ.
    argv = ["--checkpoint", str(paint["checkpoint"]), "--output-dir", str(tmp_path / "out"), "--sd-base",
            str(paint["sd_base"]), "--vocab-file", vocab_file, "--no-progress"]
    assert convert_main(argv) == 1
    assert "--llm-config" in capsys.readouterr().err
    # An SD base whose UNet config does not fit the checkpoint's UNet.
    other = tiny_unet()
    bigger = UNet2DConditionModel.from_config({**other.config, "block_out_channels": (8, 24)})
    write_sd_base(tmp_path / "other-base", bigger, tiny_vae())
    assert _convert_main(paint, tmp_path, sd_base=tmp_path / "other-base") == 1
    err = capsys.readouterr().err
    assert "unet." in err and "--sd-base" in err
    # An SD base folder without its VAE.
    (tmp_path / "no-vae" / "unet").mkdir(parents=True)
    assert _convert_main(paint, tmp_path, sd_base=tmp_path / "no-vae") == 1
    assert "has no vae/config.json" in capsys.readouterr().err
    # Not a Paint checkpoint at all.
    torch.save({"unrelated.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="not a VisCPM-Paint checkpoint"):
        convert_viscpm_paint_checkpoint(tmp_path / "other.pt", tmp_path / "o", llm_config=paint["root"] / "llm.json",
                                        sd_base=paint["sd_base"], vocab_file=vocab_file, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_converter_dtype(paint, tmp_path):
    assert _convert_main(paint, tmp_path, dtype="float16") == 0
    from safetensors import safe_open

    for part in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        with safe_open(tmp_path / "out" / part, "pt") as handle:
            assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"F16"}, part
    pipe = VisCPMPaintPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float16


