"""Image processor of VisCPM-Chat: the original's evaluation transform, with robust input handling.

The original preprocesses with torchvision: `Resize((224, 224), BICUBIC)` on a PIL image, `ToTensor`,
`Normalize(mean=0.5, std=0.5)`. This class does the same operations in the same order (PIL bicubic resize of an
8-bit RGB image, `/ 255` in float32, then `(x - mean) / std`), so an RGB PIL image gives bit-identical pixels.

Beyond the original (which expects an RGB PIL image and fails on anything else), it accepts PIL images, numpy
arrays, torch tensors, file paths and URLs, one or a list, and converts them to 8-bit RGB first:

- EXIF orientation is applied (`ImageOps.exif_transpose`), so a phone photo is seen upright.
- Transparency (RGBA, LA, PA, palette or grey with a transparent colour) is composited on white, as transformers'
  `convert_to_rgb` does; fully opaque images come out exactly as `.convert("RGB")`.
- 16-bit images (`I;16*`, `I` above 255, uint16 arrays) are scaled to 8 bits (`round(v / 257)`), not clipped;
  float images (`F`, float arrays and tensors) are read as [0, 1] (or as [0, 255] when a value exceeds 1).
- Files are checked: a missing path, a file PIL cannot read, a truncated file, a zero-size image and an image above
  PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`; raise or disable it there for trusted huge files)
  each raise a `ValueError`/`FileNotFoundError` that names the file.

Only torch, transformers, PIL, numpy and the standard library are imported: the file also ships as remote code.
"""

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import PILImageResampling


INCEPTION_MEAN = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_MEAN / _STD, as the original uses
INCEPTION_STD = (0.5, 0.5, 0.5)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _describe(source: Any) -> str:
    return f"image file {str(source)!r}" if isinstance(source, (str, os.PathLike)) else "image"


def _quantize(array: np.ndarray, what: str) -> np.ndarray:
    """Any numeric array to uint8: uint8 as is, 16-bit ranges scaled by 1/257, floats read as [0, 1] or [0, 255]."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        scale = 255.0 if array.size == 0 or array.max() <= 1.0 else 1.0
        return np.clip(np.round(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            if array.min() < 0 or array.max() > 65535:
                raise ValueError(f"{what} has integer values outside [0, 65535]; give 8-bit or 16-bit data")
            return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
        return array.astype(np.uint8)
    raise ValueError(f"{what} has unsupported dtype {array.dtype}")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of a PIL image (see the module docstring for how each mode is converted)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = _quantize(np.asarray(image), f"{mode} image")
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray, channels_first: bool | None, what: str) -> Image.Image:
    """A 2-D (H, W) or 3-D (H, W, C) / (C, H, W) array with C in {1, 2, 3, 4} to a PIL image."""
    if array.ndim == 3:
        if channels_first is None:
            # numpy images are channels-last by convention; fall back to channels-first when only that fits.
            channels_first = array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 2, 3, 4)
        if channels_first:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(f"{what} of shape {tuple(array.shape)}: expected 1, 2, 3 or 4 channels")
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"{what} has {array.ndim} dimensions: expected (H, W), (H, W, C) or (C, H, W)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(array.shape)})")
    array = np.ascontiguousarray(_quantize(array, what))
    mode = "L" if array.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return Image.fromarray(array, mode=mode)


def load_image_file(source: str | os.PathLike | bytes) -> Image.Image:
    """Open and fully decode an image file (path or bytes) with clear errors; PIL's bomb limit applies."""
    what = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what} not found")
        if path.is_dir():
            raise ValueError(f"{what} is a directory, not an image file")
        handle = open(path, "rb")
    else:
        handle = io.BytesIO(source)
    with handle:
        try:
            with warnings.catch_warnings():
                # PIL only warns between 1x and 2x its limit; treat the whole range as an error below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(handle)
        except Image.DecompressionBombError as error:
            raise ValueError(f"{what} is too large to decode safely ({error}). If you trust it, raise or disable "
                             "PIL.Image.MAX_IMAGE_PIXELS.") from None
        except UnidentifiedImageError:
            raise ValueError(f"{what} is not an image file PIL can read") from None
        limit = Image.MAX_IMAGE_PIXELS
        width, height = image.size
        if limit is not None and width * height > limit:
            raise ValueError(f"{what} is {width}x{height} = {width * height} pixels, above PIL's decompression-bomb "
                             f"limit of {limit}. If you trust it, raise or disable PIL.Image.MAX_IMAGE_PIXELS.")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            hint = ("" if ImageFile.LOAD_TRUNCATED_IMAGES
                    else " (set PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True to read what is there)")
            raise ValueError(f"{what} is truncated or corrupt: {error}{hint}") from None
    return image


class VisCPMImageProcessor(BaseImageProcessor):
    r"""
    VisCPM-Chat image processor: any image to a `[3, 224, 224]` float32 tensor, bit-identical to the original's
    `build_transform(is_train=False)` on RGB PIL images (see the module docstring for input handling).

    Args:
        size (`dict[str, int]`, defaults to `{"height": 224, "width": 224}`): output size (BEiT-3's input size).
        resample (`PILImageResampling`, defaults to `BICUBIC`): PIL resampling filter of the resize.
        do_normalize (`bool`, defaults to `True`): apply `(x - image_mean) / image_std` after scaling to [0, 1].
        image_mean, image_std (`tuple[float]`, default to 0.5 each): normalisation constants.
        apply_exif_orientation (`bool`, defaults to `True`): rotate/flip images as their EXIF orientation says.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        resample: int = PILImageResampling.BICUBIC,
        do_normalize: bool = True,
        image_mean: tuple[float, ...] | list[float] | None = None,
        image_std: tuple[float, ...] | list[float] | None = None,
        apply_exif_orientation: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = self._check_size(size if size is not None else {"height": 224, "width": 224})
        self.resample = int(resample)
        self.do_normalize = bool(do_normalize)
        self.image_mean = list(image_mean if image_mean is not None else INCEPTION_MEAN)
        self.image_std = list(image_std if image_std is not None else INCEPTION_STD)
        self.apply_exif_orientation = bool(apply_exif_orientation)

    @staticmethod
    def _check_size(size) -> dict[str, int]:
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if not isinstance(size, dict) or set(size) != {"height", "width"}:
            raise ValueError(f"size must be an int or {{'height': H, 'width': W}}, got {size!r}")
        size = {key: int(value) for key, value in size.items()}
        if min(size.values()) < 1:
            raise ValueError(f"size must be positive, got {size!r}")
        return size

    # ------------------------------------------------------------------ inputs -> RGB PIL

    @staticmethod
    def _is_single(image: Any) -> bool:
        if isinstance(image, (Image.Image, str, os.PathLike, bytes)):
            return True
        if isinstance(image, (np.ndarray, torch.Tensor)):
            return image.ndim <= 3
        return False

    def _flatten(self, images: Any) -> list:
        """One image, a list of images or a 4-D batch array/tensor to a flat list of single images."""
        if self._is_single(images):
            return [images]
        if isinstance(images, (np.ndarray, torch.Tensor)):
            if images.ndim != 4:
                raise ValueError(f"an image batch must have 4 dimensions, got shape {tuple(images.shape)}")
            return list(images)
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given (empty list)")
            flat = []
            for image in images:
                if self._is_single(image) or image is None:
                    flat.append(image)
                else:
                    raise ValueError(f"each image must be a PIL image, array, tensor, path or URL, got "
                                     f"{type(image).__name__} (nested lists are not supported)")
            return flat
        raise ValueError(f"unsupported image type {type(images).__name__}: give a PIL image, a numpy array, a torch "
                         "tensor, a file path or URL, or a list of them")

    def to_pil(self, image: Any, input_data_format: str | None = None) -> Image.Image:
        """One input (PIL, array, tensor, path, URL, bytes) to an upright 8-bit RGB PIL image."""
        if image is None:
            raise ValueError("image is None")
        channels_first = None if input_data_format is None else input_data_format in ("channels_first", "first")
        if isinstance(image, (str, os.PathLike)) and str(image).startswith(("http://", "https://")):
            from transformers.image_utils import load_image

            image = load_image(str(image))
            image.load()
        elif isinstance(image, (str, os.PathLike, bytes)):
            image = load_image_file(image)
        elif isinstance(image, torch.Tensor):
            # torch images are channels-first by convention (torchvision); float tensors are [0, 1].
            if image.is_meta:
                raise ValueError("the image is a meta tensor (a shape without values): pass the image's data")
            array = image.detach().cpu()
            if array.dtype in (torch.bfloat16, torch.float16):
                array = array.float()
            array = array.numpy()
            if channels_first is None and array.ndim == 3:
                channels_first = array.shape[0] in (1, 2, 3, 4) or array.shape[-1] not in (1, 2, 3, 4)
            image = _array_to_pil(array, channels_first, "image tensor")
        elif isinstance(image, np.ndarray):
            image = _array_to_pil(image, channels_first, "image array")
        elif not isinstance(image, Image.Image):
            raise ValueError(f"unsupported image type {type(image).__name__}")
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has zero size ({image.width}x{image.height})")
        if self.apply_exif_orientation:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)

    # ------------------------------------------------------------------ PIL -> pixel values

    def _pixels(self, image: Image.Image, size, resample, do_normalize, mean, std) -> torch.Tensor:
        """torchvision's `Resize` (PIL path), `ToTensor` and `Normalize`, as the same float32 operations."""
        image = image.resize((size["width"], size["height"]), resample)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        pixels = pixels.to(torch.float32).div(255)
        if do_normalize:
            mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
            pixels = pixels.sub(mean).div(std)
        return pixels

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        size: dict[str, int] | int | None = None,
        resample: int | None = None,
        do_normalize: bool | None = None,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
        input_data_format: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Preprocess one image or a list of images into `pixel_values` [B, 3, H, W] (float32).

        Args:
            images: PIL image, numpy array ((H, W), (H, W, C) or (C, H, W); uint8, uint16, bool or float), torch
                tensor ((C, H, W) or (H, W, C); float in [0, 1]), file path, URL or bytes; a list of them; or a
                4-D array/tensor batch.
            return_tensors (`"pt"`, `"np"` or `None`): `None` gives a list of float32 numpy arrays.
            input_data_format (`"channels_first"` / `"channels_last"`): layout of array inputs when ambiguous.
            size, resample, do_normalize, image_mean, image_std: override the processor's settings for this call.
        """
        for key in ("do_convert_rgb", "do_resize", "do_rescale", "data_format"):
            kwargs.pop(key, None)  # always on / fixed: accepted for API compatibility
        if kwargs:
            raise TypeError(f"VisCPMImageProcessor got unsupported arguments: {sorted(kwargs)}")
        size = self._check_size(size) if size is not None else self.size
        resample = self.resample if resample is None else int(resample)
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        mean = self.image_mean if image_mean is None else image_mean
        std = self.image_std if image_std is None else image_std

        pixels = []
        for index, image in enumerate(self._flatten(images)):
            try:
                rgb = self.to_pil(image, input_data_format)
            except (ValueError, FileNotFoundError) as error:
                if isinstance(images, (list, tuple)) and len(images) > 1:
                    raise type(error)(f"image {index}: {error}") from None
                raise
            pixels.append(self._pixels(rgb, size, resample, do_normalize, mean, std))

        if return_tensors == "pt":
            data = {"pixel_values": torch.stack(pixels)}
        elif return_tensors == "np":
            data = {"pixel_values": torch.stack(pixels).numpy()}
        elif return_tensors is None:
            data = {"pixel_values": [p.numpy() for p in pixels]}
        else:
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return BatchFeature(data=data)

    def __call__(self, images: Any, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def fetch_images(self, images: Any) -> Any:
        """Images are loaded in [`to_pil`]; kept for the transformers API."""
        return images


__all__ = ["VisCPMImageProcessor"]
