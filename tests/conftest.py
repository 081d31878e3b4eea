"""Fixtures and hooks shared by every test layer.

Oracle tests. The original VisCPM (tests/oracle.py, over the installed VisCPM, torchscale and fairscale packages) is
the parity oracle; ``pytest -m "not oracle"`` runs everything else, and runs where the original is not installed.
The rule:

* A test that uses the original is an oracle test: it asks for the `oracle` fixture (the module tests/oracle.py),
  directly or through a fixture that does, and is then marked here; or it carries ``pytest.mark.oracle`` (itself, its
  class, or its module's ``pytestmark``) and imports what it needs from ``oracle`` inside its body. Test modules
  never import ``oracle`` at module level unless all their tests are oracle tests.
* Tests that hard-code ids or pieces of the real vocabulary are oracle tests as well.
* The shared fixtures (`vocab_file`, `chat_files`, `chat`, `paint`, ...) take the original's files and models when
  it is installed and stand-ins of the same format when it is not (tests/originals.py); the original model in them
  is then an `originals.Missing`, which fails when used. Only oracle tests use the original model.
* While a test that is not marked runs, the original and tests/oracle.py cannot be imported and the fixtures'
  original models refuse to be used (tests/without_original.py), so a forgotten mark fails here as it would where
  the original is missing. tests/test_oracle_split.py collects the
  suite with the original blocked: every module must import, and the non-oracle tests must be most of the suite.
"""

from pathlib import Path

import pytest
import torch

import originals
import without_original


@pytest.fixture(scope="session")
def oracle():
    """The original VisCPM (tests/oracle.py): a test that asks for it, directly or through its fixtures, is an oracle
    test."""
    import oracle as module

    return module


@pytest.fixture(scope="session")
def vocab_file():
    """The CPM-Bee vocabulary: the installed original package's bee.txt, or a stand-in of the same format (never
    stored in this repo)."""
    return originals.vocab_file()


def load_script(name):
    """A script under conversion/ (``viscpm.conversion.<name>``): its `main(argv)` is what the command line runs."""
    import importlib

    return importlib.import_module(f"viscpm.conversion.{name}")


CHAT_QUERY_NUM = 64


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory):
    """A tiny VisCPM-Chat checkpoint in the original format: (original `VLU_CPMBee` in fp32 with random weights, or an
    `originals.Missing` without the original; folder; checkpoint)."""
    import json

    root = tmp_path_factory.mktemp("chat")
    vlu, state = originals.chat_checkpoint(seed=0, query_num=CHAT_QUERY_NUM)
    checkpoint = root / "viscpm_chat.pt"
    torch.save(state, checkpoint)
    (root / "llm.json").write_text(json.dumps(originals.TINY_ORIGINAL_CONFIG))
    (root / "vision.json").write_text(json.dumps(originals.TINY_VISION_CONFIG))
    return vlu, root, checkpoint


@pytest.fixture(scope="session")
def chat(chat_files, vocab_file):
    """(original VLU_CPMBee or `originals.Missing`, our model, our tokenizer, folder): converted by the script,
    loaded by Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from viscpm import VisCPMChatForConditionalGeneration

    vlu, root, checkpoint = chat_files
    status = load_script("convert_viscpm_chat").main([
        "--checkpoint", str(checkpoint), "--output-dir", str(root / "hf"), "--llm-config", str(root / "llm.json"),
        "--vision-config", str(root / "vision.json"), "--query-num", str(CHAT_QUERY_NUM), "--vocab-file", vocab_file,
        "--no-progress",
    ])
    assert status == 0
    model = AutoModelForImageTextToText.from_pretrained(root / "hf", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    assert isinstance(model, VisCPMChatForConditionalGeneration)
    return vlu, model, tokenizer, root / "hf"


PAINT_SIZE = 16  # image side in the Paint tests; the tiny VAE has a scale factor of 2, so latents are 8x8
SCHEDULER_CONFIG = dict(  # stabilityai/stable-diffusion-2-1-base's scheduler (a PNDM config there)
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True, clip_sample=False,
)


def tiny_unet():
    """A tiny random SD UNet (cross-attention width 16) for PAINT_SIZE-pixel images."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=PAINT_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def tiny_vae():
    """A tiny random VAE with a scale factor of 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        sample_size=PAINT_SIZE,
    ).eval()


def write_sd_base(folder, unet, vae):
    """A local stand-in for the SD-2.1-base repo the Paint converter reads: vae/, scheduler/, unet/config.json."""
    from diffusers import PNDMScheduler

    vae.save_pretrained(folder / "vae")
    PNDMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    unet.save_config(folder / "unet")
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, vocab_file):
    """(chat folder, paint folder): tiny converted VisCPM-Chat and VisCPM-Paint (`viscpm demo`'s, seed 2), built
    once for the apps' tests that need some models, not particular ones."""
    from viscpm.apps.demo import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"), vocab_file, seed=2)


@pytest.fixture
def cli_main(capsys, monkeypatch):
    """``cli_main(cwd, *argv, stdin=None)``: `viscpm.apps.cli.main` run in-process in the folder ``cwd`` (stdin a
    text when given), as a `subprocess.CompletedProcess` (returncode, stdout, stderr)."""
    import io
    import subprocess
    import sys

    from viscpm.apps.cli import main

    def run(cwd, *argv, stdin=None):
        monkeypatch.chdir(cwd)
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        argv = [str(arg) for arg in argv]
        status = main(argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, status, out, err)

    return run


from paint_testing import paint, paint_extras  # noqa: E402,F401  (the tiny Paint shared by three test layers)


# -- transformers' common test mixins (tests/conformance) ------------------------------------------------------------

UPSTREAM_MARKERS = (
    "generate", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test",
    "torch_export_test", "onnx_export_test", "executorch_export_test", "timeout(seconds)", "slow",
    "is_training_test", "is_pipeline_test", "is_tensor_parallel_test",
)


CONFORMANCE = Path(__file__).resolve().parent / "conformance"


def pytest_ignore_collect(collection_path, config):
    """With other transformers/diffusers releases than the upstream copies' (conformance/releases.py), tests/conformance
    collects only test_upstream_releases.py, which fails with one line naming both versions and the fix: upstream's
    files would otherwise stop the run with an ImportError deep in their own code, or test the wrong library."""
    if (collection_path.parent == CONFORMANCE and collection_path.name.startswith("test_")
            and collection_path.name != "test_upstream_releases.py"):
        from conformance.releases import mismatch_message

        return True if mismatch_message() else None
    return None


def pytest_configure(config):
    """Register the markers of the upstream test files that tests/conformance runs."""
    for marker in UPSTREAM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: used by the upstream test mixins")


def pytest_collection_modifyitems(config, items):
    """Mark the tests that ask for the `oracle` fixture. Conformance tests see FutureWarning and DeprecationWarning
    (pytest.ini ignores them elsewhere): the upstream tests check for some, e.g. the deprecation of
    ``past_key_values``."""
    from pathlib import Path

    conformance = Path(__file__).resolve().parent / "conformance"
    for item in items:
        if "oracle" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.oracle)
        if conformance in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.filterwarnings("default::FutureWarning"))
            item.add_marker(pytest.mark.filterwarnings("default::DeprecationWarning"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A test not marked `oracle` runs with the original out of reach."""
    if item.get_closest_marker("oracle") is not None:
        yield
        return
    with without_original.hidden():
        yield
