"""Model loading: names, local dirs, Meta checkpoints, safety, preprocessing."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoprop.core import DinopropError
from dinoprop.models import (
    EFFICIENTNET_LITE0,
    HF_MODEL_IDS,
    MODEL_CHOICES,
    Preprocessing,
    dinov2_image_processor,
    load_model,
    open_image,
    preprocess_image,
    resolve_device,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56)


def _random_images(n, seed=0, size=(80, 64)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def _batch(images, preprocessing):
    return torch.stack([preprocess_image(im, preprocessing) for im in images])


def _normalized(batch, preprocessing):
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (batch.float() / 255 - mean) / std


def test_builtin_names_cover_every_dinov2_variant():
    for size in ("small", "base", "large", "giant"):
        assert HF_MODEL_IDS["dinov2-%s" % size] == "facebook/dinov2-%s" % size
        assert (
            HF_MODEL_IDS["dinov2-%s-reg" % size]
            == "facebook/dinov2-with-registers-%s" % size
        )
    assert MODEL_CHOICES[0] == "dinov2-small"
    assert EFFICIENTNET_LITE0 in MODEL_CHOICES


def test_local_dir_pooling_matches_transformers(tiny_dinov2_dir):
    from transformers import Dinov2Model

    model = load_model(tiny_dinov2_dir, device="cpu", precision="fp32")
    assert (model.kind, model.hidden_dim, model.patch_size) == ("vit", 32, 14)
    assert model.num_prefix_tokens == 1
    images = _batch(_random_images(3), model.preprocessing)
    reference = Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()
    with torch.no_grad():
        tokens = reference(pixel_values=_normalized(images, model.preprocessing))
    hidden = tokens.last_hidden_state.numpy()

    cls = model.embed(images, pooling="cls", normalize=False)
    mean = model.embed(images, pooling="mean", normalize=False)
    both = model.embed(images, pooling="cls+mean", normalize=False)
    np.testing.assert_allclose(cls, tokens.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(mean, hidden[:, 1:].mean(1), atol=1e-4)
    np.testing.assert_allclose(both, np.concatenate([cls, mean], 1), atol=1e-5)
    assert model.output_dim("cls+mean") == 64 and both.dtype == np.float32

    unit = model.embed(images)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_flip_average_gives_a_mirror_image_the_same_vector(tiny_dinov2_dir):
    model = load_model(tiny_dinov2_dir, device="cpu", precision="fp32")
    images = _batch(_random_images(3), model.preprocessing)
    mirrored = images.flip(-1)
    options = dict(pooling="cls+mean", normalize=False)
    plain = model.embed(images, **options)
    averaged = model.embed(images, flip_average=True, **options)
    np.testing.assert_allclose(
        averaged, (plain + model.embed(mirrored, **options)) / 2, atol=1e-5
    )
    np.testing.assert_allclose(
        model.embed(mirrored, flip_average=True, **options), averaged, atol=1e-5
    )
    assert np.abs(plain - model.embed(mirrored, **options)).max() > 1e-2
    unit = model.embed(images, flip_average=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_registers_are_left_out_of_mean_pooling(session_dir):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(1)
    config = Dinov2WithRegistersConfig(patch_size=14, num_register_tokens=4, **TINY)
    path = session_dir / "tiny-dinov2-reg"
    reference = Dinov2WithRegistersModel(config).eval()
    reference.save_pretrained(path)
    model = load_model(str(path), device="cpu", precision="fp32")
    assert model.num_prefix_tokens == 5
    images = _batch(_random_images(2), model.preprocessing)
    with torch.no_grad():
        hidden = reference(pixel_values=_normalized(images, model.preprocessing))
    expected = hidden.last_hidden_state[:, 5:].mean(1).numpy()
    np.testing.assert_allclose(
        model.embed(images, pooling="mean", normalize=False), expected, atol=1e-4
    )


def _to_meta_state_dict(hf_state, swiglu):
    """Writes a transformers Dinov2 state dict with Meta's original names."""
    meta = {
        "cls_token": hf_state["embeddings.cls_token"],
        "mask_token": hf_state["embeddings.mask_token"],
        "pos_embed": hf_state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_state["layernorm.weight"],
        "norm.bias": hf_state["layernorm.bias"],
    }
    if "embeddings.register_tokens" in hf_state:
        meta["register_tokens"] = hf_state["embeddings.register_tokens"]
    layers = {int(k.split(".")[2]) for k in hf_state if k.startswith("encoder.layer.")}
    for i in layers:
        src, dst = "encoder.layer.%d." % i, "blocks.%d." % i
        for kind in ("weight", "bias"):
            meta[dst + "attn.qkv." + kind] = torch.cat(
                [hf_state[src + "attention.%s_proj.%s" % (p, kind)] for p in "qkv"]
            )
            meta[dst + "attn.proj." + kind] = hf_state[src + "attention.o_proj." + kind]
            for norm in ("norm1", "norm2"):
                meta[dst + norm + "." + kind] = hf_state[src + norm + "." + kind]
            if swiglu:
                meta[dst + "mlp.w12." + kind] = torch.cat(
                    [hf_state[src + "mlp.gate_proj." + kind], hf_state[src + "mlp.up_proj." + kind]]
                )
                meta[dst + "mlp.w3." + kind] = hf_state[src + "mlp.down_proj." + kind]
            else:
                for fc in ("fc1", "fc2"):
                    meta[dst + "mlp.%s.%s" % (fc, kind)] = hf_state[src + "mlp.%s.%s" % (fc, kind)]
        meta[dst + "ls1.gamma"] = hf_state[src + "layer_scale1.lambda1"]
        meta[dst + "ls2.gamma"] = hf_state[src + "layer_scale2.lambda1"]
    return meta


@pytest.mark.parametrize("variant", ["plain", "swiglu", "registers"])
def test_meta_checkpoint_maps_into_transformers(session_dir, variant):
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    torch.manual_seed(2)
    # 64-wide heads, like every released DINOv2 (the checkpoint cannot say)
    kwargs = dict(TINY, hidden_size=64, num_attention_heads=1, patch_size=14)
    if variant == "registers":
        reference = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs)
        )
    else:
        reference = Dinov2Model(Dinov2Config(use_swiglu_ffn=variant == "swiglu", **kwargs))
    reference.eval()
    with torch.no_grad():  # random layer scales, so a wrong mapping shows
        for name, p in reference.named_parameters():
            if "lambda1" in name:
                p.uniform_(0.1, 1.0)
    path = session_dir / ("dinov2_vits14_%s_pretrain.pth" % variant)
    torch.save(_to_meta_state_dict(reference.state_dict(), variant == "swiglu"), path)

    model = load_model(str(path), device="cpu", precision="fp32")
    assert model.hidden_dim == 64 and model.patch_size == 14
    assert model.num_prefix_tokens == (5 if variant == "registers" else 1)
    images = _batch(_random_images(2, seed=3), model.preprocessing)
    with torch.no_grad():
        expected = reference(pixel_values=_normalized(images, model.preprocessing))
    for pooling in ("cls", "mean"):
        got = model.embed(images, pooling=pooling, normalize=False)
        hidden = expected.last_hidden_state
        want = hidden[:, 0] if pooling == "cls" else hidden[:, model.num_prefix_tokens :].mean(1)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


class _RunsCode:
    """Unpickling this object runs os.mkdir (a harmless, visible side effect)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_checkpoint_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "payload": _RunsCode(marker)}, path)
    with pytest.raises(DinopropError, match="Refusing to load checkpoint"):
        load_model(str(path), device="cpu")
    assert not marker.exists()


def test_model_folder_with_pickled_weights_is_refused_clearly(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    marker = tmp_path / "code-ran"
    model_dir = tmp_path / "pickled-model"
    Dinov2Config(**TINY).save_pretrained(model_dir)
    state = Dinov2Model(Dinov2Config(**TINY)).state_dict()
    torch.save({**state, "payload": _RunsCode(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(DinopropError, match="Refusing to load checkpoint .*pytorch_model.bin"):
        load_model(str(model_dir), device="cpu")
    assert not marker.exists()


def test_remote_code_is_not_run_unless_trusted(tmp_path):
    marker = tmp_path / "remote-code-ran"
    model_dir = tmp_path / "remote-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        '{"model_type": "dinoprop-evil", "auto_map": {"AutoConfig": '
        '"evil.EvilConfig", "AutoModel": "evil.EvilModel"}}'
    )
    (model_dir / "evil.py").write_text(
        "import os\nos.mkdir(%r)\n" % str(marker)
    )
    with pytest.raises(DinopropError, match="trust_remote_code=True"):
        load_model(str(model_dir), device="cpu")
    assert not marker.exists()


def test_unavailable_model_fails_fast_with_ways_out(monkeypatch):
    start = time.perf_counter()
    with pytest.raises(DinopropError) as info:
        load_model("dinov2-base", device="cpu")
    message = str(info.value)
    assert "dinov2-base" in message and "facebook/dinov2-base" in message
    assert "local model directory" in message and EFFICIENTNET_LITE0 in message

    # not flagged offline, hub unreachable: still fails within seconds
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(DinopropError, match="unreachable"):
        load_model("facebook/dinov2-large", device="cpu")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("name", ["no such model!", "/no/such/dir/model", ""])
def test_unknown_model_names_are_rejected(name):
    with pytest.raises(DinopropError, match="model"):
        load_model(name, device="cpu")


def test_efficientnet_lite0_offline_backbone():
    model = load_model(EFFICIENTNET_LITE0, device="cpu")
    assert model.kind == "cnn" and model.output_dim("cls+mean") == 1280
    images = _batch(_random_images(2), model.preprocessing)
    vectors = model.embed(images, pooling="cls+mean")
    assert vectors.shape == (2, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.effective_pooling("cls") == "mean"


def test_preprocessing_matches_hugging_face_processor():
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    preprocessing = Preprocessing()
    pil_processor = BitImageProcessorPil(
        size={"shortest_edge": 256},
        resample=3,
        crop_size={"height": 224, "width": 224},
        image_mean=list(preprocessing.mean),
        image_std=list(preprocessing.std),
    )
    torchvision_processor = dinov2_image_processor(preprocessing)
    images = _random_images(1, size=(400, 533)) + _random_images(1, size=(300, 200))
    for image in images:
        ours = _normalized(preprocess_image(image, preprocessing)[None], preprocessing)[0]
        pil = pil_processor(image, return_tensors="pt")["pixel_values"][0]
        tv = torchvision_processor(image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == pil.shape == (3, 224, 224)
        assert (ours - pil).abs().max() < 1e-4
        # the torchvision backend resamples in float: within 1-2 grey levels
        assert (ours - tv).abs().max() < 0.05 and (ours - tv).abs().mean() < 0.01


def test_image_size_scales_preprocessing(tiny_dinov2_dir):
    model = load_model(tiny_dinov2_dir, device="cpu", image_size=112)
    assert model.preprocessing == Preprocessing(crop_size=112, resize_size=128)
    tensor = preprocess_image(_random_images(1)[0], model.preprocessing)
    assert tensor.shape == (3, 112, 112) and tensor.dtype == torch.uint8
    assert model.embed(tensor[None]).shape == (1, 32)
    assert model.fingerprint != load_model(tiny_dinov2_dir, device="cpu").fingerprint


@pytest.mark.parametrize("image_size", [0, -224, True, 224.0, "224"])
def test_invalid_image_size_is_refused(tiny_dinov2_dir, image_size):
    with pytest.raises(DinopropError, match="image_size must be a positive integer"):
        load_model(tiny_dinov2_dir, device="cpu", image_size=image_size)


def test_jpeg_draft_decodes_large_photos_smaller(tmp_path):
    from PIL import Image

    path = tmp_path / "large.jpg"
    gradient = np.linspace(0, 255, 2400, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(gradient[None, :], gradient[:1800, None], 128), -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
    preprocessing = Preprocessing()
    drafted = open_image(str(path), preprocessing)
    assert drafted.size == (600, 450)  # 1/4 scale: still >= 256 per side
    full = Image.open(path).convert("RGB")
    a = preprocess_image(drafted, preprocessing).float()
    b = preprocess_image(full, preprocessing).float()
    assert (a - b).abs().mean() < 2.0


def test_fingerprint_identifies_weights(tiny_dinov2_dir, session_dir):
    from transformers import Dinov2Config, Dinov2Model

    first = load_model(tiny_dinov2_dir, device="cpu").fingerprint
    assert load_model(tiny_dinov2_dir, device="cpu").fingerprint == first
    torch.manual_seed(99)
    other = Path(session_dir) / "tiny-dinov2-other"
    Dinov2Model(Dinov2Config(patch_size=14, **TINY)).save_pretrained(other)
    assert load_model(str(other), device="cpu").fingerprint != first


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device().type in ("cpu", "mps")
        with pytest.raises(DinopropError, match="not available"):
            resolve_device("cuda:1")
    with pytest.raises(DinopropError, match="Invalid device"):
        resolve_device("quantum")


def test_bf16_precision_on_cpu_stays_close_to_fp32(tiny_dinov2_dir):
    fp32 = load_model(tiny_dinov2_dir, device="cpu", precision="fp32")
    bf16 = load_model(tiny_dinov2_dir, device="cpu", precision="bf16")
    assert bf16.fingerprint == fp32.fingerprint and str(bf16.dtype) == "torch.bfloat16"
    images = _batch(_random_images(4), fp32.preprocessing)
    cosines = (fp32.embed(images) * bf16.embed(images)).sum(1)
    assert cosines.min() > 0.98
    with pytest.raises(DinopropError, match="fp16"):
        load_model(tiny_dinov2_dir, device="cpu", precision="fp16")
    with pytest.raises(DinopropError, match="precision"):
        load_model(tiny_dinov2_dir, device="cpu", precision="int3")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cpu_uses_bf16_only_where_native(monkeypatch, native):
    import torch

    from dinoprop import models
    from dinoprop.models import devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert models.compute_dtype(torch.device("cpu")) == expected
    assert models.compute_dtype(torch.device("cpu"), "auto") == expected
    assert models.compute_dtype(torch.device("cpu"), "fp32") == torch.float32
    assert models.compute_dtype(torch.device("mps"), "auto") == torch.float32


def test_models_that_cannot_embed_images_fail_at_load(session_dir):
    from transformers import BertConfig, BertModel

    path = session_dir / "tiny-text-model"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(path)
    with pytest.raises(DinopropError, match="cannot embed images"):
        load_model(str(path), device="cpu")
