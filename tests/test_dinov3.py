"""DINOv3: built-in names, the gated-repo error, token layouts and pooling,
patch tokens, satellite preprocessing, patch-size rounding, Meta checkpoint
conversion (checked against a forward pass written here from Meta's layout)
and loading large models in their compute dtype."""

import math
import re

import numpy as np
import pytest
import torch

from dinoprop.core import DinopropError
from dinoprop.models import (
    HF_MODEL_IDS,
    IMAGENET_MEAN,
    MODEL_CHOICES,
    SATELLITE_MEAN,
    SATELLITE_STD,
    load_model,
    model_label,
)
from dinoprop.models import loading

VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)
CONVNEXT = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1])


def _images(n, side=64, seed=0, height=None):
    rng = np.random.default_rng(seed)
    shape = (n, 3, height or side, side)
    return torch.from_numpy(rng.integers(0, 256, size=shape, dtype=np.uint8))


def _normalized(batch, preprocessing):
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (batch.float() / 255 - mean) / std


def _randomize(module):
    """Random layer scales and biases, so a wrong mapping cannot hide."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lambda1" in name or name.endswith("gamma"):
                p.uniform_(0.2, 1.0)
            elif name.endswith("bias") or "register_tokens" in name:
                p.normal_(0, 0.2)
    return module.eval()


def _dinov3_vit(gated=False, registers=4, **overrides):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(3)
    config = DINOv3ViTConfig(
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        num_register_tokens=registers,
        **{**VIT, **overrides},
    )
    return _randomize(DINOv3ViTModel(config))


def _dinov3_convnext():
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    torch.manual_seed(4)
    return _randomize(DINOv3ConvNextModel(DINOv3ConvNextConfig(**CONVNEXT)))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov3") / "dinov3-vit-tiny"
    _dinov3_vit().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def convnext_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov3") / "dinov3-convnext-tiny"
    _dinov3_convnext().save_pretrained(path)
    return path


# --- names ------------------------------------------------------------------


def test_builtin_names_cover_every_dinov3_checkpoint():
    for vit in ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16"):
        assert HF_MODEL_IDS["dinov3-" + vit] == "facebook/dinov3-%s-pretrain-lvd1689m" % vit
    for size in ("tiny", "small", "base", "large"):
        assert (
            HF_MODEL_IDS["dinov3-convnext-" + size]
            == "facebook/dinov3-convnext-%s-pretrain-lvd1689m" % size
        )
    assert HF_MODEL_IDS["dinov3-vitl16-sat"] == "facebook/dinov3-vitl16-pretrain-sat493m"
    assert HF_MODEL_IDS["dinov3-vit7b16-sat"] == "facebook/dinov3-vit7b16-pretrain-sat493m"
    assert set(HF_MODEL_IDS) <= set(MODEL_CHOICES)
    assert model_label("dinov3-vits16") == "dinov3-vits16 (21M params, gated: DINOv3 licence)"
    assert model_label("dinov3-vit7b16-sat").startswith("dinov3-vit7b16-sat (6.7B params")
    assert "gated" not in model_label("dinov2-small")


def test_gated_repo_refusal_says_accept_the_licence(monkeypatch):
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    def refuse(repo_id, filename=None, *args, **kwargs):
        """The hub's answer to a download without an accepted licence."""
        url = "https://huggingface.co/%s/resolve/main/%s" % (repo_id, filename or "config.json")
        hf_raise_for_status(httpx2.Response(
            401, headers={"X-Error-Code": "GatedRepo"}, request=httpx2.Request("GET", url)))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_check_hub_reachable", lambda name, source: None)
    monkeypatch.setattr("transformers.utils.hub.hf_hub_download", refuse)
    monkeypatch.setattr("transformers.utils.hub.snapshot_download", refuse)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(DinopropError) as info:
        load_model("dinov3-vits16", device="cpu")
    message = str(info.value)
    assert "gated repo" in message  # the hub's refusal, as transformers reports it
    assert "facebook/dinov3-vits16-pretrain-lvd1689m" in message
    assert "accept it" in message and "HF_TOKEN" in message and "local directory" in message


# --- token layout and pooling -----------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
def test_vit_pooling_skips_the_four_registers(tmp_path, gated):
    reference = _dinov3_vit(gated=gated)
    reference.save_pretrained(tmp_path / "vit")
    model = load_model(str(tmp_path / "vit"), device="cpu", precision="fp32")
    assert (model.kind, model.patch_size, model.num_prefix_tokens) == ("vit", 16, 5)
    images = _images(2)
    with torch.no_grad():
        out = reference(pixel_values=_normalized(images, model.preprocessing))
    tokens = out.last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 16  # CLS, registers, 4 x 4 patches
    cls = model.embed(images, pooling="cls", normalize=False)
    mean = model.embed(images, pooling="mean", normalize=False)
    np.testing.assert_allclose(cls, out.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(mean, tokens[:, 5:].mean(1).numpy(), atol=1e-4)
    np.testing.assert_allclose(
        model.embed(images, pooling="cls+mean", normalize=False),
        np.concatenate([cls, mean], 1),
        atol=1e-5,
    )


def test_convnext_pooled_token_is_cls_and_left_out_of_the_mean(convnext_dir):
    from transformers import DINOv3ConvNextModel

    model = load_model(str(convnext_dir), device="cpu", precision="fp32")
    assert (model.kind, model.hidden_dim, model.patch_size) == ("convnext", 32, 32)
    images = _images(2)
    reference = DINOv3ConvNextModel.from_pretrained(convnext_dir).eval()
    with torch.no_grad():
        out = reference(pixel_values=_normalized(images, model.preprocessing))
    tokens = out.last_hidden_state  # pooled token + 2 x 2 stride-32 tokens
    assert tokens.shape[1] == 1 + 4
    cls = model.embed(images, pooling="cls", normalize=False)
    mean = model.embed(images, pooling="mean", normalize=False)
    np.testing.assert_allclose(cls, out.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(mean, tokens[:, 1:].mean(1).numpy(), atol=1e-4)
    assert not np.allclose(mean, tokens.mean(1).numpy(), atol=1e-4)  # pooled token out
    assert model.output_dim("cls+mean") == 64


def test_patch_tokens_lie_on_the_image_grid(vit_dir, tiny_dinov2_dir, convnext_dir):
    from transformers import DINOv3ViTModel

    images = _images(2, side=64, height=48)  # 3 x 4 patches of 16
    model = load_model(str(vit_dir), device="cpu", precision="fp32")
    grid = model.patch_tokens(images)
    assert grid.shape == (2, 3, 4, 64) and grid.dtype == torch.float32
    reference = DINOv3ViTModel.from_pretrained(vit_dir).eval()
    with torch.no_grad():
        tokens = reference(pixel_values=_normalized(images, model.preprocessing)).last_hidden_state
    row, col = 2, 1
    torch.testing.assert_close(grid[:, row, col], tokens[:, 5 + row * 4 + col], atol=1e-4, rtol=0)

    dinov2 = load_model(tiny_dinov2_dir, device="cpu", precision="fp32")
    assert dinov2.patch_tokens(_images(1, side=56, height=28)).shape == (1, 2, 4, 32)
    convnext = load_model(str(convnext_dir), device="cpu", precision="fp32")
    assert convnext.patch_tokens(_images(1, side=96, height=64)).shape == (1, 2, 3, 32)


def test_boxes_pool_the_patch_tokens_under_them(vit_dir):
    model = load_model(str(vit_dir), device="cpu", precision="fp32")
    images = _images(2, side=64, height=48, seed=9)  # 3 x 4 tokens of 16 px
    grid = model.patch_tokens(images)
    boxes = [
        [[0.0, 1 / 3, 0.5, 2 / 3], [0.8, 0.7, 0.05, 0.05]],  # 2 x 2 tokens; inside token (2, 3)
        [[0.0, 0.0, 1.0, 1.0]],  # the whole image
    ]
    vectors = model.embed_boxes(images, boxes, normalize=False)
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[0], grid[0, 1:3, 0:2].mean((0, 1)).numpy(), atol=1e-5)
    np.testing.assert_allclose(vectors[1], grid[0, 2, 3].numpy(), atol=1e-5)
    np.testing.assert_allclose(
        vectors[2], model.embed(images[1:], pooling="mean", normalize=False)[0], atol=1e-4
    )
    unit = model.embed_boxes(images, boxes)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)

    mirrored = [[[1 - x - w, y, w, h] for x, y, w, h in image_boxes] for image_boxes in boxes]
    averaged = model.embed_boxes(images, boxes, normalize=False, flip_average=True)
    np.testing.assert_allclose(
        model.embed_boxes(images.flip(-1), mirrored, normalize=False, flip_average=True),
        averaged, atol=1e-5,
    )
    assert np.abs(averaged - vectors).max() > 1e-3
    assert model.embed_boxes(images, [[], []]).shape == (0, 64)


# --- preprocessing ------------------------------------------------------------


def test_satellite_checkpoints_use_their_own_normalisation(tmp_path):
    from transformers import DINOv3ViTModel

    satellite = tmp_path / "models--facebook--dinov3-vitl16-pretrain-sat493m"
    _dinov3_vit().save_pretrained(satellite)
    model = load_model(str(satellite), device="cpu", precision="fp32")
    assert (model.preprocessing.mean, model.preprocessing.std) == (SATELLITE_MEAN, SATELLITE_STD)
    assert model.preprocessing.crop_size == 224 and model.preprocessing.resize_size == 256
    images = _images(1)
    reference = DINOv3ViTModel.from_pretrained(satellite).eval()
    with torch.no_grad():
        expected = reference(pixel_values=_normalized(images, model.preprocessing)).pooler_output
    np.testing.assert_allclose(
        model.embed(images, normalize=False), expected.numpy(), atol=1e-4
    )
    assert load_model(str(satellite), device="cpu").fingerprint != load_model(
        _copy_tree(satellite, tmp_path / "plain"), device="cpu"
    ).fingerprint


def _copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_whole_image_preprocessing_keeps_every_pixel_in_view():
    from PIL import Image

    from dinoprop.models import Preprocessing, preprocess_whole_image

    pixels = np.zeros((40, 120, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)  # a strip a centre crop would cut off
    pixels[:, 10:] = (0, 0, 255)
    tensor = preprocess_whole_image(Image.fromarray(pixels), Preprocessing.for_size(96))
    assert tensor.shape == (3, 96, 96) and tensor.dtype == torch.uint8
    assert tensor[0, :, :6].float().mean() > 200 and tensor[2, :, 10:].float().mean() > 200


def test_lvd_checkpoints_keep_imagenet_normalisation(vit_dir):
    assert load_model(str(vit_dir), device="cpu").preprocessing.mean == IMAGENET_MEAN


def test_image_size_is_rounded_to_whole_patches_with_a_warning(vit_dir, convnext_dir, tiny_dinov2_dir):
    with pytest.warns(UserWarning, match="image_size=200 is not a multiple .* 16; using 208"):
        model = load_model(str(vit_dir), device="cpu", image_size=200)
    assert model.preprocessing.crop_size == 208
    assert model.preprocessing.resize_size == round(208 * 256 / 224)
    with pytest.warns(UserWarning, match="32; using 96"):
        assert load_model(str(convnext_dir), device="cpu", image_size=100).preprocessing.crop_size == 96
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(tiny_dinov2_dir, device="cpu", image_size=98).preprocessing.crop_size == 98


# --- Meta checkpoints ---------------------------------------------------------


def _to_meta_vit(hf):
    """A transformers DINOv3 ViT state dict written in Meta's layout (with a
    masked key bias, RoPE periods and a local-crop norm, as Meta saves)."""
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    state = hf.state_dict()
    meta = {
        "cls_token": state["embeddings.cls_token"],
        "mask_token": state["embeddings.mask_token"].reshape(1, -1),
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": 100.0 ** (4 * torch.arange(head_dim // 4) / head_dim),
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
        "local_cls_norm.weight": torch.ones(hf.config.hidden_size),
        "local_cls_norm.bias": torch.zeros(hf.config.hidden_size),
    }
    if hf.config.num_register_tokens:
        meta["storage_tokens"] = state["embeddings.register_tokens"]
    mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
    if not hf.config.use_gated_mlp:
        mlp = {"fc1": "up_proj", "fc2": "down_proj"}
    for i in range(hf.config.num_hidden_layers):
        src, dst = "model.layer.%d." % i, "blocks.%d." % i
        attn = src + "attention.%s_proj."
        meta[dst + "attn.qkv.weight"] = torch.cat([state[attn % p + "weight"] for p in "qkv"])
        if hf.config.query_bias:
            q, v = state[attn % "q" + "bias"], state[attn % "v" + "bias"]
            meta[dst + "attn.qkv.bias"] = torch.cat([q, torch.randn_like(q), v])
            meta[dst + "attn.qkv.bias_mask"] = torch.cat([torch.ones_like(q), torch.zeros_like(q), torch.ones_like(v)])
        for kind in ("weight", "bias"):
            meta[dst + "attn.proj." + kind] = state[attn % "o" + kind]
            for norm in ("norm1", "norm2"):
                meta[dst + norm + "." + kind] = state[src + norm + "." + kind]
            for theirs, ours in mlp.items():
                meta[dst + "mlp.%s.%s" % (theirs, kind)] = state[src + "mlp.%s.%s" % (ours, kind)]
        meta[dst + "ls1.gamma"] = state[src + "layer_scale1.lambda1"]
        meta[dst + "ls2.gamma"] = state[src + "layer_scale2.lambda1"]
    return meta


def _meta_vit_forward(meta, pixels, heads, gated, eps=1e-5):
    """Meta's DINOv3 ViT forward, written from its checkpoint's tensors only:
    patch embedding, class + storage tokens, RoPE on the patch tokens (from
    the stored periods), pre-norm blocks with layer scale, final norm."""
    F = torch.nn.functional
    x = F.conv2d(pixels, meta["patch_embed.proj.weight"], meta["patch_embed.proj.bias"], stride=16)
    rows, cols = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    batch, width = len(x), x.shape[-1]
    prefix = [meta["cls_token"].expand(batch, -1, -1)]
    if "storage_tokens" in meta:
        prefix.append(meta["storage_tokens"].expand(batch, -1, -1))
    x = torch.cat(prefix + [x], dim=1)
    n_prefix = x.shape[1] - rows * cols
    # RoPE: patch centres in [-1, 1], angle 2 pi coord / period, per (y, x)
    ys = (torch.arange(rows) + 0.5) / rows * 2 - 1
    xs = (torch.arange(cols) + 0.5) / cols * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    angles = 2 * math.pi * coords[:, :, None] / meta["rope_embed.periods"][None, None, :]
    angles = angles.flatten(1).repeat(1, 2)
    sin, cos = angles.sin(), angles.cos()

    def rope(t):
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        patches = t[:, :, n_prefix:] * cos + rotated[:, :, n_prefix:] * sin
        return torch.cat([t[:, :, :n_prefix], patches], dim=2)

    blocks = sorted({int(k.split(".")[1]) for k in meta if k.startswith("blocks.")})
    for i in blocks:
        w = {k[len("blocks.%d." % i):]: v for k, v in meta.items() if k.startswith("blocks.%d." % i)}
        h = F.layer_norm(x, (width,), w["norm1.weight"], w["norm1.bias"], eps)
        bias = w.get("attn.qkv.bias")
        if bias is not None:
            bias = bias * w["attn.qkv.bias_mask"]
        qkv = F.linear(h, w["attn.qkv.weight"], bias).reshape(batch, -1, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (rope(q) @ rope(k).transpose(-2, -1) / math.sqrt(width // heads)).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, -1, width)
        x = x + w["ls1.gamma"] * F.linear(h, w["attn.proj.weight"], w["attn.proj.bias"])
        h = F.layer_norm(x, (width,), w["norm2.weight"], w["norm2.bias"], eps)
        if gated:
            h = F.silu(F.linear(h, w["mlp.w1.weight"], w["mlp.w1.bias"])) * F.linear(
                h, w["mlp.w2.weight"], w["mlp.w2.bias"]
            )
            h = F.linear(h, w["mlp.w3.weight"], w["mlp.w3.bias"])
        else:
            h = F.gelu(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"]))
            h = F.linear(h, w["mlp.fc2.weight"], w["mlp.fc2.bias"])
        x = x + w["ls2.gamma"] * h
    return F.layer_norm(x, (width,), meta["norm.weight"], meta["norm.bias"], eps)


@pytest.mark.parametrize(
    "variant", ["plain", "gated", "no-registers", "no-qkv-bias"]
)
def test_meta_dinov3_vit_checkpoint_matches_an_independent_forward(tmp_path, variant):
    overrides = {"no-qkv-bias": dict(query_bias=False, value_bias=False)}.get(variant, {})
    hf = _dinov3_vit(
        gated=variant == "gated",
        registers=0 if variant == "no-registers" else 4,
        **overrides,
    )
    meta = _to_meta_vit(hf)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-00000000.pth"
    torch.save(meta, path)

    model = load_model(str(path), device="cpu", precision="fp32")
    config = model.module.config
    assert (config.num_attention_heads, config.intermediate_size, config.use_gated_mlp) == (
        2, 96, variant == "gated")
    assert model.num_prefix_tokens == (1 if variant == "no-registers" else 5)
    images = _images(2, seed=7)
    pixels = _normalized(images, model.preprocessing)
    with torch.no_grad():
        independent = _meta_vit_forward(meta, pixels, heads=2, gated=variant == "gated")
        original = hf(pixel_values=pixels).last_hidden_state
    tokens = model.forward_features(images)
    assert independent.shape == tokens.shape
    torch.testing.assert_close(tokens, independent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokens, original, atol=1e-4, rtol=1e-4)


def _to_meta_convnext(hf):
    """A transformers DINOv3 ConvNeXt state dict in Meta's layout."""
    names = {"depthwise_conv": "dwconv", "pointwise_conv1": "pwconv1",
             "pointwise_conv2": "pwconv2", "layer_norm": "norm"}
    meta = {"norms.3.weight": torch.ones(32), "norms.3.bias": torch.zeros(32)}
    for key, value in hf.state_dict().items():
        key = key.replace("model.stages.", "stages.")
        key = key.replace("layer_norm.", "norm.") if key.startswith("layer_norm.") else key
        key = re.sub(r"stages\.(\d+)\.downsample_layers\.", r"downsample_layers.\1.", key)
        key = key.replace(".layers.", ".")
        for ours, theirs in names.items():
            key = key.replace("." + ours + ".", "." + theirs + ".")
        meta[key] = value
    return meta


def test_meta_dinov3_convnext_checkpoint_maps_into_transformers(tmp_path):
    hf = _dinov3_convnext()
    meta = _to_meta_convnext(hf)
    assert "downsample_layers.1.1.weight" in meta and "stages.2.0.dwconv.weight" in meta
    path = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-00000000.pth"
    torch.save(meta, path)
    model = load_model(str(path), device="cpu", precision="fp32")
    assert model.kind == "convnext" and model.module.config.depths == CONVNEXT["depths"]
    images = _images(2, seed=8)
    with torch.no_grad():
        expected = hf(pixel_values=_normalized(images, model.preprocessing)).last_hidden_state
    torch.testing.assert_close(model.forward_features(images), expected, atol=1e-4, rtol=1e-4)


def test_meta_checkpoint_with_unknown_tensors_is_refused_clearly(tmp_path):
    meta = _to_meta_vit(_dinov3_vit())
    meta["blocks.0.attn.extra.weight"] = torch.zeros(2)
    path = tmp_path / "dinov3_vits16_odd.pth"
    torch.save(meta, path)
    with pytest.raises(DinopropError, match="blocks.0.attn.extra.weight"):
        load_model(str(path), device="cpu")
    del meta["blocks.0.attn.extra.weight"], meta["rope_embed.periods"]
    torch.save(meta, path)
    with pytest.raises(DinopropError, match="not a Meta DINOv2/DINOv3 checkpoint"):
        load_model(str(path), device="cpu")


# --- large models ---------------------------------------------------------------


def test_large_models_load_straight_in_the_compute_dtype(tmp_path, vit_dir, monkeypatch):
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(_to_meta_vit(_dinov3_vit()), path)
    small = loading._load_meta_checkpoint(str(path), torch.bfloat16)[0]
    assert small.dtype == torch.float32  # small: cast later, fingerprint stable
    monkeypatch.setattr(loading, "_DIRECT_LOAD_BYTES", 0)  # every model is "large"
    for module in (
        loading._load_meta_checkpoint(str(path), torch.bfloat16)[0],
        loading._load_transformers(str(vit_dir), False, torch.bfloat16)[0],
    ):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    from transformers import DINOv3ViTConfig

    seven_b = DINOv3ViTConfig(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                              intermediate_size=8192, use_gated_mlp=True)
    assert 6.0e9 < loading._config_params(seven_b) < 7.5e9


def test_gpu_batch_size_fits_the_memory_the_weights_leave(vit_dir, monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    from dinoprop.models import Preprocessing

    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 2**40))
    loaded = load_model(str(vit_dir), device="cpu")
    assert loaded.default_batch_size() == 16  # CPUs

    def on_gpu(hidden, mlp, heads, crop=224):
        config = SimpleNamespace(intermediate_size=mlp, num_attention_heads=heads)
        return dataclasses.replace(
            loaded, device=torch.device("cuda"), dtype=torch.bfloat16, hidden_dim=hidden,
            module=SimpleNamespace(config=config), preprocessing=Preprocessing.for_size(crop))

    vit_s, vit_7b = on_gpu(384, 1536, 6), on_gpu(4096, 8192, 32)
    free["bytes"] = 120 * 2**30
    assert vit_s.default_batch_size() == vit_7b.default_batch_size() == 512  # H100/H200
    free["bytes"] = 10 * 2**30  # a 24 GB card holding the 7B's 13 GB of weights
    for model in (vit_s, vit_7b, on_gpu(1024, 4096, 16, crop=518)):
        batch = model.default_batch_size()
        assert batch & (batch - 1) == 0 and 8 <= batch <= 512
        assert batch * model.activation_bytes_per_image() <= 0.5 * free["bytes"]
        assert 2 * batch * model.activation_bytes_per_image() > 0.5 * free["bytes"] or batch == 512
    assert vit_7b.default_batch_size() < vit_s.default_batch_size()
    free["bytes"] = 2**20
    assert vit_7b.default_batch_size() == 8  # never below 8
