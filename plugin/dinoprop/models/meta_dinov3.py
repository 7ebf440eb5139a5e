"""Meta's original DINOv3 checkpoints (``dinov3_vit*16_pretrain_*.pth``,
``dinov3_convnext_*_pretrain_*.pth``) mapped into ``transformers``'
``DINOv3ViTModel`` and ``DINOv3ConvNextModel``.

The configuration is read from the tensors' shapes; the key layout is the
one of github.com/facebookresearch/dinov3, as ``transformers``' own
conversion scripts map it.
"""

from __future__ import annotations

import re
from typing import Any

#: Meta DINOv3 ViT block parts and their ``transformers`` names.
_VIT_BLOCK_PARTS = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.up_proj",
    "mlp.fc2": "mlp.down_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.up_proj",
    "mlp.w3": "mlp.down_proj",
}

_VIT_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "storage_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}

#: Keys with no counterpart at inference: the RoPE periods (recomputed from
#: ``rope_theta``), the qkv bias masks (applied while mapping) and the norm of
#: the local crops' class token (training only).
_VIT_DROPPED = re.compile(r"rope_embed\.periods$|\.bias_mask$|^local_cls_norm\.")

_CONVNEXT_PARTS = {
    "dwconv": "depthwise_conv",
    "pwconv1": "pointwise_conv1",
    "pwconv2": "pointwise_conv2",
    "norm": "layer_norm",
}


def is_dinov3_vit(state: dict) -> bool:
    """Whether a Meta state dict is a DINOv3 ViT (RoPE, no ``pos_embed``)."""
    return "cls_token" in state and "rope_embed.periods" in state


def is_dinov3_convnext(state: dict) -> bool:
    """Whether a Meta state dict is a DINOv3 ConvNeXt."""
    return "downsample_layers.0.0.weight" in state


def dinov3_vit_config(state: dict) -> Any:
    """The ``DINOv3ViTConfig`` matching a Meta DINOv3 ViT state dict.

    Heads come from the RoPE periods (``head_dim / 4`` of them), the MLP
    kind and width from its weights (``w1/w2/w3``: SwiGLU), the biases and
    register (storage) tokens from which tensors exist.

    Raises:
        KeyError: if a tensor the architecture needs is missing
        ValueError: if the RoPE periods do not follow ``base ** (4k / head_dim)``
    """
    from transformers import DINOv3ViTConfig

    hidden = state["cls_token"].shape[-1]
    head_dim = 4 * state["rope_embed.periods"].numel()
    gated = "blocks.0.mlp.w1.weight" in state
    mlp_in = "blocks.0.mlp.w1" if gated else "blocks.0.mlp.fc1"
    registers = state.get("storage_tokens")
    return DINOv3ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=_count(state, r"blocks\.(\d+)\.norm1\.weight$"),
        num_attention_heads=hidden // head_dim,
        intermediate_size=state[mlp_in + ".weight"].shape[0],
        patch_size=state["patch_embed.proj.weight"].shape[-1],
        rope_theta=_rope_base(state["rope_embed.periods"], head_dim),
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        query_bias="blocks.0.attn.qkv.bias" in state,
        key_bias=False,
        value_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        mlp_bias=mlp_in + ".bias" in state,
        num_register_tokens=0 if registers is None else registers.shape[1],
        layer_norm_eps=1e-5,
    )


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def _rope_base(periods: Any, head_dim: int) -> float:
    """The RoPE base of Meta's periods ``base ** (4k / head_dim)``, fitted in
    log space (the buffer may be stored in bfloat16)."""
    import torch

    periods = periods.detach().double().reshape(-1)
    if periods.numel() < 2:
        return 100.0  # DINOv3's base; one period says nothing
    exponents = 4 * torch.arange(periods.numel(), dtype=torch.float64) / head_dim
    log_base = float((exponents * periods.log()).sum() / (exponents**2).sum())
    expected = (exponents * log_base).exp()
    if not torch.allclose(expected, periods, rtol=2e-2):
        raise ValueError("its RoPE periods are not of the form base ** (4k / head_dim)")
    return round(float(torch.tensor(log_base).exp()), 2)


def dinov3_vit_state_dict(state: dict) -> dict:
    """Renames a Meta DINOv3 ViT state dict into ``DINOv3ViTModel``'s keys.

    The fused ``qkv`` projection is split into q/k/v; its key bias is
    dropped (Meta masks it to zero, and a bias on the keys shifts every
    attention logit of a query by the same amount, which softmax ignores).
    Storage tokens become register tokens, ``ls1/ls2`` layer scales
    ``layer_scale1/2``, SwiGLU ``w1/w2/w3`` ``gate/up/down_proj``.

    Raises:
        KeyError: for a key this mapping does not know
    """
    out = {}
    for key, value in state.items():
        if _VIT_DROPPED.search(key):
            continue
        block = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if block is not None:
            out.update(_vit_block_entry(block.group(1), block.group(2), value, state))
        elif key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, 1, -1)
        elif key in _VIT_TOP_LEVEL:
            out[_VIT_TOP_LEVEL[key]] = value
        else:
            raise KeyError("unexpected key in DINOv3 checkpoint: %s" % key)
    hidden = state["cls_token"].shape[-1]
    out.setdefault("embeddings.register_tokens", state["cls_token"].new_zeros(1, 0, hidden))
    return out


def _vit_block_entry(index: str, part: str, value: Any, state: dict) -> dict:
    prefix = "model.layer.%s." % index
    if part == "attn.qkv.weight":
        q, k, v = value.chunk(3, dim=0)
        return {prefix + "attention.%s_proj.weight" % n: t for n, t in zip("qkv", (q, k, v))}
    if part == "attn.qkv.bias":
        mask = state.get("blocks.%s.attn.qkv.bias_mask" % index)
        q, _, v = (value if mask is None else value * mask).chunk(3, dim=0)
        return {prefix + "attention.q_proj.bias": q, prefix + "attention.v_proj.bias": v}
    name, _, kind = part.rpartition(".")
    if part in _VIT_BLOCK_PARTS:  # layer scales: "ls1.gamma"
        return {prefix + _VIT_BLOCK_PARTS[part]: value}
    if name in _VIT_BLOCK_PARTS and kind in ("weight", "bias"):
        return {prefix + _VIT_BLOCK_PARTS[name] + "." + kind: value}
    raise KeyError("unexpected key in DINOv3 checkpoint: blocks.%s.%s" % (index, part))


def dinov3_convnext_config(state: dict) -> Any:
    """The ``DINOv3ConvNextConfig`` matching a Meta DINOv3 ConvNeXt state dict.

    Stage widths come from the downsampling convolutions, depths from the
    blocks each stage holds.
    """
    from transformers import DINOv3ConvNextConfig

    stages = _count(state, r"downsample_layers\.(\d+)\.")
    widths = [state["downsample_layers.0.0.weight"].shape[0]] + [
        state["downsample_layers.%d.1.weight" % i].shape[0] for i in range(1, stages)
    ]
    depths = [_count(state, r"stages\.%d\.(\d+)\.gamma$" % i) for i in range(stages)]
    return DINOv3ConvNextConfig(hidden_sizes=widths, depths=depths)


def dinov3_convnext_state_dict(state: dict) -> dict:
    """Renames a Meta DINOv3 ConvNeXt state dict into ``DINOv3ConvNextModel``'s.

    ``downsample_layers.i.j`` become ``stages.i.downsample_layers.j``, block
    ``stages.i.j`` ``stages.i.layers.j`` (``dwconv``, ``pwconv1/2``, ``norm``
    renamed), the final ``norm`` ``layer_norm``; Meta's extra per-stage output
    norms (``norms.*``, unused by the final features) are dropped.

    Raises:
        KeyError: for a key this mapping does not know
    """
    out = {}
    for key, value in state.items():
        if key.startswith("norms."):
            continue
        down = re.match(r"downsample_layers\.(\d+)\.(\d+)\.(weight|bias)$", key)
        block = re.match(r"stages\.(\d+)\.(\d+)\.(?:(\w+)\.)?(weight|bias|gamma)$", key)
        if down is not None:
            out["model.stages.%s.downsample_layers.%s.%s" % down.groups()] = value
        elif block is not None and (block.group(3) in _CONVNEXT_PARTS or block.group(4) == "gamma"):
            stage, index, part, kind = block.groups()
            part = "" if part is None else _CONVNEXT_PARTS[part] + "."
            out["model.stages.%s.layers.%s.%s%s" % (stage, index, part, kind)] = value
        elif key in ("norm.weight", "norm.bias"):
            out["layer_norm." + key.split(".")[1]] = value
        else:
            raise KeyError("unexpected key in DINOv3 ConvNeXt checkpoint: %s" % key)
    return out
