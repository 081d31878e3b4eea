"""Image processor of VisCPM-Chat: the original's evaluation transform, with robust input handling.

The original preprocesses with torchvision: `Resize((224, 224), BICUBIC)` on a PIL image, `ToTensor`,
`Normalize(mean=0.5, std=0.5)`. This class does the same operations in the same order (PIL bicubic resize of an
8-bit RGB image, `* rescale_factor` (`/ 255`) in float32, then `(x - mean) / std`), so an RGB PIL image gives
bit-identical pixels.

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
- URLs are fetched with a time limit (`url_timeout`, 10 s by default, for the whole download) and a size limit;
  a server that does not answer in time (`TimeoutError`), cannot be reached (`ConnectionError`), answers with an
  HTTP error status or sends a web page instead of an image (`ValueError`) gives an error naming the URL.
- Tensors on the meta device, sparse or quantized tensors and complex data are refused with a clear error.

This loading ([`VisCPMImageProcessor.to_pil`]) is the one every entry point uses (`VisCPMChat.chat`, the command
line, the web app, chat messages), so a file gives the same pixels whichever way it comes in.

Only torch, transformers, PIL, numpy and the standard library are imported: the file also ships as remote code.
"""

import copy
import io
import os
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs


INCEPTION_MEAN = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_MEAN / _STD, as the original uses
INCEPTION_STD = (0.5, 0.5, 0.5)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_MAX_DOWNLOAD_BYTES = 100 * 2**20  # an image URL larger than this is refused (PIL's pixel limit applies as well)


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


def load_image_file(source: str | os.PathLike | bytes, what: str | None = None) -> Image.Image:
    """Open and fully decode an image file (path or bytes; `what` names bytes in errors) with clear errors; PIL's
    bomb limit applies."""
    what = what or _describe(source)
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
            raise ValueError(f"{what} is not an image file PIL can read: pass a PNG, JPEG, WebP, ... file") from None
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


def load_image_url(url: str, timeout: float) -> Image.Image:
    """Download and decode an image with a time limit for the whole download; errors name the URL and the cause."""
    deadline = time.monotonic() + timeout
    late = f"image URL {url} did not answer within {timeout:g} s: check the address, or raise url_timeout"
    request = urllib.request.Request(url, headers={"User-Agent": "viscpm-hf", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content_type = response.headers.get_content_type()
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > _MAX_DOWNLOAD_BYTES:
                    raise ValueError(f"image URL {url} sends more than {_MAX_DOWNLOAD_BYTES >> 20} MB: download the "
                                     "file and pass its path")
                if time.monotonic() > deadline:
                    raise TimeoutError(late)
                chunks.append(chunk)
    except urllib.error.HTTPError as error:
        raise ValueError(f"image URL {url} answered HTTP {error.code} {error.reason}: there is no image at that "
                         "address; check the URL") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise TimeoutError(late) from None
        raise ConnectionError(f"cannot reach image URL {url} ({error.reason}): check the address and the "
                              "network") from None
    except TimeoutError:
        raise TimeoutError(late) from None
    except OSError as error:  # the server closed the connection, ...
        raise ConnectionError(f"image URL {url} failed while downloading ({error}): try again or download the "
                              "file and pass its path") from None
    if content_type.startswith("text/") or content_type in ("application/json", "application/xml"):
        raise ValueError(f"image URL {url} returned a {content_type} page (HTTP 200), not an image: link the image "
                         "file itself")
    return load_image_file(b"".join(chunks), what=f"image URL {url}")


def _tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """A torch image as a numpy array; tensors that hold no usable data are refused with the reason."""
    if tensor.device.type == "meta":
        raise ValueError("the image tensor is on the meta device, so it holds no pixel data: pass a tensor with "
                         "values (e.g. created on 'cpu')")
    if tensor.layout != torch.strided:
        raise ValueError(f"the image tensor is sparse ({tensor.layout}): pass a dense tensor (tensor.to_dense())")
    if tensor.is_quantized or tensor.is_complex():
        raise ValueError(f"the image tensor has dtype {tensor.dtype}: pass uint8 or float pixel values")
    array = tensor.detach().cpu()
    if array.dtype in (torch.bfloat16, torch.float16):
        array = array.float()
    return array.numpy()


class VisCPMImageProcessorKwargs(ImagesKwargs, total=False):
    """The image processor's options beyond transformers' `ImagesKwargs`.

    apply_exif_orientation (`bool`): rotate/flip images as their EXIF orientation says.
    url_timeout (`float`): seconds allowed for downloading an image URL.
    """

    apply_exif_orientation: bool | None
    url_timeout: float | None


class VisCPMImageProcessor(BaseImageProcessor):
    r"""
    VisCPM-Chat image processor: any image to a `[3, 224, 224]` float32 tensor, bit-identical to the original's
    `build_transform(is_train=False)` on RGB PIL images (see the module docstring for input handling).

    Args:
        size (`dict[str, int]`, defaults to `{"height": 224, "width": 224}`): output size (BEiT-3's input size).
        resample (`PILImageResampling`, defaults to `BICUBIC`): PIL resampling filter of the resize.
        do_rescale (`bool`, defaults to `True`): multiply the 8-bit values by `rescale_factor`.
        do_resize (`bool`, defaults to `True`): resize to `size` (the model needs its input size).
        do_convert_rgb (`bool`, defaults to `True`): convert to 8-bit RGB as described above; `False` keeps an 8-bit
            image's own channels (grey, grey + alpha, RGB or RGBA), for other uses than VisCPM-Chat's encoder.
        rescale_factor (`float`, defaults to `1 / 255`): to [0, 1], as `ToTensor` does.
        do_normalize (`bool`, defaults to `True`): apply `(x - image_mean) / image_std` after rescaling.
        image_mean, image_std (`tuple[float]`, default to 0.5 each): normalisation constants.
        apply_exif_orientation (`bool`, defaults to `True`): rotate/flip images as their EXIF orientation says.
        url_timeout (`float`, defaults to 10): seconds allowed for downloading an image URL, the whole download.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = VisCPMImageProcessorKwargs

    def __init__(
        self,
        size: dict[str, int] | None = None,
        resample: int = PILImageResampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: tuple[float, ...] | list[float] | None = None,
        image_std: tuple[float, ...] | list[float] | None = None,
        apply_exif_orientation: bool = True,
        url_timeout: float = 10.0,
        do_resize: bool = True,
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = self._check_size(size if size is not None else {"height": 224, "width": 224})
        self.resample = int(resample)
        self.do_resize = bool(do_resize)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = self._per_channel(image_mean if image_mean is not None else INCEPTION_MEAN, "image_mean")
        self.image_std = self._per_channel(image_std if image_std is not None else INCEPTION_STD, "image_std")
        self.apply_exif_orientation = bool(apply_exif_orientation)
        self.url_timeout = float(url_timeout)
        if not self.url_timeout > 0:
            raise ValueError(f"url_timeout must be a positive number of seconds, got {url_timeout}")
        self.do_convert_rgb = bool(do_convert_rgb)

    @staticmethod
    def _per_channel(value, name: str) -> list[float]:
        values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
        if not values:
            raise ValueError(f"{name} needs one value per channel, got none")
        return values

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
        if images is None:
            raise ValueError("no image given (None): pass a PIL image, a numpy array, a torch tensor, a file path "
                             "or URL, or a list of them")
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
                if isinstance(image, (list, tuple)):  # per-sample lists ([[img], [img]]): flattened in order
                    flat.extend(self._flatten(image) if image else [])
                elif self._is_single(image) or image is None:
                    flat.append(image)
                else:
                    raise ValueError(f"each image must be a PIL image, array, tensor, path or URL, got "
                                     f"{type(image).__name__}")
            return flat
        raise ValueError(f"unsupported image type {type(images).__name__}: give a PIL image, a numpy array, a torch "
                         "tensor, a file path or URL, or a list of them")

    def to_pil(self, image: Any, input_data_format: str | None = None, convert_rgb: bool = True) -> Image.Image:
        """One input (PIL, array, tensor, path, URL, bytes) to an upright 8-bit RGB PIL image (with
        `convert_rgb=False`, an 8-bit image that keeps its channels: L, LA, RGB or RGBA)."""
        if image is None:
            raise ValueError("image is None")
        channels_first = None if input_data_format is None else input_data_format in ("channels_first", "first")
        if isinstance(image, (str, os.PathLike)) and str(image).startswith(("http://", "https://")):
            image = load_image_url(str(image), self.url_timeout)
        elif isinstance(image, (str, os.PathLike, bytes)):
            image = load_image_file(image)
        elif isinstance(image, torch.Tensor):
            # torch images are channels-first by convention (torchvision); float tensors are [0, 1].
            array = _tensor_to_array(image)
            if channels_first is None and array.ndim == 3:
                channels_first = array.shape[0] in (1, 2, 3, 4) or array.shape[-1] not in (1, 2, 3, 4)
            image = _array_to_pil(array, channels_first, "image tensor")
        elif isinstance(image, np.ndarray):
            image = _array_to_pil(image, channels_first, "image array")
        elif not isinstance(image, Image.Image):
            raise ValueError(f"unsupported image type {type(image).__name__}: give a PIL image, a numpy array, a "
                             "torch tensor, a file path, URL or the file's bytes")
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has zero size ({image.width}x{image.height})")
        if self.apply_exif_orientation:
            image = ImageOps.exif_transpose(image)
        if convert_rgb:
            return to_rgb(image)
        if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
            return Image.fromarray(_quantize(np.asarray(image), f"{image.mode} image"), mode="L")
        return image if image.mode in ("L", "LA", "RGB", "RGBA") else image.convert("RGBA" if "A" in image.mode
                                                                                     else "RGB")

    # ------------------------------------------------------------------ PIL -> pixel values

    @staticmethod
    def _pixels(image: Image.Image, options: dict) -> torch.Tensor:
        """torchvision's `Resize` (PIL path), `ToTensor` and `Normalize`, as the same float32 operations."""
        if options["do_resize"]:
            image = image.resize((options["size"]["width"], options["size"]["height"]), options["resample"])
        array = np.array(image, dtype=np.uint8, copy=True)
        array = array[..., None] if array.ndim == 2 else array  # one channel (do_convert_rgb=False on grey)
        pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32)
        if options["do_rescale"]:
            factor = options["rescale_factor"]
            # `x / 255` exactly as ToTensor computes it when the factor is the inverse of a whole number.
            inverse = 1.0 / factor if factor else 0.0
            pixels = pixels.div(inverse) if inverse and inverse.is_integer() else pixels.mul(factor)
        if options["do_normalize"]:
            for name in ("image_mean", "image_std"):
                if len(options[name]) not in (1, pixels.shape[0]):
                    raise ValueError(f"{name} has {len(options[name])} values for an image with {pixels.shape[0]} "
                                     "channels: give one value per channel")
            mean = torch.as_tensor(options["image_mean"], dtype=torch.float32).view(-1, 1, 1)
            std = torch.as_tensor(options["image_std"], dtype=torch.float32).view(-1, 1, 1)
            pixels = pixels.sub(mean).div(std)
        return pixels

    def _call_options(self, kwargs: dict) -> dict:
        """This call's settings: the processor's, overridden by the call's (`None` keeps the processor's)."""
        for key in ("do_center_crop", "crop_size", "do_pad", "pad_size"):
            if kwargs.pop(key, None):
                raise ValueError(f"{key} is not supported: VisCPM-Chat resizes the whole image to `size`, as the "
                                 "original does (no crop, no padding)")
        # No effect here: torchvision-backend grouping, and the processor-level image_seq_length / default_to_square.
        for key in ("disable_grouping", "image_seq_length", "default_to_square"):
            kwargs.pop(key, None)
        options = {}
        for key in ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                    "image_std", "do_convert_rgb"):
            value = kwargs.pop(key, None)
            options[key] = getattr(self, key) if value is None else value
        options["size"] = self._check_size(options["size"])
        options["resample"] = int(options["resample"])
        options["image_mean"] = self._per_channel(options["image_mean"], "image_mean")
        options["image_std"] = self._per_channel(options["image_std"], "image_std")
        for key in ("input_data_format", "data_format", "device", "apply_exif_orientation", "url_timeout"):
            options[key] = kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"VisCPMImageProcessor got unsupported arguments: {sorted(kwargs)}")
        if options["data_format"] not in (None, "channels_first", "channels_last", "first", "last") and not hasattr(
                options["data_format"], "value"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {options['data_format']!r}")
        return options

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """
        Preprocess one image or a list of images into `pixel_values` [B, 3, H, W] (float32).

        Args:
            images: PIL image, numpy array ((H, W), (H, W, C) or (C, H, W); uint8, uint16, bool or float), torch
                tensor ((C, H, W) or (H, W, C); float in [0, 1]), file path, URL or bytes; a list of them (per-sample
                lists are flattened in order); or a 4-D array/tensor batch.
            return_tensors (`"pt"`, `"np"` or `None`): `None` gives a list of float32 numpy arrays.
            size, resample, do_resize, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
                apply_exif_orientation, url_timeout: override the processor's settings for this call.
            input_data_format (`"channels_first"` / `"channels_last"`): layout of array inputs when ambiguous.
            data_format (`"channels_first"`, the default, or `"channels_last"`): layout of `pixel_values`.
            device: where to put `pixel_values` (with `return_tensors="pt"`).
        """
        return_tensors = getattr(return_tensors, "value", return_tensors)
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        options = self._call_options(dict(kwargs))
        input_format = getattr(options["input_data_format"], "value", options["input_data_format"])
        loader = self
        if options["apply_exif_orientation"] is not None or options["url_timeout"] is not None:
            loader = copy.copy(self)
            for key in ("apply_exif_orientation", "url_timeout"):
                if options[key] is not None:
                    setattr(loader, key, options[key])
        convert = options["do_convert_rgb"]
        pixels = []
        for index, image in enumerate(self._flatten(images)):
            try:
                rgb = loader.to_pil(image, input_format, convert_rgb=convert)
            except (ValueError, OSError) as error:
                if isinstance(images, (list, tuple)) and len(images) > 1:
                    raise type(error)(f"image {index}: {error}") from None
                raise
            pixels.append(self._pixels(rgb, options))
        if getattr(options["data_format"], "value", options["data_format"]) in ("channels_last", "last"):
            pixels = [p.permute(1, 2, 0) for p in pixels]
        if return_tensors is None:
            return BatchFeature(data={"pixel_values": [p.numpy() for p in pixels]})
        if len({tuple(p.shape) for p in pixels}) > 1:
            raise ValueError("images of different sizes cannot be stacked (do_resize=False): resize them, or pass "
                             "return_tensors=None")
        stacked = torch.stack(pixels)
        if return_tensors == "np":
            return BatchFeature(data={"pixel_values": stacked.numpy()})
        return BatchFeature(data={"pixel_values": stacked if options["device"] is None else stacked.to(options["device"])})

    def __call__(self, images: Any, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def fetch_images(self, images: Any) -> Any:
        """Images are loaded in [`to_pil`]; kept for the transformers API."""
        return images


__all__ = ["VisCPMImageProcessor"]
