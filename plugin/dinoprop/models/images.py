"""Decoding image files into PIL images, for every decode path."""

from __future__ import annotations

from typing import Any

from dinoprop.models.preprocessing import Preprocessing


def open_image(path: str, preprocessing: Preprocessing) -> Any:
    """Opens an image file letting the JPEG decoder downsample early.

    PIL's ``draft()`` decodes JPEGs at 1/2, 1/4 or 1/8 scale when the result
    stays at least ``resize_size`` on each side, which makes decoding large
    photos several times faster without changing the output resolution.
    """
    from PIL import Image

    image = Image.open(path)
    if image.format == "JPEG":
        side = preprocessing.resize_size
        image.draft("RGB", (side, side))
    image.load()
    return image
