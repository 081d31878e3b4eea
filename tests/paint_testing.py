"""The tiny VisCPM-Paint shared by the Paint tests of every layer (tests/modeling, tests/conversion, tests/user_api).

A tiny random original Paint (CPM-Bee, bridge, UNet) is saved in the original checkpoint format (by the original
when it is installed, else as a stand-in of the same format: tests/originals.py), converted with our converter (VAE,
scheduler and UNet config from a tiny local "SD base" folder) and loaded as a `VisCPMPaintPipeline`; the oracle tests
compare it in fp32 with the original's text states and images for the same generator. The fixtures are registered
in conftest.py.
"""

import contextlib
import json

import originals
import pytest
import torch

from conftest import PAINT_SIZE as SIZE
from conftest import load_script, tiny_unet, tiny_vae, write_sd_base

STEPS = 6
ATOL = 2e-4
ZH, EN = "一只可爱的橘猫坐在窗台上，阳光明媚", "a red bicycle leaning on a brick wall"
NEGATIVE = "模糊, low quality, blurry, distorted, ugly, watermark"
TEXT_KEYS = ("input_ids", "attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids",
             "ext_table_sub")


def convert_main(argv):
    return load_script("convert_viscpm_paint").main(argv)


def _bert_vocab(folder):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", *ZH, *"模糊猫狗", "red",
             "bicycle", "cat", "the", "a", ","]
    path = folder / "bert_vocab.txt"
    path.write_text("\n".join(dict.fromkeys(words)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def paint(tmp_path_factory, vocab_file):
    """The original Paint (`originals.Missing` without the original), our converted folder and the pipeline loaded
    from it (no optional parts)."""
    from diffusers import DDPMScheduler

    from viscpm import VisCPMPaintPipeline

    root = tmp_path_factory.mktemp("paint")
    unet, vae = tiny_unet(), tiny_vae()
    sd_base = write_sd_base(root / "sd-base", unet, vae)
    scheduler = DDPMScheduler.from_pretrained(sd_base, subfolder="scheduler")  # as the original loads it
    original, state = originals.paint_checkpoint(unet, vae, scheduler, seed=0)
    checkpoint = root / "viscpm_paint_checkpoint.pt"
    torch.save(state, checkpoint)
    (root / "llm.json").write_text(json.dumps(originals.TINY_ORIGINAL_CONFIG))

    argv = ["--checkpoint", str(checkpoint), "--output-dir", str(root / "hf"), "--llm-config", str(root / "llm.json"),
            "--sd-base", str(sd_base), "--vocab-file", vocab_file, "--no-progress"]
    assert convert_main(argv) == 0
    pipe = VisCPMPaintPipeline.from_pretrained(root / "hf")
    pipe.set_progress_bar_config(disable=True)
    return {"root": root, "original": original, "pipe": pipe, "checkpoint": checkpoint, "sd_base": sd_base}


@pytest.fixture(scope="session")
def paint_extras(tmp_path_factory):
    """Tiny optional parts: image safety checker, prompt checker (BERT classifier) and ranker (Chinese-CLIP)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizer,
        ChineseCLIPConfig,
        ChineseCLIPImageProcessor,
        ChineseCLIPModel,
        ChineseCLIPProcessor,
        CLIPConfig,
        CLIPImageProcessor,
    )

    root = tmp_path_factory.mktemp("extras")
    vocab = _bert_vocab(root)
    torch.manual_seed(2)
    tokenizer = BertTokenizer(vocab)
    bert = dict(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=64)
    # A large init spread, so that the tiny random classifier scores different prompts differently.
    checker = BertForSequenceClassification(BertConfig(**bert, num_labels=2, initializer_range=1.0)).eval()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE,
                  patch_size=8)
    ranker = ChineseCLIPModel(ChineseCLIPConfig(text_config=bert, vision_config=vision, projection_dim=16)).eval()
    ranker_processor = ChineseCLIPProcessor(
        image_processor=ChineseCLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
        tokenizer=tokenizer,
    )
    safety = StableDiffusionSafetyChecker(CLIPConfig(text_config=dict(bert, vocab_size=99), vision_config=vision,
                                                     projection_dim=16)).eval()
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return dict(prompt_checker=checker, prompt_checker_tokenizer=tokenizer, ranker=ranker,
                ranker_processor=ranker_processor, safety_checker=safety, feature_extractor=feature_extractor)


def gen(seed=3):
    return torch.Generator().manual_seed(seed)


def ours(pipe, prompt, **kwargs):
    """``pipe`` (a pipeline or a `VisCPMPaint`) with the tests' defaults: STEPS steps, SIZE pixels, numpy output."""
    kwargs = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "output_type": "np", **kwargs}
    kwargs.setdefault("generator", gen())
    return pipe(prompt, **kwargs)


def theirs(original, prompt, negative_prompt=None, **kwargs):
    from oracle import original_paint_images

    kwargs = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "output_type": "np", **kwargs}
    kwargs.setdefault("generator", gen())
    return original_paint_images(original, prompt, negative_prompt, **kwargs).images


def with_parts(pipe, **parts):
    """A new pipeline with ``pipe``'s components, some replaced."""
    from viscpm import VisCPMPaintPipeline

    clone = VisCPMPaintPipeline(**{**pipe.components, **parts})
    clone.set_progress_bar_config(disable=True)
    return clone


@contextlib.contextmanager
def batches(module, name=None):
    """The batch size of each forward call of ``module`` in the block (of its ``name`` argument, else the first)."""
    sizes = []

    def record(_, args, kwargs):
        sizes.append((kwargs[name] if name else args[0]).shape[0])

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()
