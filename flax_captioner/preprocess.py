"""Image loading and ViT preprocessing, numerically equal to transformers' ViTImageProcessor.

The reference is the model card's code: ``ViTImageProcessor(images=[Image.open(p).convert("RGB")])``.
Pixels go through the same PIL resize on uint8 RGB that ViTImageProcessor performs; rescaling and
normalisation, which ViTImageProcessor computes in float64 then float32 per pixel, are done here
with a per-channel 256-entry table holding exactly those float32 values, so the output is
bit-identical and cheaper to compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import pathlib
import re
import struct
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flax_captioner import nvimagecodec
from flax_captioner.errors import ImageReadError, ModelLoadError

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# ViTImageProcessor's defaults (IMAGENET_STANDARD_MEAN / _STD are 0.5, not ImageNet's statistics).
_DEFAULT_SIZE = (224, 224)
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)
_IN_MEMORY = "<PIL.Image>"
_BYTES = "<bytes>"
# What load_image takes: a path, an image file's encoded bytes, or a PIL image.
ImageSource = str | os.PathLike | bytes | Image.Image
# load_image turns every image over the limit into an ImageReadError naming it; PIL's own
# warning for the same image (printed from site-packages before the error) only repeats it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Every exception type PIL's decoders are known to raise on corrupt data.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
# An error reason is one line of a row: longer text is cut to this many characters.
REASON_CHARS = 200
# A long quoted value inside an exception's text: PIL quotes the data it failed on (a whole
# EXIF thumbnail, kilobytes of raw JPEG bytes, in one case).
_QUOTED_DATA = re.compile(
    r"""(?<!\w)b?(?:'(?:[^'\\]|\\.){48,}(?:'|$)|"(?:[^"\\]|\\.){48,}(?:"|$))""")
# Modes whose values convert("RGB") clips to 0..255 without scaling.
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Square canvases the host pads decoded uint8 images into when the compiled program resizes
# them (``ImageDecoding.device_resize``, resize.py): thumbnails and model-sized inputs, Flickr's
# 500 px, COCO's 640 px, larger photos. The device's work grows with the side squared, so each
# image takes the smallest that holds it; a larger photo is resized here instead.
CANVAS_SIDES = (256, 512, 640, 1024)
# What ``load_image`` tells its ``on_clipped``: (image name, mode, lowest value, highest value).
OnClipped = Callable[[str, str, float, float], None]
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """What ViTImageProcessor does to an RGB image; defaults are ViTImageProcessor's.

    Attributes:
      do_resize: resize to ``size`` with PIL.
      size: (height, width) after resizing.
      resample: PIL resampling filter (``PIL.Image.Resampling`` value; 2 is bilinear).
      do_rescale: multiply uint8 pixels by ``rescale_factor``.
      rescale_factor: usually 1/255.
      do_normalize: subtract ``image_mean`` and divide by ``image_std`` per channel.
      image_mean: per-channel (R, G, B) mean.
      image_std: per-channel (R, G, B) standard deviation.
    """

    do_resize: bool = True
    size: tuple[int, int] = _DEFAULT_SIZE
    resample: int = int(Image.Resampling.BILINEAR)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _DEFAULT_MEAN
    image_std: tuple[float, float, float] = _DEFAULT_STD

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(
            isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in self.size
        ):
            raise ValueError(f"size must be (height, width) positive integers, got {self.size!r}")
        if self.resample not in {int(member) for member in Image.Resampling}:
            raise ValueError(f"resample must be a PIL.Image.Resampling value, got {self.resample!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean and image_std need 3 values (R, G, B), got {self.image_mean!r} and {self.image_std!r}"
            )
        if self.do_normalize and 0 in self.image_std:
            raise ValueError(f"image_std has a zero: {self.image_std!r}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> PreprocessConfig:
        """Reads a ``preprocessor_config.json`` dict the way ViTImageProcessor interprets it.

        - ``size``: an int n means (n, n); a list means (height, width); a dict needs
          ``height`` and ``width``. ViTImageProcessor accepts ``{"shortest_edge": n}`` (and the
          other aspect-preserving forms) when loading but raises at its first resize; this raises
          ``ValueError`` at once instead.
        - ``image_mean`` / ``image_std``: a single float applies to every channel; null means
          the default (0.5).
        - null ``resample`` means bilinear; null ``do_*`` flags mean false, as in
          ViTImageProcessor.preprocess.
        - Other keys (``feature_extractor_type``, ``image_processor_type``, ``processor_class``,
          ``do_convert_rgb`` ...) do not change the output: ``load_image`` hands every image to
          the processor as RGB already, which makes ``do_convert_rgb`` a no-op.

        Raises:
          ValueError: a value ViTImageProcessor would reject, or one it would fail on.
        """
        do_rescale = bool(config.get("do_rescale", True))
        rescale_factor = config.get("rescale_factor", 1 / 255)
        if isinstance(rescale_factor, bool) or not isinstance(rescale_factor, (int, float)):
            if do_rescale:
                raise ValueError(f"rescale_factor must be a number when do_rescale is true, got {rescale_factor!r}")
            rescale_factor = 1 / 255  # unused; ViTImageProcessor ignores it too
        resample = config.get("resample")
        return cls(
            do_resize=bool(config.get("do_resize", True)),
            size=_size_from_config(config.get("size")),
            resample=int(Image.Resampling.BILINEAR) if resample is None else resample,
            do_rescale=do_rescale,
            rescale_factor=float(rescale_factor),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=_per_channel(config.get("image_mean"), _DEFAULT_MEAN, "image_mean"),
            image_std=_per_channel(config.get("image_std"), _DEFAULT_STD, "image_std"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` dict, in the form ViTImageProcessor itself saves."""
        height, width = self.size
        return {
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "ViTImageProcessor",
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"height": height, "width": width},
        }

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PreprocessConfig:
        """Reads ``directory/preprocessor_config.json``.

        Raises:
          ModelLoadError: the file is missing, is not JSON, or holds a value ViTImageProcessor
            would not accept; the message names the file.
        """
        path = pathlib.Path(directory) / PREPROCESSOR_CONFIG_NAME
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: not found") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"{path}: cannot read: {error}") from None
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{path}: invalid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"{path}: expected a JSON object, got {type(config).__name__}")
        try:
            return cls.from_dict(config)
        except (ValueError, TypeError) as error:
            raise ModelLoadError(f"{path}: {error}") from None

    def save_pretrained(self, directory: str | os.PathLike) -> pathlib.Path:
        """Writes ``directory/preprocessor_config.json`` (creating the directory); returns its path."""
        path = pathlib.Path(directory) / PREPROCESSOR_CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path


@dataclasses.dataclass(frozen=True)
class ImageDecoding:
    """How an image file becomes the RGB image that preprocessing resizes. The defaults give
    the model card's pixels, which parity with PyTorch assumes.

    Attributes:
      exif_transpose: rotate/flip by the EXIF orientation tag first (``load_image``).
      fast: decode JPEGs in the DCT domain at the largest reduction (1/2, 1/4 or 1/8) that
        still covers the model's input size on both sides, then resize as usual. Pixels come
        close to ViTImageProcessor's, not equal; docs/performance.md, "Fast decode", has its
        speed and caption agreement with the exact path.
      device_resize: the host only decodes (``load_decoded_one``: uint8 pixels) and the
        compiled program resizes and normalises them with PIL's own arithmetic (resize.py):
        the same float32 values bit for bit.
      jpeg_decoder: "pillow", or "nvimagecodec": NVIDIA nvImageCodec's CPU decoder
        (``nvimagecodec.py``) decodes the JPEGs whose pixels it gives equal to Pillow's,
        faster; Pillow decodes the rest, and every JPEG when EXIF rotation or fast decoding
        is asked for.
    """

    exif_transpose: bool = False
    fast: bool = False
    device_resize: bool = False
    jpeg_decoder: str = "pillow"


class ClippingWarning:
    """An ``on_clipped`` for ``load_image`` that logs the first image reported to it, and only
    that one: every such image has the same cause. A run makes its own (``feed.batches`` does,
    one per feed), so each run names its first such image, however many decode threads or
    processes report to it; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._warned = False

    def __call__(self, name: str, mode: str, low: float, high: float) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        logger.warning("%s: a %s image with values from %s to %s: they are clipped to 0..255 "
                       "without scaling, as the model card's convert(\"RGB\") does, so the "
                       "model sees a mostly white or black image (only the first such image "
                       "is named)", name, mode, low, high)


def short_reason(cause: BaseException | str, *, tail: bool = False) -> str:
    """``cause`` (an exception's text, or other text such as a command's stderr) as one short
    printable line for an error reason: whitespace collapsed, long quoted values left out (an
    exception may quote the image data it failed on), other unprintable characters escaped,
    and at most ``REASON_CHARS`` characters, keeping the start (or, with ``tail``, the end)."""
    text = cause if isinstance(cause, str) else str(cause) or type(cause).__name__
    text = _QUOTED_DATA.sub(lambda quoted: f"<{len(quoted.group())} characters left out>",
                            " ".join(text.split()))
    text = "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)
    if len(text) <= REASON_CHARS:
        return text
    return "..." + text[3 - REASON_CHARS:] if tail else text[:REASON_CHARS - 3] + "..."


def load_image(source: ImageSource, *, name: str | None = None,
               exif_transpose: bool = False,
               jpeg_draft_size: tuple[int, int] | None = None,
               on_clipped: OnClipped | None = None) -> Image.Image:
    """Decodes an image fully and converts it to RGB, as the model card does.

    Every mode goes through ``image.convert("RGB")``: palette and alpha modes drop the alpha
    channel (no compositing onto white), CMYK uses PIL's conversion, and the high-depth modes
    I;16, I and F are clipped to 0..255 without scaling (F is truncated towards zero), so a
    16-bit photo mostly saturates to white exactly as it does for the card. Such an image
    whose values go past 0..255 is reported to ``on_clipped`` (a run passes its
    ``ClippingWarning``, which logs the first one).

    Args:
      source: a path, the encoded bytes of an image file, or an in-memory PIL image.
      name: what errors call the image (default: the path, ``"<bytes>"`` or the PIL image's
        file name / ``"<PIL.Image>"``).
      exif_transpose: rotate/flip by the EXIF orientation tag (``ImageOps.exif_transpose``, what
        ``pipeline("image-to-text")`` does). Off by default because the model card's code does
        not apply it, and parity with the card's captions is the default.
      jpeg_draft_size: (width, height), for the fast decode path: a JPEG file is decoded at
        1/2, 1/4 or 1/8 of its size in the DCT domain (``Image.draft``), the largest reduction
        that keeps both sides at least this large. Other formats and in-memory images are
        unaffected. None (default): full-size decoding, the model card's pixels.
      on_clipped: called with (name, mode, lowest value, highest value) when a high-depth
        image has values that the conversion clips. None (default): not checked.

    Returns:
      A loaded RGB image (the image itself when it is a loaded RGB image already).

    Raises:
      ImageReadError: naming the image and the cause: missing, a directory, empty, not an
        image, truncated or corrupt, or over PIL's decompression-bomb limit
        (``PIL.Image.MAX_IMAGE_PIXELS``, read at call time and checked before decoding, the same
        for paths, bytes and in-memory images).
    """
    if isinstance(source, Image.Image):
        image = source
        name = name or getattr(source, "filename", "") or _IN_MEMORY
    else:
        image, name = _open(source, name)
    with contextlib.ExitStack() as stack:
        if image is not source:
            stack.enter_context(image)
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and image.width * image.height > limit:
            raise ImageReadError(name, f"{image.width}x{image.height} pixels is over PIL's "
                                       f"decompression-bomb limit of {limit} pixels")
        if jpeg_draft_size is not None and image is not source:
            image.draft(None, jpeg_draft_size)  # a no-op for other formats
        if exif_transpose:
            image = _exif_transposed(image, name)
        return _decode_rgb(image, name, on_clipped)


def _open(source: str | os.PathLike | bytes, name: str | None) -> tuple[Image.Image, str]:
    """``Image.open`` of a path or encoded bytes; every failure is an ImageReadError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or _BYTES
        if not len(source):
            raise ImageReadError(name, "empty image data (0 bytes)")
        opened: Any = io.BytesIO(source)
    else:
        opened = os.fspath(source)
        name = name or str(opened)
    try:
        return Image.open(opened), name
    except FileNotFoundError:
        raise ImageReadError(name, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageReadError(name, "permission denied") from None
    except UnidentifiedImageError:
        empty = isinstance(opened, str) and os.path.getsize(opened) == 0
        raise ImageReadError(name, "empty file (0 bytes)" if empty
                             else "not an image PIL can identify") from None
    except Image.DecompressionBombError as error:
        raise ImageReadError(name, "over PIL's decompression-bomb limit: "
                                   f"{short_reason(error)}") from None
    except _DECODE_ERRORS as error:
        raise ImageReadError(name, f"cannot open: {short_reason(error)}") from None


def _exif_transposed(image: Image.Image, name: str) -> Image.Image:
    """``ImageOps.exif_transpose``, with every failure as ImageReadError: PIL rewrites the
    EXIF block, and a tag whose stored type is not its usual one raises whatever that type's
    writer does (TypeError, ValueError, struct.error, ...)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:
        raise ImageReadError(name, f"cannot apply the EXIF orientation: "
                                   f"{short_reason(error)}") from None


def preprocess(images: Sequence[Image.Image], config: PreprocessConfig) -> np.ndarray:
    """Turns images into the encoder's pixel values.

    Equal to ``ViTImageProcessor(**config)(images, return_tensors="np",
    input_data_format="channels_last").pixel_values`` for RGB images (ViTImageProcessor left
    to guess the layout mistakes images 1 or 3 pixels high for channels-first ones). Images that
    are not RGB are converted with ``convert("RGB")`` first, as by ``load_image``. Runs in the
    calling thread; ``load_and_preprocess`` decodes on a thread pool.

    Args:
      images: B PIL images.
      config: what to do to them.

    Returns:
      float32 [B, 3, H, W]; (H, W) is ``config.size``, or the images' common size when
      ``config.do_resize`` is false.

    Raises:
      ValueError: ``do_resize`` is false and the images differ in size.
    """
    rgb_images = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    height, width = config.size if config.do_resize else _common_size(rgb_images, config)
    lut = pixel_lut(config)
    pixel_values = np.empty((len(rgb_images), 3, height, width), np.float32)
    for image, row in zip(rgb_images, pixel_values):
        _pixel_values_into(image, config, lut, row)
    return pixel_values


def load_and_preprocess_one(source: ImageSource, config: PreprocessConfig, *,
                            name: str | None = None,
                            decoding: ImageDecoding = ImageDecoding(),
                            on_clipped: OnClipped | None = None,
                            out: np.ndarray | None = None) -> np.ndarray:
    """``load_image`` then ``preprocess`` for one image; safe to call from many threads at once
    (``feed`` runs it on its decode threads). ``on_clipped`` as in ``load_image``.

    Args:
      out: float32 [3, H, W] to write the pixel values into (a decode process's shared slot:
        no array per image, whose fresh pages the kernel would zero); None: a new array.

    Returns:
      float32 [3, H, W]: ``out`` when given.

    Raises:
      ImageReadError: see ``load_image``.
    """
    image = _load_for(source, config, name, decoding, on_clipped)
    height, width = config.size if config.do_resize else (image.height, image.width)
    if out is None or out.shape != (3, height, width) or out.dtype != np.float32:
        out = np.empty((3, height, width), np.float32)
    _pixel_values_into(image, config, pixel_lut(config), out)
    return out


def load_decoded_one(source: ImageSource, config: PreprocessConfig, *,
                     name: str | None = None,
                     decoding: ImageDecoding = ImageDecoding(),
                     on_clipped: OnClipped | None = None) -> np.ndarray:
    """``load_image`` only, for a program that resizes on the device (``resize.py``): the
    image's uint8 RGB pixels. A photo larger than the largest of ``CANVAS_SIDES`` is resized
    here to ``config.size`` with PIL (the device then copies it: an unchanged size is PIL's
    identity), so no canvas the size of a huge photo is built. Thread-safe.

    Returns:
      uint8 [h, w, 3].

    Raises:
      ImageReadError: see ``load_image``.
    """
    pixels = _nvimagecodec_pixels(source, config, decoding)
    if pixels is not None and max(pixels.shape[:2]) <= CANVAS_SIDES[-1]:
        return pixels
    image = (Image.fromarray(pixels) if pixels is not None
             else _load_pillow(source, config, name, decoding, on_clipped))
    if max(image.size) > CANVAS_SIDES[-1]:
        height, width = config.size
        image = image.resize((width, height), resample=config.resample)
    return np.asarray(image)


def _load_for(source: ImageSource, config: PreprocessConfig, name: str | None,
              decoding: ImageDecoding, on_clipped: OnClipped | None) -> Image.Image:
    """``load_image`` as ``decoding`` says, for ``config``'s input size: nvImageCodec's
    pixels where it takes the image, else Pillow's."""
    pixels = _nvimagecodec_pixels(source, config, decoding)
    if pixels is not None:
        return Image.fromarray(pixels)
    return _load_pillow(source, config, name, decoding, on_clipped)


def _load_pillow(source: ImageSource, config: PreprocessConfig, name: str | None,
                 decoding: ImageDecoding, on_clipped: OnClipped | None) -> Image.Image:
    """``load_image`` (Pillow) with ``decoding``'s EXIF and fast-decode choices."""
    draft = None
    if decoding.fast and config.do_resize:
        side = max(config.size)  # square, so an EXIF rotation cannot leave a side short
        draft = (side, side)
    return load_image(source, name=name, exif_transpose=decoding.exif_transpose,
                      jpeg_draft_size=draft, on_clipped=on_clipped)


def _nvimagecodec_pixels(source: ImageSource, config: PreprocessConfig,
                         decoding: ImageDecoding) -> np.ndarray | None:
    """uint8[h, w, 3] from nvImageCodec when ``decoding`` asks for it and it takes ``source``
    (``nvimagecodec.decode_jpeg``); None: Pillow decodes it (and words any error)."""
    if (decoding.jpeg_decoder != "nvimagecodec" or decoding.exif_transpose
            or (decoding.fast and config.do_resize) or isinstance(source, Image.Image)):
        return None
    if not isinstance(source, (bytes, bytearray, memoryview)):
        try:
            with open(source, "rb") as file:  # another format: only its first bytes are read
                head = file.read(len(nvimagecodec.JPEG_START))
                if head != nvimagecodec.JPEG_START:
                    return None
                source = head + file.read()
        except (OSError, ValueError):  # Pillow names the problem
            return None
    return nvimagecodec.decode_jpeg(source)


def _size_from_config(size: Any) -> tuple[int, int]:
    """(height, width) from the forms ViTImageProcessor's get_size_dict accepts."""
    if size is None:
        return _DEFAULT_SIZE
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (size[0], size[1])
    if isinstance(size, Mapping):
        if set(size) == {"height", "width"}:
            return (size["height"], size["width"])
        raise ValueError(
            f"size {dict(size)!r}: ViTImageProcessor resizes to a fixed height and width, "
            "so size needs the keys 'height' and 'width'"
        )
    raise ValueError(f"size must be an int, [height, width] or {{'height', 'width'}}, got {size!r}")


def _per_channel(value: Any, default: tuple[float, float, float], name: str) -> tuple[float, float, float]:
    """A 3-tuple of floats from a float (one value for every channel), a list, or null."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(channel) for channel in value)
    raise ValueError(f"{name} must be a number or 3 numbers (R, G, B), got {value!r}")


@functools.lru_cache(maxsize=16)
def pixel_lut(config: PreprocessConfig) -> np.ndarray:
    """float32 [3, 256]: the output value of each uint8 level in each channel.

    Computed the way ViTImageProcessor computes every pixel: rescale in float64, cast to
    float32, then normalise in float32 arithmetic.
    """
    levels = np.arange(256, dtype=np.float64)
    if config.do_rescale:
        levels = levels * config.rescale_factor
    levels = np.broadcast_to(levels.astype(np.float32), (3, 256))
    if config.do_normalize:
        mean = np.asarray(config.image_mean, np.float32)[:, None]
        std = np.asarray(config.image_std, np.float32)[:, None]
        levels = (levels - mean) / std
    return np.ascontiguousarray(levels, np.float32)


def _decode_rgb(image: Image.Image, name: str, on_clipped: OnClipped | None) -> Image.Image:
    """Fully decodes ``image`` (so truncation shows now) and converts it to RGB, reporting a
    high-depth image whose values the conversion clips to ``on_clipped``."""
    try:
        image.load()
        if on_clipped is not None and image.mode in _HIGH_DEPTH_MODES:
            low, high = image.getextrema()
            if low < 0 or high > 255:
                on_clipped(name, image.mode, low, high)
        return image if image.mode == "RGB" else image.convert("RGB")
    except _DECODE_ERRORS as error:
        raise ImageReadError(name, f"cannot decode: {short_reason(error)}") from None


def _pixel_values_into(
    image: Image.Image, config: PreprocessConfig, pixel_lut: np.ndarray, out: np.ndarray
) -> None:
    """Writes the pixel values of one RGB image into ``out`` [3, H, W].

    ViTImageProcessor round-trips the uint8 image through numpy and back to PIL before the same
    ``Image.resize`` call; resizing the PIL image directly gives the same uint8 pixels.
    """
    if config.do_resize:
        height, width = config.size
        image = image.resize((width, height), resample=config.resample)
    pixels = np.asarray(image)  # [H, W, 3] uint8
    for channel in range(3):
        np.take(pixel_lut[channel], pixels[..., channel], out=out[channel])


def _common_size(images: Sequence[Image.Image], config: PreprocessConfig) -> tuple[int, int]:
    """(height, width) shared by every image, for ``do_resize`` false."""
    sizes = {(image.height, image.width) for image in images}
    if len(sizes) > 1:
        raise ValueError(f"do_resize is false and the images differ in size (height, width): {sorted(sizes)}")
    return sizes.pop() if sizes else config.size
