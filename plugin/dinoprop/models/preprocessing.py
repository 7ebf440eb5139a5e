"""DINOv2's evaluation preprocessing: resize, centre crop, normalisation
settings, and the Hugging Face processor configured the same way."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinoprop.core import DinopropError
from dinoprop.models.images import check_image_size, to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: DINOv2's evaluation preprocessing: shorter side to 256, centre crop 224.
DEFAULT_CROP_SIZE = 224
_RESIZE_RATIO = 256 / 224


@dataclass(frozen=True)
class Preprocessing:
    """How images are resized, cropped and normalised before the model.

    Attributes:
        crop_size: the side of the square centre crop fed to the model
        resize_size: the length the shorter image side is resized to first
        mean: per-channel normalisation mean (in [0, 1] units)
        std: per-channel normalisation standard deviation
    """

    crop_size: int = DEFAULT_CROP_SIZE
    resize_size: int = 256
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @classmethod
    def for_size(cls, crop_size: int | None, **kwargs) -> "Preprocessing":
        """DINOv2's preprocessing scaled to a ``crop_size`` crop.

        Args:
            crop_size: the crop side in pixels, or None for
                :data:`DEFAULT_CROP_SIZE`

        Raises:
            DinopropError: unless ``crop_size`` is None or a positive int
                (``0``, ``True``, ``224.0`` and ``"224"`` are refused)
        """
        if crop_size is None:
            crop_size = DEFAULT_CROP_SIZE
        if isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)) or crop_size <= 0:
            raise DinopropError(
                "image_size must be a positive integer (the side in pixels of "
                "the square crop fed to the model, e.g. 224), or None for %d; "
                "got %r" % (DEFAULT_CROP_SIZE, crop_size)
            )
        crop = int(crop_size)
        return cls(crop, int(round(crop * _RESIZE_RATIO)), **kwargs)


def preprocess_image(image: Any, preprocessing: Preprocessing) -> Any:
    """Resizes, centre-crops and converts a PIL image to a uint8 tensor.

    :func:`preprocess_image_array` (see there) as a ``3 x crop_size x
    crop_size`` torch tensor.
    """
    import torch

    return torch.from_numpy(preprocess_image_array(image, preprocessing))


def preprocess_image_array(image: Any, preprocessing: Preprocessing) -> np.ndarray:
    """Resizes, centre-crops and converts a PIL image to a uint8 array,
    without torch (the Ray engine's decode tasks do not import it).

    The shorter side is resized to ``preprocessing.resize_size`` with bicubic
    resampling, then the centre ``crop_size`` square is kept: DINOv2's
    evaluation transform (normalisation happens on the device).
    High-bit-depth images are scaled to 8 bits first
    (:func:`~dinoprop.models.images.to_rgb`), and images with an aspect
    ratio over :data:`~dinoprop.models.images.MAX_ASPECT_RATIO` are refused
    (their resize would allocate gigabytes for a sliver of content).

    Args:
        image: a ``PIL.Image.Image``
        preprocessing: a :class:`Preprocessing`

    Returns:
        a ``3 x crop_size x crop_size`` uint8 array

    Raises:
        UnsupportedImage: for an extreme aspect ratio
    """
    from PIL import Image

    width, height = image.size
    check_image_size(width, height)
    image = to_rgb(image)
    short = preprocessing.resize_size
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    image = image.resize(size, Image.BICUBIC)
    return center_crop_array(image, preprocessing.crop_size)


def preprocess_whole_image(image: Any, preprocessing: Preprocessing) -> Any:
    """Resizes a whole PIL image, uncropped, to a ``crop_size`` square tensor.

    For pooling patch tokens under boxes (``patch_mode="tokens"``): every
    box must stay in the picture, so the image is resized (bicubic) to
    ``crop_size x crop_size`` without keeping its aspect ratio, and a
    relative box covers the same relative part of the model's input.

    Raises:
        UnsupportedImage: for an extreme aspect ratio
    """
    from PIL import Image

    check_image_size(*image.size)
    side = preprocessing.crop_size
    resized = to_rgb(image).resize((side, side), Image.BICUBIC)
    return center_crop_to_tensor(resized, side)


def center_crop_to_tensor(image: Any, crop: int) -> Any:
    """The centre ``crop x crop`` square of a PIL image as a uint8 tensor."""
    import torch

    return torch.from_numpy(center_crop_array(image, crop))


def center_crop_array(image: Any, crop: int) -> np.ndarray:
    """The centre ``crop x crop`` square of a PIL image as a ``3 x crop x
    crop`` uint8 array (a channels-first view of a fresh copy)."""
    width, height = image.size
    left = int((width - crop) / 2)
    top = int((height - crop) / 2)
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.uint8).copy().transpose(2, 0, 1)


def dinov2_image_processor(preprocessing: Preprocessing | None = None) -> Any:
    """Hugging Face's image processor configured like DINOv2's, built locally.

    Used by tests (parity) and the benchmark (FiftyOne's pipeline).
    """
    from transformers import BitImageProcessor

    p = preprocessing or Preprocessing()
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": p.resize_size},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": p.crop_size, "width": p.crop_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(p.mean),
        image_std=list(p.std),
        do_convert_rgb=True,
    )


def fit_to_patches(crop_size: int, patch_size: int, model: str = "the model") -> int:
    """``crop_size`` rounded to a whole number of patches, with a warning.

    A token model (ViT, DINOv3 ConvNeXt) silently drops the pixels past its
    last whole patch, so a crop that is not a multiple of the patch size
    (the total stride, 32, for ConvNeXt) is rounded to the nearest one
    instead of being cropped.

    Args:
        crop_size: the requested crop side in pixels
        patch_size: the model's patch size or total stride
        model: the model's name, for the warning

    Returns:
        the nearest positive multiple of ``patch_size``
    """
    if crop_size % patch_size == 0:
        return crop_size
    rounded = max(patch_size, int(crop_size / patch_size + 0.5) * patch_size)
    warnings.warn(
        "image_size=%d is not a multiple of %s's patch size %d; using %d"
        % (crop_size, model, patch_size, rounded),
        stacklevel=4,  # the caller of load_model
    )
    return rounded
