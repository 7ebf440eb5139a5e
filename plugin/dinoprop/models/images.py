"""Decoding image files into upright 8-bit PIL images, for every decode path.

Every path that reads image files (whole images on the CPU, object-patch
crops, and the GPU decode path's CPU fallback) goes through
:func:`open_image`, so they all:

- apply the EXIF orientation, as image viewers and the FiftyOne App do,
- refuse images whose decoded size would exceed Pillow's
  ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 megapixels by default; JPEGs are
  measured after ``draft()`` downscaling) and decompression bombs, and
- refuse absurd aspect ratios (longer side over :data:`MAX_ASPECT_RATIO`
  times the shorter one), whose centre crop would show almost nothing of
  the image,

raising :class:`UnsupportedImage`, which the embedding loop reports as a
per-sample failure. :func:`to_rgb` then scales high-bit-depth images
(16-bit PNGs and TIFFs, 32-bit integer and float images) to 8 bits.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, BinaryIO

from dinoprop.core import DinopropError

if TYPE_CHECKING:
    from dinoprop.models.preprocessing import Preprocessing

#: The largest accepted ratio of an image's longer side to its shorter one.
MAX_ASPECT_RATIO = 20

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

_ORIENTATION = 0x0112  # the EXIF orientation tag


class UnsupportedImage(DinopropError):
    """An image file that dinoprop refuses to embed, and why.

    Attributes:
        kind: a short reason shared by all such images (e.g. ``"image too
            large"``), used to count failures by reason
    """

    def __init__(self, kind: str, detail: str):
        super().__init__("%s: %s" % (kind, detail))
        self.kind = kind


def open_image(path: str | BinaryIO, preprocessing: Preprocessing | None = None) -> Any:
    """Opens an image file upright, refusing inputs too large to decode.

    With ``preprocessing``, PIL's ``draft()`` lets the JPEG decoder
    downsample by 1/2, 1/4 or 1/8 while both sides stay at least
    ``resize_size``, which makes decoding large photos several times faster
    without changing the output resolution. Without it the image is decoded
    at full size (for box crops).

    Args:
        path: an image file path or a binary file object
        preprocessing: the :class:`~dinoprop.models.Preprocessing` the
            image is decoded for, or None for full resolution

    Returns:
        a loaded ``PIL.Image.Image`` with its EXIF orientation applied (its
        mode may still be high-bit-depth: see :func:`to_rgb`)

    Raises:
        UnsupportedImage: for decompression bombs, images over
            ``PIL.Image.MAX_IMAGE_PIXELS`` once decoded, and aspect ratios
            over :data:`MAX_ASPECT_RATIO`
    """
    from PIL import Image, ImageOps

    with warnings.catch_warnings():  # the decoded size is checked below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as e:
            raise UnsupportedImage("image too large", str(e)) from None
    if preprocessing is not None and image.format == "JPEG":
        side = preprocessing.resize_size
        image.draft("RGB", (side, side))
    check_image_size(*image.size)
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return image


def check_image_size(width: int, height: int) -> None:
    """Raises :class:`UnsupportedImage` for sizes :func:`open_image` refuses."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise UnsupportedImage(
            "image too large",
            "%dx%d is %d pixels, over the %d-pixel limit "
            "(PIL.Image.MAX_IMAGE_PIXELS); downscale the file or raise the limit"
            % (width, height, width * height, limit),
        )
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise UnsupportedImage(
            "extreme aspect ratio",
            "%dx%d: one side is over %d times the other; crop the file to "
            "its content" % (width, height, MAX_ASPECT_RATIO),
        )


def to_rgb(image: Any) -> Any:
    """Converts any PIL image to 8-bit RGB, scaling high bit depths.

    ``convert("RGB")`` clips 16-bit values to 255 (an almost white image);
    here 16-bit modes (``I;16*``, and ``I``, in which Pillow decodes some
    16-bit formats) map 0..65535 onto 0..255, and float images (``F``) map
    0..1 onto 0..255 (or, when their values exceed 1, are treated like
    16-bit or 8-bit images by their largest value).
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda value: value / 257)
    elif image.mode == "F":
        high = image.getextrema()[1]
        scale = 255 if high <= 1 else 1 / 257 if high > 255 else 1
        image = image.point(lambda value: value * scale)
    return image.convert("RGB")


def needs_cpu_decode(data: bytes) -> bool:
    """Whether an encoded image must take the PIL path instead of nvJPEG.

    nvJPEG (``torchvision.io.decode_jpeg`` on CUDA) decodes only JPEGs, at
    full size, and ignores EXIF orientation; so anything else, EXIF-rotated
    JPEGs, and JPEGs :func:`check_image_size` would refuse at full size
    (PIL may accept them after ``draft()``, or reports why not) are decoded
    by :func:`open_image`. Headers PIL cannot parse are left to nvJPEG.
    """
    import io

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return True
    except Exception:  # unreadable here: the device decoder reports it
        return False
    if header.format != "JPEG" or header.getexif().get(_ORIENTATION, 1) != 1:
        return True
    try:
        check_image_size(*header.size)
    except UnsupportedImage:
        return True
    return False
