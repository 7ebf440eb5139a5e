"""Meta's original checkpoints mapped into ``transformers``' layout: DINOv2
here, DINOv3 in :mod:`~dinoprop.models.meta_dinov3`."""

from __future__ import annotations

import re
from typing import Any

from dinoprop.models import meta_dinov3


def convert_meta_checkpoint(state: dict) -> tuple:
    """The ``transformers`` class, config and state dict of a Meta checkpoint.

    Recognises DINOv2 ViTs (learned ``pos_embed``, with or without
    registers), DINOv3 ViTs (RoPE) and DINOv3 ConvNeXts by their tensors.

    Args:
        state: the checkpoint's ``{name: tensor}`` mapping, prefixes removed

    Returns:
        ``(model_class, config, state_dict)``

    Raises:
        KeyError, ValueError: if the tensors fit none of these architectures
    """
    import transformers

    if meta_dinov3.is_dinov3_convnext(state):
        return (
            transformers.DINOv3ConvNextModel,
            meta_dinov3.dinov3_convnext_config(state),
            meta_dinov3.dinov3_convnext_state_dict(state),
        )
    if meta_dinov3.is_dinov3_vit(state):
        return (
            transformers.DINOv3ViTModel,
            meta_dinov3.dinov3_vit_config(state),
            meta_dinov3.dinov3_vit_state_dict(state),
        )
    if "cls_token" not in state or "pos_embed" not in state:
        raise KeyError(
            "no cls_token and pos_embed (DINOv2), rope_embed.periods (DINOv3 "
            "ViT) or downsample_layers (DINOv3 ConvNeXt)"
        )
    registers = "register_tokens" in state
    model_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    return model_cls, meta_checkpoint_config(state), meta_to_transformers_state_dict(state)


_META_BLOCK_KEYS = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w3": "mlp.down_proj",
}


def meta_to_transformers_state_dict(state: dict) -> dict:
    """Renames a Meta DINOv2 state dict into ``transformers``' Dinov2 layout.

    Handles fused ``qkv`` projections, SwiGLU MLPs (ViT-g), register tokens
    and chunked blocks (``blocks.<chunk>.<i>``).

    Args:
        state: the checkpoint's ``{name: tensor}`` mapping

    Returns:
        the equivalent ``transformers`` state dict
    """
    out = {}
    for key, value in state.items():
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        match = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if match is None:
            out.update(_map_meta_top_level(key, value))
            continue
        index, part, kind = match.groups()
        prefix = "encoder.layer.%s." % index
        if part == "attn.qkv":
            for proj, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[prefix + "attention.%s_proj.%s" % (proj, kind)] = chunk
        elif part == "mlp.w12":
            gate, up = value.chunk(2, dim=0)
            out[prefix + "mlp.gate_proj." + kind] = gate
            out[prefix + "mlp.up_proj." + kind] = up
        elif part + "." + kind in _META_BLOCK_KEYS:
            out[prefix + _META_BLOCK_KEYS[part + "." + kind]] = value
        elif part in _META_BLOCK_KEYS:
            out[prefix + _META_BLOCK_KEYS[part] + "." + kind] = value
        else:
            raise KeyError("unexpected key in DINOv2 checkpoint: %s" % key)
    return out


def _map_meta_top_level(key: str, value: Any) -> dict:
    names = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    if key not in names:
        raise KeyError("unexpected key in DINOv2 checkpoint: %s" % key)
    if key == "mask_token" and value.dim() == 3:
        value = value[0]
    return {names[key]: value}


def meta_checkpoint_config(state: dict) -> Any:
    """The ``transformers`` config matching a Meta DINOv2 state dict."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    blocks = {
        int(m.group(1))
        for k in state
        if (m := re.match(r"blocks\.(?:\d+\.)?(\d+)\.norm1\.weight$", k))
    }
    swiglu = any(k.endswith("mlp.w12.weight") for k in state)
    kwargs = dict(
        hidden_size=hidden,
        num_hidden_layers=len(blocks),
        num_attention_heads=hidden // 64 if hidden >= 64 else 1,
        patch_size=patch,
        image_size=grid * patch,
        mlp_ratio=4,
        use_swiglu_ffn=swiglu,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )
    if "register_tokens" in state:
        return Dinov2WithRegistersConfig(
            num_register_tokens=state["register_tokens"].shape[1], **kwargs
        )
    return Dinov2Config(**kwargs)
